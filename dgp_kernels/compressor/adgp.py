"""ADGP — aligned dual gradient pruning.

All clients of a round send values at the **same** positions, chosen per layer by a
trusted :class:`Broadcaster`; uploads then carry values only
(``SparsePayload(aligned=True)``, every ``indices`` is ``None``) and the server's aggregate
— the download — has exactly the support of one upload.

Selection rule (ours; the paper does not fix one):

* **Default, every round** ("fresh"): positions of layer ``i`` = the DGP band
  (:func:`dgp_kernels.select` with the same ``top``/``keep`` as the clients) of the
  broadcaster's own ``g + e`` (:meth:`Broadcaster.choose`), where ``e`` is the
  broadcaster's own ADGP residual at its positions (it runs an :class:`ADGPCompressor`
  too). The DDP hook (rank 0's ``g + e`` each step), the simulator (a trusted client with
  its own residual) and the typical round below use this rule. Ranking the gradient alone
  (the simulator's ``positions="gradient"``) ignores what every client has accumulated:
  coordinates outside the gradient's band pile up residual in every client and are
  released all at once when they enter it. On digits (convnet_small, 10 clients, lr 0.1,
  seed 0) that run reached 65.5 % at round 60 and then collapsed to chance (13.9 % at
  round 150); ranking ``g + e`` ends at 92.2 %.
* **Option** ("aggregate"): round 1 as above, then the DGP band of the previous round's
  aggregated update (:meth:`Broadcaster.observe`), per layer. It saves the broadcaster a
  gradient per round but leaves most coordinates unsent (caveat below): on digits
  (convnet_small, 10 clients, 150 rounds, defaults) 61 % of the coordinates were never
  sent and accuracy ended at 16.7 %.

So per layer exactly ``k_keep = min(floor(keep*n + 1e-6), n - floor(top*n + 1e-6))``
positions are used, sorted ascending, ranks ``[k_top, k_top + k_keep)`` of the
magnitudes with the usual tie rule (ascending index).

Each client keeps its own error feedback: ``v = g + e``; it sends ``v`` at the positions
and keeps ``e <- v`` with those positions zeroed (plus the value-dtype rounding error, as
in ``dgp``), so ``decoded + e_new == g + e_old`` bitwise.

Caveat of the aggregate rule: the averaged aggregate of aligned uploads is non-zero only on
this round's positions (``k_keep`` of ``n`` entries). Its band then consists of those
positions minus their ``k_top`` largest, topped up with ``k_top`` *zero* entries, which
the tie rule takes at the lowest flat indices. Positions outside the support are never
chosen by magnitude, and the clients' residuals there only drain through that low-index
top-up. Measured on a toy stream (one 2000-entry layer, 5 clients, gradient = fixed mean
+ unit noise, 60 rounds, defaults): with the bare aggregate fed back only 40% of the
coordinates are ever sent and the summed download has cosine 0.51 with the summed mean
gradient; feeding a momentum buffer (0.9) is no better (25%, 0.53); re-choosing every
round from the broadcaster's own fresh gradient (:meth:`Broadcaster.choose` each round)
reaches 100% and 0.99; plain per-client DGP reaches 0.95. :meth:`Broadcaster.observe`
accepts any dense per-layer update, and :meth:`Broadcaster.choose` may be called in any
round.

Typical round::

    b, own = Broadcaster(top=0.05, keep=0.20), ADGPCompressor()   # own: its residual
    e = own.memory.peek() or [torch.zeros_like(g) for g in own_grads]
    pos = b.choose([g + r for g, r in zip(own_grads, e)])   # every round (the default rule)
    own.set_positions(pos); own.compress(own_grads)         # the broadcaster's residual
    for c in clients: c.set_positions(pos)
    ups = [c.compress(g) for c, g in zip(clients, grads)]
    agg = aggregate_aligned(ups, pos)               # aligned SparsePayload, float32 mean
    update = decompress_aligned(agg, pos, like)     # dense float32 tensors
    # the "aggregate" option instead: pos = b.observe(update) for the next round
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import ops
from ..codec.payload import LayerPayload, PayloadError, SparsePayload
from ..checks import check_bool, check_fractions, dtype_name
from ..ops import DEFAULT_KEEP, DEFAULT_TOP
from .base import (
    error_feedback_values,
    Compressor,
    Like,
    cast_values,
    check_grad_list,
    check_layers_fit,
    check_value_dtype,
    register_compressor,
)

__all__ = [
    "AlignedPositions",
    "Broadcaster",
    "ADGPCompressor",
    "aggregate_aligned",
    "decompress_aligned",
]


@dataclass(frozen=True)
class AlignedPositions:
    """The positions every client of one ADGP round sends, as chosen by the broadcaster.

    Attributes:
        indices: per layer, int64 ``[k_i]`` flat row-major indices sorted ascending (CPU).
        numels: per layer, the tensor's ``numel`` (checked against gradients and payloads).
        round: the broadcaster's round number (0 for the first round).
    """

    indices: Tuple[Tensor, ...]
    numels: Tuple[int, ...]
    round: int = 0

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.numels):
            raise ValueError(
                f"AlignedPositions has {len(self.indices)} index tensors but {len(self.numels)} numels"
            )

    @property
    def counts(self) -> Tuple[int, ...]:
        return tuple(int(i.numel()) for i in self.indices)


def _check_positions(positions: object, name: str = "positions") -> AlignedPositions:
    if not isinstance(positions, AlignedPositions):
        raise TypeError(
            f"{name} must be AlignedPositions from a Broadcaster, got {type(positions).__name__}"
        )
    return positions


class Broadcaster:
    """The trusted party of ADGP that picks each round's common positions (see the module
    docstring for the rule).

    Args:
        top, keep: the DGP band fractions (defaults 0.05 / 0.20), the same the clients
            would use for plain DGP.

    State: the current :class:`AlignedPositions` (``positions``, ``None`` before
    :meth:`choose`) and the round counter; ``state_dict``/``load_state_dict`` save and
    restore them.
    """

    def __init__(self, top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP) -> None:
        check_fractions(top, keep)
        self.top = float(top)
        self.keep = float(keep)
        self.positions: Optional[AlignedPositions] = None
        self.round = 0

    def _band(self, tensors: Sequence[Tensor], name: str) -> Tuple[Tensor, ...]:
        tensors = check_grad_list(tensors, name)
        out = []
        for i, t in enumerate(tensors):  # layers may differ in dtype/device, so one by one
            idx, _ = ops.select(t.detach(), self.top, self.keep)
            out.append(idx.cpu())
        return tuple(out)

    def choose(self, own_grads: Sequence[Tensor]) -> AlignedPositions:
        """This round's positions: the band of ``own_grads`` per layer — under the default
        rule the broadcaster's own ``g + e`` (see the module docstring), under the
        "aggregate" option its gradient in round 1 only."""
        idx = self._band(own_grads, "own_grads")
        self.positions = AlignedPositions(idx, tuple(g.numel() for g in own_grads), self.round)
        return self.positions

    def observe(self, update: Union[Sequence[Tensor], SparsePayload]) -> AlignedPositions:
        """Feed back the round's aggregated update; returns the next round's positions: its
        band per layer.

        ``update`` is either dense (one tensor per layer, any shapes with the layers'
        numels) or the aligned aggregate :class:`SparsePayload` of this round (from
        :func:`aggregate_aligned`), which is scattered at the current positions first.
        """
        if self.positions is None:
            raise RuntimeError("Broadcaster.observe() before choose(): round 1 needs choose(own_grads)")
        if isinstance(update, SparsePayload):
            update = decompress_aligned(update, self.positions, [(n,) for n in self.positions.numels])
        update = check_grad_list(update, "update")
        numels = tuple(u.numel() for u in update)
        if numels != self.positions.numels:
            raise ValueError(
                f"update has layer sizes {list(numels)} but the broadcaster's layers are "
                f"{list(self.positions.numels)}"
            )
        idx = self._band(update, "update")
        self.round += 1
        self.positions = AlignedPositions(idx, numels, self.round)
        return self.positions

    def state_dict(self) -> Dict[str, Any]:
        pos = self.positions
        return {
            "top": self.top,
            "keep": self.keep,
            "round": self.round,
            "positions": None
            if pos is None
            else {"indices": [i.clone() for i in pos.indices], "numels": list(pos.numels), "round": pos.round},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("top", "keep"):
            if float(state[key]) != getattr(self, key):
                raise ValueError(
                    f"state was saved with {key}={state[key]!r} but this broadcaster has "
                    f"{key}={getattr(self, key)!r}"
                )
        self.round = int(state["round"])
        self.positions = _positions_from_state(state["positions"])


def _positions_from_state(p: Optional[Dict[str, Any]]) -> Optional[AlignedPositions]:
    if p is None:
        return None
    return AlignedPositions(
        tuple(i.clone() for i in p["indices"]), tuple(int(n) for n in p["numels"]), int(p["round"])
    )


@register_compressor("adgp")
class ADGPCompressor(Compressor):
    """One ADGP client: sends values at the broadcaster's positions, keeps the rest.

    Call :meth:`set_positions` with the round's :class:`AlignedPositions` before
    :meth:`compress` (they stay in force until replaced). The payload is
    ``SparsePayload(aligned=True)`` with ``indices=None`` and ``k = len(positions[i])``
    values per layer, in ``value_dtype``.

    Args:
        error_feedback: keep everything not sent in the residual (default True; off sends
            ``g`` at the positions and drops the rest).
        value_dtype: ``float32`` (default), ``bfloat16`` or ``float16``; with error
            feedback the rounding error goes back into the residual, as in ``dgp``.
    """

    def __init__(
        self, error_feedback: bool = True, value_dtype: Union[str, torch.dtype] = torch.float32
    ) -> None:
        super().__init__()
        self.error_feedback = check_bool(error_feedback, "error_feedback")
        self.value_dtype = check_value_dtype(value_dtype)
        self.positions: Optional[AlignedPositions] = None

    def params(self) -> Dict[str, Any]:
        return {"error_feedback": self.error_feedback, "value_dtype": dtype_name(self.value_dtype)}

    def set_positions(self, positions: AlignedPositions) -> None:
        """Receive the broadcaster's positions for the coming round(s)."""
        self.positions = _check_positions(positions)

    def compress(self, grads: Sequence[Tensor]) -> SparsePayload:
        grads = check_grad_list(grads)
        pos = self.positions
        if pos is None:
            raise RuntimeError("ADGPCompressor.compress() before set_positions(): no positions for this round")
        numels = tuple(g.numel() for g in grads)
        if numels != pos.numels:
            raise ValueError(
                f"grads have layer sizes {list(numels)} but the positions are for "
                f"{list(pos.numels)}"
            )
        residuals = self.memory.residuals(grads) if self.error_feedback else None
        vs = error_feedback_values(grads, residuals)
        layers = []
        for i, v in enumerate(vs):
            idx = pos.indices[i].to(v.device)
            sent, err = cast_values(v[idx], self.value_dtype)
            if residuals is not None:
                e = residuals[i].view(-1)
                e.copy_(v)
                e[idx] = 0 if err is None else err
            layers.append(LayerPayload(numel=v.numel(), indices=None, values=sent))
        self.rounds += 1
        return SparsePayload(layers=tuple(layers), aligned=True)

    def decompress(
        self, payload: SparsePayload, like: Sequence[Like], *, dtype: torch.dtype = torch.float32
    ) -> List[Tensor]:
        """Dense tensors from an aligned payload at this client's current positions (a
        non-aligned payload is decompressed generically)."""
        if not payload.aligned:
            return super().decompress(payload, like, dtype=dtype)
        if self.positions is None:
            raise RuntimeError("ADGPCompressor.decompress() of an aligned payload needs set_positions() first")
        return decompress_aligned(payload, self.positions, like, dtype=dtype)

    def _extra_state(self) -> Dict[str, Any]:
        pos = self.positions
        return {
            "positions": None
            if pos is None
            else {"indices": [i.clone() for i in pos.indices], "numels": list(pos.numels), "round": pos.round}
        }

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        self.positions = _positions_from_state(state.get("positions"))

    def reset(self) -> None:
        """Residuals and round counter back to zero; the positions are kept (they are the
        broadcaster's, not this client's state)."""
        super().reset()


