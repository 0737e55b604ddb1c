"""Triton kernels for CUDA tensors (issue #4). Not implemented yet: CUDA uses the reference."""


def register() -> bool:
    """Register the Triton kernels for the CUDA key; False when they are not available."""
    return False
