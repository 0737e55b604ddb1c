"""Baseline compressors the evaluation compares DGP against, through the same payloads.

* ``none``  — dense, nothing removed (``indices=None``, ``k == numel``).
* ``randk`` — a uniformly random ``keep`` fraction of each tensor (seeded).
* ``dp``    — clip the whole update to L2 norm ``clip``, add Gaussian noise (seeded).
* ``qsgd``  — stochastic quantisation to ``levels`` levels per tensor (seeded).

(``topk``, classic gradient pruning, is DGP with ``top = 0`` and lives in :mod:`.dgp`.)

Random draws use the compressor's own CPU :class:`torch.Generator` (its state is in
``state_dict()``) and are moved to the gradients' device, so a seeded compressor gives the
same payload on every device. ``seed=None`` draws a fresh seed from the OS: give each
client its own seed — clients sharing a seed share their "random" noise.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from ..codec.payload import LayerPayload, SparsePayload
from ..checks import check_bool, check_float, check_fractions, check_int, check_seed, dtype_name
from ..ops import DEFAULT_KEEP, band_counts
from .base import Compressor, cast_values, check_grad_list, check_no_nan, check_value_dtype
from .base import error_feedback_values, register_compressor

__all__ = ["NoneCompressor", "RandKCompressor", "DPCompressor", "QSGDCompressor", "QSGD_LEVELS_META"]

#: ``SparsePayload.meta`` key holding QSGD's number of levels ``s``.
QSGD_LEVELS_META = "qsgd_levels"


def _dense_layer(values: Tensor, numel: int) -> LayerPayload:
    return LayerPayload(numel=numel, indices=None, values=values.reshape(-1))


@register_compressor("none")
class NoneCompressor(Compressor):
    """Dense baseline: every entry sent, in ``value_dtype`` (default float32).

    With a lossy ``value_dtype`` the rounding error is dropped (no error feedback: this
    baseline measures the uncompressed upload).
    """

    def __init__(self, value_dtype: Union[str, torch.dtype] = torch.float32) -> None:
        super().__init__()
        self.value_dtype = check_value_dtype(value_dtype)

    def params(self) -> Dict[str, Any]:
        return {"value_dtype": dtype_name(self.value_dtype)}

    def compress(self, grads: Sequence[Tensor]) -> SparsePayload:
        grads = check_grad_list(grads)
        check_no_nan(grads)
        layers = []
        for g in grads:
            sent, _ = cast_values(g.detach().reshape(-1), self.value_dtype)
            if sent.data_ptr() == g.data_ptr() and g.numel():
                sent = sent.clone()  # never alias the caller's gradient
            layers.append(_dense_layer(sent, g.numel()))
        self.rounds += 1
        return SparsePayload(layers=tuple(layers))


@register_compressor("randk")
class RandKCompressor(Compressor):
    """Random-k sparsification: ``k = floor(keep * n + 1e-6)`` uniformly random positions
    per tensor (without replacement, the same count rule as ``topk``/``dgp``), values
    unchanged (not rescaled by ``n / k``).

    Args:
        keep: fraction of entries sent per tensor (default 0.20).
        error_feedback: default False (the plain random-pruning baseline); True keeps the
            unsent part in a residual as DGP does (then values must not be rescaled, which
            is why they never are).
        value_dtype: ``float32`` (default), ``bfloat16`` or ``float16``; with error feedback
            the rounding error goes back into the residual, as in ``dgp``.
        seed: seed of the position generator (``None``: fresh OS entropy).
    """

    def __init__(
        self,
        keep: float = DEFAULT_KEEP,
        error_feedback: bool = False,
        value_dtype: Union[str, torch.dtype] = torch.float32,
        seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_fractions(0.0, keep)
        self.keep = float(keep)
        self.error_feedback = check_bool(error_feedback, "error_feedback")
        self.value_dtype = check_value_dtype(value_dtype)
        self.seed = check_seed(seed)
        self._make_generator(self.seed)

    def params(self) -> Dict[str, Any]:
        return {
            "keep": self.keep,
            "error_feedback": self.error_feedback,
            "value_dtype": dtype_name(self.value_dtype),
            "seed": self.seed,
        }

    def compress(self, grads: Sequence[Tensor]) -> SparsePayload:
        grads = check_grad_list(grads)
        residuals = self.memory.residuals(grads) if self.error_feedback else None
        vs = error_feedback_values(grads, residuals)
        layers = []
        for i, (g, v) in enumerate(zip(grads, vs)):
            n = v.numel()
            k = band_counts(n, 0.0, self.keep)[1]
            idx = torch.randperm(n, generator=self._generator)[:k].sort().values.to(v.device)
            kept = v[idx]
            sent, err = cast_values(kept, self.value_dtype)
            if residuals is not None:
                e = residuals[i].view(-1)
                e.copy_(v)
                e[idx] = 0 if err is None else err
            layers.append(LayerPayload(numel=n, indices=idx, values=sent))
        self.rounds += 1
        return SparsePayload(layers=tuple(layers))


@register_compressor("dp")
class DPCompressor(Compressor):
    """Gaussian mechanism on one client's update: clip, then add noise (dense payload).

    The whole update (all tensors together) is scaled by ``min(1, clip / ||g||_2)`` (norm
    over every entry of every tensor, computed in float64), so its L2 norm is at most
    ``clip`` (up to float32 rounding); then i.i.d. ``N(0, (noise_multiplier * clip)^2)``
    noise is added to every entry. Values are float32. This is client-level (local)
    clipping as in DP-FedAvg; the privacy accounting (epsilon) is the caller's.

    Args:
        clip: L2 clipping norm, > 0 (default 1.0).
        noise_multiplier: noise std divided by ``clip``, >= 0 (default 1.0; 0 clips only).
        seed: seed of the noise generator (``None``: fresh OS entropy).

    Gradients must be finite (``ValueError`` otherwise).
    """

    def __init__(self, clip: float = 1.0, noise_multiplier: float = 1.0, seed: Optional[int] = None) -> None:
        super().__init__()
        self.clip = check_float(clip, "clip", min_value=0.0, min_inclusive=False)
        self.noise_multiplier = check_float(noise_multiplier, "noise_multiplier", min_value=0.0)
        self.seed = check_seed(seed)
        self._make_generator(self.seed)

    def params(self) -> Dict[str, Any]:
        return {"clip": self.clip, "noise_multiplier": self.noise_multiplier, "seed": self.seed}

    def compress(self, grads: Sequence[Tensor]) -> SparsePayload:
        grads = check_grad_list(grads)
        check_no_nan(grads, finite=True)
        sq = 0.0
        for g in grads:
            if g.numel():
                sq += float(torch.linalg.vector_norm(g.detach().to(torch.float64)) ** 2)
        norm = math.sqrt(sq)
        scale = 1.0 if norm <= self.clip else self.clip / norm
        std = self.noise_multiplier * self.clip
        layers = []
        for g in grads:
            x = g.detach().reshape(-1).to(torch.float32) * scale
            if std > 0:
                noise = torch.randn(x.numel(), generator=self._generator, dtype=torch.float32)
                x = x + noise.to(x.device) * std
            elif x.data_ptr() == g.data_ptr() and g.numel():
                x = x.clone()
            layers.append(_dense_layer(x, g.numel()))
        self.rounds += 1
        return SparsePayload(layers=tuple(layers))


@register_compressor("qsgd")
class QSGDCompressor(Compressor):
    """QSGD stochastic quantisation (Alistarh et al. 2017) with ``s = levels`` per tensor.

    Per tensor ``x`` (computed in float32): ``r = |x_j| / ||x||_2 * s``; the level is
    ``floor(r) + 1`` with probability ``r - floor(r)``, else ``floor(r)`` (so
    ``E[level] = r``, unbiased); the value sent is ``||x|| * sign(x_j) * level / s``. An
    all-zero tensor sends zeros.

    The payload is dense (``indices=None``) with the dequantised values as float32, and
    ``meta`` holds ``("qsgd_levels", s)``. The codec therefore counts 4 bytes per entry; a
    dedicated coding (one float norm per tensor + a signed ``log2(2s+1)``-bit level per
    entry, Elias coding of the levels in the paper) would shrink that ~4-8x. The default
    ``s = 127`` is the largest for which a signed level fits one int8, so such a coding is
    a value-type addition to the wire format, not a change here.

    Args:
        levels: number of quantisation levels ``s``, an int in [1, 2**24] (default 127;
            beyond 2**24 float32 levels are no longer exact).
        seed: seed of the rounding generator (``None``: fresh OS entropy).

    Gradients must be finite (``ValueError`` otherwise).
    """

    def __init__(self, levels: int = 127, seed: Optional[int] = None) -> None:
        super().__init__()
        self.levels = check_int(levels, "levels", min_value=1, max_value=2**24)
        self.seed = check_seed(seed)
        self._make_generator(self.seed)

    def params(self) -> Dict[str, Any]:
        return {"levels": self.levels, "seed": self.seed}

    def compress(self, grads: Sequence[Tensor]) -> SparsePayload:
        grads = check_grad_list(grads)
        check_no_nan(grads, finite=True)
        s = float(self.levels)
        layers = []
        for g in grads:
            x = g.detach().reshape(-1).to(torch.float32)
            n = x.numel()
            # Draw even for zero tensors so the generator advances by numel every round
            # whatever the data (payloads then depend on the round, not on history).
            u = torch.rand(n, generator=self._generator, dtype=torch.float32).to(x.device)
            norm = torch.linalg.vector_norm(x) if n else x.new_zeros(())
            if n == 0 or float(norm) == 0.0:
                layers.append(_dense_layer(torch.zeros_like(x), n))
                continue
            r = x.abs() / norm * s
            low = r.floor()
            level = (low + (u < (r - low)).to(torch.float32)).clamp_(max=s)
            values = (norm / s) * level * torch.sign(x)
            layers.append(_dense_layer(values, n))
        self.rounds += 1
        return SparsePayload(layers=tuple(layers), meta=((QSGD_LEVELS_META, self.levels),))