def _check_aligned(payload: SparsePayload, positions: AlignedPositions, what: str) -> None:
    if not isinstance(payload, SparsePayload):
        raise TypeError(f"{what} must be a SparsePayload, got {type(payload).__name__}")
    if not payload.aligned:
        raise PayloadError(f"{what} is not aligned (aligned=False); ADGP expects values-only uploads")
    if len(payload.layers) != len(positions.indices):
        raise PayloadError(
            f"{what} has {len(payload.layers)} layers but the positions have {len(positions.indices)}"
        )
    for i, (layer, idx, n) in enumerate(zip(payload.layers, positions.indices, positions.numels)):
        if layer.indices is not None:
            raise PayloadError(f"{what} layer {i}: an aligned layer must not carry indices")
        if layer.numel != n:
            raise PayloadError(f"{what} layer {i}: numel {layer.numel}, positions are for numel {n}")
        if layer.k != idx.numel():
            raise PayloadError(
                f"{what} layer {i}: {layer.k} values but the round has {idx.numel()} positions"
            )


def aggregate_aligned(
    payloads: Sequence[SparsePayload],
    positions: AlignedPositions,
    weights: Optional[Sequence[float]] = None,
) -> SparsePayload:
    """Server side: the (weighted) mean of aligned uploads, as one aligned payload.

    Args:
        payloads: the round's aligned client payloads (at least one).
        positions: the round's :class:`AlignedPositions`.
        weights: optional non-negative per-client weights (e.g. sample counts) with a
            positive sum; default equal weights.

    Returns:
        ``SparsePayload(aligned=True)`` whose layer ``i`` holds float32
        ``sum_c w_c * values_c / sum_c w_c`` at ``positions.indices[i]`` (same ``k`` per
        layer as one upload: the download is as sparse as an upload). Clients are summed in
        the given order in float32, so the result is deterministic.

    Every payload is checked before anything is summed; a misfit raises
    :class:`PayloadError` naming the client and layer.
    """
    positions = _check_positions(positions)
    if isinstance(payloads, SparsePayload) or not isinstance(payloads, (list, tuple)) or not payloads:
        raise ValueError("payloads must be a non-empty list of aligned SparsePayloads")
    if weights is None:
        w = [1.0] * len(payloads)
    else:
        if len(weights) != len(payloads):
            raise ValueError(f"weights has {len(weights)} entries for {len(payloads)} payloads")
        w = [float(x) for x in weights]
        if any(not (x >= 0.0) or x == float("inf") for x in w) or sum(w) <= 0.0:
            raise ValueError(f"weights must be finite, >= 0 and sum to > 0, got {list(weights)}")
    for c, p in enumerate(payloads):
        _check_aligned(p, positions, f"payload {c}")
    total = sum(w)
    layers = []
    for i, n in enumerate(positions.numels):
        first = payloads[0].layers[i].values
        acc = torch.zeros(first.numel(), dtype=torch.float32, device=first.device)
        for c, p in enumerate(payloads):
            if w[c] != 0.0:
                acc.add_(p.layers[i].values.to(device=acc.device, dtype=torch.float32), alpha=w[c])
        acc.div_(total)
        layers.append(LayerPayload(numel=n, indices=None, values=acc))
    return SparsePayload(layers=tuple(layers), aligned=True)


def decompress_aligned(
    payload: SparsePayload,
    positions: AlignedPositions,
    like: Sequence[Like],
    *,
    dtype: torch.dtype = torch.float32,
) -> List[Tensor]:
    """Dense ``dtype`` (default float32) tensors shaped like ``like`` holding an aligned
    payload's values at ``positions`` and zeros elsewhere (clients and server alike)."""
    positions = _check_positions(positions)
    shapes = check_layers_fit(payload, like)
    _check_aligned(payload, positions, "payload")
    out = []
    for layer, idx, (shape, device) in zip(payload.layers, positions.indices, shapes):
        dev = device if device is not None else layer.values.device
        dense = torch.zeros(shape.numel(), dtype=dtype, device=dev)
        dense[idx.to(dev)] = layer.values.to(device=dev, dtype=dtype)
        out.append(dense.reshape(shape))
    return out
