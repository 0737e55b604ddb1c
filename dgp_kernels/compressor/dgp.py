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

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import ops
from ..codec.payload import LayerPayload, SparsePayload
from ..checks import check_bool, check_choice, check_fractions, check_int, dtype_name
from ..ops import DEFAULT_KEEP, DEFAULT_TOP, band_counts
from .base import Compressor, cast_values, check_grad_list, check_no_nan, check_value_dtype
from .base import register_compressor

__all__ = ["DGPCompressor", "TopKCompressor", "TOP_FEEDBACK_POLICIES", "clip_top_band"]

#: Error-feedback policies of the top band (ranks ``[0, k_top)``), see :class:`DGPCompressor`.
TOP_FEEDBACK_POLICIES = ("full", "clipped", "floor", "drop")

# Mantissa digits (implicit bit included) and smallest subnormal of each float dtype.
_MANT = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


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
        top_feedback: what error feedback keeps of the **top band** (the ``k_top`` entries
            of largest ``|g + e|``, ranks ``[0, k_top)``, which are never sent):

            * ``"full"`` (default, the authors' DGP): all of it, ``e <- v`` there. Such an
              entry only grows, so it tends to stay in the top band for good.
            * ``"clipped"``: ``e <- c`` with ``|c| <= B``, where ``B`` is the top boundary,
              the magnitude of rank ``k_top`` (the largest entry outside the top band: the
              largest value sent when the band is not empty; 0 when every entry is in the
              top band), so the entry can re-enter the band. ``c = v`` when ``|v| <= B``
              (ties at the boundary); otherwise ``c = sign(v) * B`` rounded towards zero
              to a multiple of the spacing of floats at ``|v|`` (it equals ``B`` whenever
              ``|v| <= 2B``, and is 0 when ``B`` is below that spacing), which makes
              ``v - c`` exact. ``v - c`` is dropped.
            * ``"floor"``: as ``"clipped"`` with ``B`` the band's floor, the smallest
              magnitude sent this round (rank ``k_top + k_keep - 1``; 0 when nothing is
              sent), so a carried entry starts the next round below every value just sent
              instead of on the top boundary, where any same-sign gradient pushes it back
              into the top band.
            * ``"drop"``: nothing, ``e <- 0`` there; all of ``v`` is dropped.

            What is dropped is recorded (:attr:`last_dropped`, :attr:`dropped_l1`,
            :attr:`dropped_entries`), and per entry ``e_new + dropped == v`` bitwise, so
            ``decoded_payload + e_new + dropped == g + e_old`` keeps the exactness below.
            ``±inf`` in the top band: ``"clipped"``/``"floor"`` carry ``±B`` and drop ``±inf``
            (``±B + ±inf == ±inf``); when ``B`` is itself inf, nothing is dropped. The
            policy costs one more selection per layer (the top band's positions) and
            has no effect without error feedback or with ``top = 0``.
        dense_below: tensors with fewer entries than this are sent dense (every value, no
            positions; with error feedback their residual keeps only the value dtype's
            rounding error). ``None`` (default) sends dense exactly the tensors whose band
            is empty (``k_keep = 0``: fewer than 5 entries at ``keep = 0.2``), which would
            otherwise never send anything and, with error feedback, only grow their
            residual; every other tensor keeps the authors' band. ``0`` is the authors'
            operator on every tensor. The authors' ring variant sent tensors under 1,000
            entries dense; ``dense_below=1000`` costs +6.8 % upload on ``convnet_small``
            and +0.3 % on the CIFAR ResNet-18 (``bench/studies/dense_below.py``) and sends
            those tensors unpruned, so their largest entries are no longer withheld.
        spare_residuals: with error feedback, keep a second residual buffer per tensor in
            groups where :func:`~dgp_kernels.ops.one_sweep_available` (default ``True``,
            below); ``False`` keeps one buffer and the in-place hinted op, for when memory
            is tighter than time. Payloads and residuals are bit-identical either way; a
            speed and memory setting, so it is not part of :meth:`params` or the state.

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
    With error feedback each group carries a :class:`~dgp_kernels.ops.BandHint` from round
    to round (the CPU kernel brackets the band boundaries with last round's keys; the
    results are bit-identical without it); it is not part of the saved state. Groups where
    :func:`~dgp_kernels.ops.one_sweep_available` (every float dtype on CPUs with AVX2 or
    AVX-512) also keep a second residual buffer per tensor (one more residual's worth of
    memory):
    :func:`~dgp_kernels.ops.select_ef_multi_into` writes the new residuals there, reading
    ``g`` and ``e`` once for layers whose hint holds, and the two buffers then swap storages.

    Attributes (statistics of the top-band policy; all zero/empty with ``"full"``):
        last_dropped: per layer of the last round, ``(indices, dropped)`` — int64 flat
            indices of the top band (ascending) and what was dropped there (the layer's
            dtype, zeros where nothing was); ``None`` before the first round or when the
            policy did not run.
        dropped_l1: sum of ``|dropped|`` over all rounds so far (a Python float, in
            float64; ``inf`` once an inf was dropped).
        dropped_entries: number of entries with a non-zero drop over all rounds.
    """

    def __init__(
        self,
        top: float = DEFAULT_TOP,
        keep: float = DEFAULT_KEEP,
        error_feedback: bool = True,
        value_dtype: Union[str, torch.dtype] = torch.float32,
        top_feedback: str = "full",
        dense_below: Optional[int] = None,
        spare_residuals: bool = True,
    ) -> None:
        super().__init__()
        check_fractions(top, keep)
        self.top = float(top)
        self.keep = float(keep)
        self.error_feedback = check_bool(error_feedback, "error_feedback")
        self.value_dtype = check_value_dtype(value_dtype)
        if not isinstance(top_feedback, str):
            raise TypeError(
                f"top_feedback must be a str (one of {', '.join(TOP_FEEDBACK_POLICIES)}), "
                f"got {type(top_feedback).__name__} {top_feedback!r}"
            )
        self.top_feedback = check_choice(top_feedback, "top_feedback", TOP_FEEDBACK_POLICIES)
        self.dense_below = None if dense_below is None else check_int(dense_below, "dense_below", min_value=0)
        self.spare_residuals = check_bool(spare_residuals, "spare_residuals")
        self.last_dropped: Optional[List[Tuple[Tensor, Tensor]]] = None
        self.dropped_l1 = 0.0
        self.dropped_entries = 0
        # One BandHint per (dtype, device) group: the CPU kernel brackets each layer's
        # boundaries with last round's keys. Results never depend on it; not saved.
        self._hints: Dict[Tuple[torch.dtype, torch.device], ops.BandHint] = {}
        # Groups with the one-sweep path: a second residual buffer per layer.
        # select_ef_multi_into writes the new residuals there (one sweep over g and e for
        # hinted layers) and the buffers swap storages on success, so the memory's tensors
        # hold the new residuals. Not saved.
        self._spares: Dict[Tuple[torch.dtype, torch.device], List[Tensor]] = {}

    def params(self) -> Dict[str, Any]:
        return {
            "top": self.top,
            "keep": self.keep,
            "error_feedback": self.error_feedback,
            "value_dtype": dtype_name(self.value_dtype),
            "top_feedback": self.top_feedback,
            "dense_below": self.dense_below,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # A state saved before top_feedback existed was saved by the authors' policy.
        # A state saved before dense_below existed loads into the default (None): the two
        # differ only on tensors whose band is empty, which that state never sent.
        if isinstance(state, dict) and isinstance(state.get("params"), dict) \
                and state.get("compressor") == "dgp":
            params = dict(state["params"])
            params.setdefault("top_feedback", "full")
            params.setdefault("dense_below", None)
            state = dict(state, params=params)
        super().load_state_dict(state)

    def _extra_state(self) -> Dict[str, Any]:
        return {"dropped_l1": self.dropped_l1, "dropped_entries": self.dropped_entries}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        self.dropped_l1 = float(state.get("dropped_l1", 0.0))
        self.dropped_entries = int(state.get("dropped_entries", 0))
        self.last_dropped = None
        self._hints = {}
        self._spares = {}

    def reset(self) -> None:
        super().reset()
        self.last_dropped = None
        self._hints = {}
        self._spares = {}
        self.dropped_l1 = 0.0
        self.dropped_entries = 0

    def _top_band_feedback(self, e: Tensor, idx: Tensor, val: Tensor) -> Tuple[Tensor, Tensor]:
        """Apply the top-band policy to one layer's flat residual ``e`` (mutated) right
        after ``select_ef`` (which left ``v`` everywhere except the sent ``idx``, where it
        wrote 0; ``val`` are the sent values). Returns ``(top indices, dropped)``."""
        v = e.clone()
        v[idx] = val
        top_idx = ops.select(v, 0.0, self.top)[0]  # ranks [0, k_top): same counts, same ties
        t = v[top_idx]
        if self.top_feedback == "drop":
            e[top_idx] = 0
            return top_idx, t
        if self.top_feedback == "floor":  # the smallest magnitude sent (0 without a band)
            bound = val.abs().min() if val.numel() else v.new_zeros(())
        else:
            outside = v.abs()
            outside[top_idx] = 0
            bound = outside.max() if outside.numel() else outside.new_zeros(())
        c, drop = clip_top_band(t, bound)
        e[top_idx] = c
        return top_idx, drop

    def _select_into(self, key, gs: List[Tensor], res: List[Tensor], hint) -> Tuple[Tensor, Tensor, Tensor]:
        """``select_ef_multi`` for one CPU group, out of place: the new residuals go to the
        group's spare buffers, which then swap storages with ``res`` (so ``res`` hold the new
        residuals and the spares the old ones). On an error nothing is swapped."""
        spare = self._spares.get(key)
        if spare is None or len(spare) != len(res) or any(
                s.shape != e.shape or s.dtype != e.dtype for s, e in zip(spare, res)):
            spare = [torch.empty_like(e, memory_format=torch.contiguous_format) for e in res]
            self._spares[key] = spare
        out = ops.select_ef_multi_into(gs, res, spare, self.top, self.keep, hint=hint)
        with torch.no_grad():
            for e, s in zip(res, spare):
                e_storage, e_off, e_stride = e.untyped_storage(), e.storage_offset(), e.stride()
                e.set_(s.untyped_storage(), s.storage_offset(), s.shape, s.stride())
                s.set_(e_storage, e_off, e.shape, e_stride)
        return out

    def is_dense(self, numel: int) -> bool:
        """Whether a tensor of ``numel`` entries is sent dense (see ``dense_below``)."""
        if self.dense_below is None:
            return band_counts(numel, self.top, self.keep)[1] == 0 and numel > 0
        return numel < self.dense_below

    def compress(self, grads: Sequence[Tensor]) -> SparsePayload:
        grads = check_grad_list(grads)
        residuals = self.memory.residuals(grads) if self.error_feedback else None
        dense = [i for i, g in enumerate(grads) if self.is_dense(g.numel())]
        dense_set = set(dense)
        # The multi-tensor ops need one dtype and device per call: one call per group
        # (a single call for the usual single-dtype model).
        groups: Dict[Tuple[torch.dtype, torch.device], List[int]] = {}
        for i, g in enumerate(grads):
            if i not in dense_set:
                groups.setdefault((g.dtype, g.device), []).append(i)
        if len(groups) > 1 or dense:
            # Each op call checks its own layers for NaN before writing any residual; with
            # several calls, check them all first so an error still modifies nothing.
            vs = [g if residuals is None else g + residuals[i] for i, g in enumerate(grads)]
            check_no_nan(vs, "grads + residuals" if residuals is not None else "grads")
        selected: List[Tuple[int, Optional[Tensor], Tensor]] = []  # (layer, indices or None: dense, sent)
        results = []
        for key, members in groups.items():
            gs = [grads[i] for i in members]
            if residuals is not None:
                hint = self._hints.setdefault(key, ops.BandHint())
                res = [residuals[i] for i in members]
                if self.spare_residuals and ops.one_sweep_available(key[0], key[1]):
                    out = self._select_into(key, gs, res, hint)
                else:
                    out = ops.select_ef_multi(gs, res, self.top, self.keep, hint=hint)
            else:
                out = ops.select_multi(gs, self.top, self.keep)
            results.append((members, out))
        policy = residuals is not None and self.top_feedback != "full" and self.top > 0
        dropped: Dict[int, Tuple[Tensor, Tensor]] = {}
        for members, (idx, val, off) in results:
            sent, err = cast_values(val, self.value_dtype)
            bounds = off.tolist()
            for j, i in enumerate(members):
                a, b = bounds[j], bounds[j + 1]
                layer_idx = idx[a:b]
                if policy and band_counts(grads[i].numel(), self.top, self.keep)[0]:
                    top_idx, drop = self._top_band_feedback(
                        residuals[i].view(-1), layer_idx, val[a:b])
                    dropped[i] = (top_idx, drop)
                    if drop.numel():
                        self.dropped_l1 += float(drop.double().abs().sum())
                        self.dropped_entries += int((drop != 0).sum())
                if err is not None and residuals is not None and b > a:
                    # select_ef zeroed e at the sent positions, so e there is just the error.
                    residuals[i].view(-1)[layer_idx] = err[a:b]
                selected.append((i, layer_idx, sent[a:b]))
        for i in dense:  # every op call succeeded: nothing can fail from here on
            v = grads[i].reshape(-1) if residuals is None else grads[i].reshape(-1) + residuals[i].view(-1)
            sent, err = cast_values(v, self.value_dtype)
            if residuals is not None:
                residuals[i].view(-1).copy_(torch.zeros_like(v) if err is None else err)
            selected.append((i, None, sent))
        selected.sort(key=lambda t: t[0])
        if policy:
            self.last_dropped = [
                dropped.get(i) or (g.new_zeros(0, dtype=torch.int64), g.new_zeros(0))
                for i, g in enumerate(grads)
            ]
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
        super().__init__(top=0.0, keep=keep, error_feedback=error_feedback, value_dtype=value_dtype,
                         dense_below=0)

    def params(self) -> Dict[str, Any]:
        p = super().params()
        del p["top"], p["top_feedback"], p["dense_below"]
        return p


def clip_top_band(t: Tensor, bound: Tensor) -> Tuple[Tensor, Tensor]:
    """The ``"clipped"`` top-band policy on values ``t``: ``(carried, dropped)`` with
    ``|carried| <= bound`` and ``carried + dropped == t`` bitwise (see :class:`DGPCompressor`).
    ``dropped = t - carried`` (exact), and 0 where nothing is clipped (so ``inf`` within an
    inf bound drops 0, not ``inf - inf``).

    ``t``: 1-D float tensor (no NaN); ``bound``: 0-d tensor, ``>= 0`` (may be inf).
    ``c = t`` where ``|t| <= bound``; ``c = sign(t) * bound`` where ``t`` is inf; otherwise
    ``sign(t) * floor(bound / q) * q`` with ``q`` the spacing of floats at ``|t|``
    (a power of two, at least the smallest subnormal). ``t`` is a multiple of ``q`` and
    ``|t| <= 2**p * q`` (``p`` mantissa digits), so ``t - c``, a multiple of ``q`` no larger
    than ``|t|`` in magnitude, is representable. Computed in float64, exact for every float
    dtype: ``bound / q`` and ``* q`` only shift exponents.
    """
    if t.numel() == 0:
        return t.clone(), t.clone()
    a = t.double().abs()
    b = bound.double()
    p = _MANT[t.dtype]
    tiny = float(torch.finfo(t.dtype).smallest_normal) * 2.0 ** (1 - p)  # smallest subnormal
    exp = torch.frexp(a).exponent  # a in [2**(exp-1), 2**exp)
    q = torch.ldexp(torch.ones_like(a), (exp - p).to(torch.float64)).clamp_min(tiny)
    mag = torch.floor(b / q) * q
    mag = torch.where(torch.isinf(a), b.expand_as(a), mag)
    mag = torch.where(a <= b, a, mag)
    clipped = a > b
    c = torch.where(t < 0, -mag, mag).to(t.dtype).where(clipped, t)
    return c, torch.where(clipped, t - c, torch.zeros_like(t))
