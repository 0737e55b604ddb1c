"""DGP (dual gradient pruning) and classic top-k pruning compressors.

``dgp``: per tensor, send the band of ranks ``[k_top, k_top + k_keep)`` of ``|g + e|``
(docs/semantics.md) and keep everything else in the error-feedback residual ``e``. All
layers go through one multi-tensor op call (``select_ef_multi`` with error feedback,
``select_multi`` without).

``topk``: the same operator with ``top = 0`` — keep the largest ``keep`` fraction of each
tensor (same count rule, so at equal ``keep`` it sends exactly as many values per layer as
``dgp``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import ops
from ..codec.payload import LayerPayload, SparsePayload
from ..checks import check_bool, check_fractions, dtype_name
from ..ops import DEFAULT_KEEP, DEFAULT_TOP
from .base import Compressor, cast_values, check_grad_list, check_no_nan, check_value_dtype
from .base import register_compressor

__all__ = ["DGPCompressor", "TopKCompressor"]


@register_compressor("dgp")
class DGPCompressor(Compressor):
    """Dual gradient pruning with error feedback (the paper's client-side operator).

    Args:
        top: fraction of each tensor's largest-magnitude entries not sent (default 0.05).
        keep: fraction of each tensor's entries sent (default 0.20); ``top + keep <= 1``.
        error_feedback: keep what is not sent (default True) and add it to the next round's
            gradient; off gives the single-round operator the attack evaluation uses.
        value_dtype: payload value dtype, ``float32`` (default, exact for float32
            gradients), ``bfloat16`` or ``float16`` (lossy, smaller on the wire).

    Per tensor ``i`` with residual ``e_i`` (dtype and shape of ``grads[i]``):
    ``v = g + e``; ``(idx, kept) = band(v)``; ``e <- v`` with ``idx`` zeroed; send
    ``cast(kept)`` at ``idx``. When the cast to ``value_dtype`` is lossy, its rounding error
    ``kept - decoded(cast(kept))`` is written into ``e`` at ``idx``, so

        ``decoded_payload + e_new == g + e_old``

    holds for every entry, bitwise for float32/float64 gradients and whenever the value
    dtype holds the gradient dtype exactly (decoding widens bf16/fp16 exactly and the
    rounding error is exactly representable, see
    :func:`~dgp_kernels.compressor.base.cast_values`). Exceptions: a finite value beyond
    the fp16 range is saturated to 65504 with the excess in ``e`` up to float rounding, and
    half-precision gradients sent as the *other* half format (bf16 <-> fp16) keep an error
    the half-precision residual may not hold exactly. Without error feedback the rounding
    error is dropped.

    Layers are grouped by (dtype, device) and each group goes through one multi-tensor op
    call (one call in total for the usual single-dtype model); payload tensors stay on each
    gradient's device. A NaN in ``g + e`` raises ``ValueError`` and modifies nothing.
    """

    def __init__(
        self,
        top: float = DEFAULT_TOP,
        keep: float = DEFAULT_KEEP,
        error_feedback: bool = True,
        value_dtype: Union[str, torch.dtype] = torch.float32,
    ) -> None:
        super().__init__()
        check_fractions(top, keep)
        self.top = float(top)
        self.keep = float(keep)
        self.error_feedback = check_bool(error_feedback, "error_feedback")
        self.value_dtype = check_value_dtype(value_dtype)

    def params(self) -> Dict[str, Any]:
        return {
            "top": self.top,
            "keep": self.keep,
            "error_feedback": self.error_feedback,
            "value_dtype": dtype_name(self.value_dtype),
        }

    def compress(self, grads: Sequence[Tensor]) -> SparsePayload:
        grads = check_grad_list(grads)
        residuals = self.memory.residuals(grads) if self.error_feedback else None
        # The multi-tensor ops need one dtype and device per call: one call per group
        # (a single call for the usual single-dtype model).
        groups: Dict[Tuple[torch.dtype, torch.device], List[int]] = {}
        for i, g in enumerate(grads):
            groups.setdefault((g.dtype, g.device), []).append(i)
        if len(groups) > 1:
            # Each op call checks its own layers for NaN before writing any residual; with
            # several calls, check them all first so an error still modifies nothing.
            vs = [g if residuals is None else g + residuals[i] for i, g in enumerate(grads)]
            check_no_nan(vs, "grads + residuals" if residuals is not None else "grads")
        selected: List[Tuple[int, Tensor, Tensor]] = []  # (layer, indices, sent values)
        results = []
        for members in groups.values():
            gs = [grads[i] for i in members]
            if residuals is not None:
                out = ops.select_ef_multi(gs, [residuals[i] for i in members], self.top, self.keep)
            else:
                out = ops.select_multi(gs, self.top, self.keep)
            results.append((members, out))
        for members, (idx, val, off) in results:
            sent, err = cast_values(val, self.value_dtype)
            bounds = off.tolist()
            for j, i in enumerate(members):
                a, b = bounds[j], bounds[j + 1]
                layer_idx = idx[a:b]
                if err is not None and residuals is not None and b > a:
                    # select_ef zeroed e at the sent positions, so e there is just the error.
                    residuals[i].view(-1)[layer_idx] = err[a:b]
                selected.append((i, layer_idx, sent[a:b]))
        selected.sort(key=lambda t: t[0])
        layers = tuple(
            LayerPayload(numel=grads[i].numel(), indices=ix, values=v) for i, ix, v in selected
        )
        self.rounds += 1
        return SparsePayload(layers=layers)


@register_compressor("topk")
class TopKCompressor(DGPCompressor):
    """Classic gradient pruning: send the largest ``keep`` fraction of each tensor.

    Exactly :class:`DGPCompressor` with ``top = 0`` (same count rule
    ``k = floor(keep * n + 1e-6)``, same tie rule), so at equal ``keep`` it sends as many
    values per layer as ``dgp``.

    ``error_feedback`` defaults to **False**: this is the pruning defense the literature
    compares against (Zhu et al.'s DLG defense; the DGP authors' baseline)
    and it is a single-round operator there — with error feedback every coordinate is
    eventually released through the residual, which changes both what an attacker sees in
    a round and the accuracy. Turn it on for a communication-efficiency baseline
    (top-k sparsification with memory, Stich et al. 2018).
    """

    def __init__(
        self,
        keep: float = DEFAULT_KEEP,
        error_feedback: bool = False,
        value_dtype: Union[str, torch.dtype] = torch.float32,
    ) -> None:
        super().__init__(top=0.0, keep=keep, error_feedback=error_feedback, value_dtype=value_dtype)

    def params(self) -> Dict[str, Any]:
        p = super().params()
        del p["top"]
        return p
