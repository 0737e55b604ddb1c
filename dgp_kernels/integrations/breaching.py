"""Adapter for `breaching <https://github.com/JonasGeiping/breaching>`_-style shared data:
apply any of our compressors to what a breaching user shares, so breaching's attacks can be
evaluated against DGP (and the baselines) without changing breaching.

breaching's users return ``shared_data`` dicts of the form::

    {"gradients": [g_0, ..., g_{P-1}],        # one tensor per model parameter
     "buffers": [...] or None,                # BatchNorm statistics (left alone here)
     "metadata": {"num_data_points": ..., "labels": ..., "local_hyperparams": ...}}

(older releases put the metadata keys at the top level and hold one gradient list per
server query: ``"gradients": [[g_0, ...], [g_0, ...]]``; both layouts are accepted).
:func:`compress_shared_data` returns the same structure with each gradient replaced by what
the server would decode: compress, encode to the wire format, decode, decompress (dense,
zeros where nothing was sent), in the original dtype and device. Everything else is passed
through untouched; the input is never modified.

breaching itself needs torchvision (which does not import beside this project's torch), so
this module does not import it: it only reads and writes plain dicts, lists and tensors.

Example::

    from dgp_kernels.integrations.breaching import compress_shared_data

    shared_data, true_user_data = user.compute_local_updates(server_payload)
    defended = compress_shared_data(shared_data, "dgp", {"top": 0.05, "keep": 0.20})
    reconstruction, stats = attacker.reconstruct([server_payload], [defended], {}, dryrun=False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..codec import decode, encode
from ..codec.accounting import dense_nbytes
from ..compressor import ADGPCompressor, Compressor, get_compressor

__all__ = ["CompressionInfo", "compress_shared_data", "compress_gradient_list"]


@dataclass(frozen=True)
class CompressionInfo:
    """What :func:`compress_shared_data` did (``return_info=True``).

    Attributes:
        payload_bytes: wire bytes per query (0 when ``through_wire=False``).
        dense_bytes: bytes of the dense float32 gradients per query.
        sent_masks: per query, one bool tensor per parameter (shape of the gradient):
            True where a value was sent. Adaptive attackers use it
            (``ThreatModel.sent_mask``).
    """

    payload_bytes: Tuple[int, ...]
    dense_bytes: Tuple[int, ...]
    sent_masks: Tuple[Tuple[Tensor, ...], ...]


def _as_compressor(compressor: Union[str, Compressor], params: Optional[Dict[str, Any]]) -> Compressor:
    if isinstance(compressor, Compressor):
        if params:
            raise ValueError("params= is only for a compressor given by name (the object is already configured)")
        return compressor
    if isinstance(compressor, str):
        if params is not None and not isinstance(params, dict):
            raise TypeError(f"params must be a dict of compressor arguments, got {type(params).__name__}")
        comp = get_compressor(compressor, **(params or {}))
        if isinstance(comp, ADGPCompressor):
            raise ValueError(
                "compressor 'adgp' needs the broadcaster's positions: pass an ADGPCompressor object "
                "after set_positions(...)"
            )
        return comp
    raise TypeError(f"compressor must be a registered name or a Compressor, got {type(compressor).__name__}")


def compress_gradient_list(
    grads: Sequence[Tensor], compressor: Compressor, *, through_wire: bool = True,
) -> Tuple[List[Tensor], int, List[Tensor]]:
    """One round of ``compressor`` on one gradient list.

    Args:
        grads: one floating tensor per parameter (any shapes, dtypes, devices).
        compressor: updated in place (error feedback, generator) as by any ``compress``.
        through_wire: encode and decode the payload (default), so what is returned is
            exactly what a server decodes from the bytes; ``False`` decompresses the
            in-memory payload (same values for float32 payloads).

    Returns:
        ``(decoded, nbytes, sent_masks)``: dense tensors like ``grads`` (same shape, dtype
        and device), the payload size in bytes (0 without the wire), and bool masks of the
        sent positions.
    """
    payload = compressor.compress(list(grads))
    nbytes = 0
    if through_wire:
        data = encode(payload)
        nbytes = len(data)
        payload = decode(data, expected_numels=[g.numel() for g in grads])
    dense = compressor.decompress(payload, [g.detach() for g in grads])
    out, masks = [], []
    for g, d, layer in zip(grads, dense, payload.layers):
        out.append(d.to(device=g.device, dtype=g.dtype))
        if layer.indices is None and not payload.aligned:
            mask = torch.ones(g.shape, dtype=torch.bool, device=g.device)
        elif layer.indices is None:  # aligned: the compressor's positions
            mask = torch.zeros(g.numel(), dtype=torch.bool, device=g.device)
            mask[compressor.positions.indices[len(masks)].to(g.device)] = True
            mask = mask.view(g.shape)
        else:
            mask = torch.zeros(g.numel(), dtype=torch.bool, device=g.device)
            mask[layer.indices.to(g.device)] = True
            mask = mask.view(g.shape)
        masks.append(mask)
    return out, nbytes, masks


def _is_tensor_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x)


def compress_shared_data(
    shared_data: Mapping[str, Any],
    compressor: Union[str, Compressor] = "dgp",
    params: Optional[Dict[str, Any]] = None,
    *,
    through_wire: bool = True,
    return_info: bool = False,
):
    """Apply a compressor to a breaching ``shared_data`` dict; return the same structure.

    Args:
        shared_data: a dict with ``"gradients"``: a list/tuple of tensors (one per
            parameter), or a list of such lists (one per server query); other keys
            (``"buffers"``, ``"metadata"``, ...) are copied through as they are.
        compressor: a registered name (a fresh compressor is built from ``params``: the
            single-round operator, as in the DGP paper's attack evaluation) or a
            :class:`Compressor` object (its error-feedback state carries over between
            calls, e.g. to attack round ``t`` of a training run). Several queries are
            compressed in order, as consecutive rounds of the same compressor.
        params: the compressor's keyword arguments (name only), e.g.
            ``{"top": 0.05, "keep": 0.20}``.
        through_wire: round-trip through the wire format (default True).
        return_info: also return a :class:`CompressionInfo`.

    Returns:
        a new dict like ``shared_data`` whose gradients are the decoded ones (same
        container types, shapes, dtypes, devices); with ``return_info``,
        ``(dict, CompressionInfo)``.

    Raises:
        TypeError/ValueError naming ``shared_data``, ``compressor`` or ``params``; the
        compressor's ``ValueError`` for NaN gradients.
    """
    if not isinstance(shared_data, Mapping):
        raise TypeError(f"shared_data must be a dict (breaching's shared_data), got {type(shared_data).__name__}")
    if "gradients" not in shared_data:
        raise ValueError(f"shared_data has no 'gradients' entry (keys: {sorted(shared_data)})")
    grads = shared_data["gradients"]
    if _is_tensor_list(grads):
        queries, nested = [grads], False
    elif isinstance(grads, (list, tuple)) and grads and all(_is_tensor_list(q) for q in grads):
        queries, nested = list(grads), True
    else:
        raise TypeError(
            "shared_data['gradients'] must be a non-empty list/tuple of tensors (one per parameter) "
            f"or a list of such lists (one per query), got {type(grads).__name__}"
        )
    comp = _as_compressor(compressor, params)
    new_queries, nbytes, dense, masks = [], [], [], []
    for q in queries:
        out, n, m = compress_gradient_list(q, comp, through_wire=through_wire)
        new_queries.append(type(q)(out) if isinstance(q, tuple) else out)
        nbytes.append(n)
        dense.append(dense_nbytes([g.numel() for g in q]))
        masks.append(tuple(m))
    result = dict(shared_data)
    if nested:
        result["gradients"] = type(grads)(new_queries) if isinstance(grads, tuple) else new_queries
    else:
        result["gradients"] = new_queries[0]
    if return_info:
        return result, CompressionInfo(tuple(nbytes), tuple(dense), tuple(masks))
    return result
