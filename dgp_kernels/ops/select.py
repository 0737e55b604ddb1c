"""DGP band selection ops: schemas (defined once, here), fake kernels and public wrappers.

Backends implement these schemas and register themselves for a dispatch key:

* ``csrc/cpu/select.cpp`` -> ``CPU`` (C++ radix select, SIMD, its own thread pool), when ``dgp_kernels._C`` is built;
* ``dgp_kernels/kernels/triton/ops.py`` -> ``CUDA`` (when triton and a GPU are present);
* :mod:`dgp_kernels.ops.reference` -> every key no native backend covers (the fallback).

Semantics shared by all of them (docs/semantics.md):

* shapes: ``g`` any shape and strides, ``n = g.numel()``; ``k_top = floor(top*n + 1e-6)``,
  ``k_keep = min(floor(keep*n + 1e-6), n - k_top)``; outputs have exactly ``k_keep`` entries;
* dtypes: float32, float64, float16, bfloat16; indices are int64 flat (row-major) indices,
  values have the dtype of ``g``;
* tie rule: entries are ranked by ``|x|`` descending, ties by ascending flat index;
  ``+0.0`` and ``-0.0`` tie; ``±inf`` ranks highest; the band is ranks
  ``[k_top, k_top + k_keep)``, returned sorted by index;
* NaN rule: a NaN anywhere (in ``g``, in the residual, or produced by ``g + residual``)
  raises ``ValueError`` naming the tensor, and nothing is modified.

``select_ef_multi_hint`` is ``select_ef_multi`` plus a :class:`BandHint`'s state tensor
(read and updated in place by the C++ CPU kernel; every other kernel leaves it unchanged):
the same results, cheaper analysis when the layers' boundaries moved little since the
state was written. Use it through ``select_ef_multi(..., hint=BandHint())``.

``select_ef_multi_into`` is ``select_ef_multi_hint`` with the new residuals written to
separate, caller-owned buffers (``residuals`` are only read), which lets the CPU kernel
read ``g`` and ``e`` once for layers whose hint holds. Use it through
``select_ef_multi_into(gs, residuals, residuals_out, hint=...)``; every other kernel copies
and runs the in-place op.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import reference
from .checks import (
    DEFAULT_KEEP,
    DEFAULT_TOP,
    band_counts,
    check_fractions,
    check_grad,
    check_grads,
    check_residual,
    check_residuals,
)

__all__ = [
    "select",
    "select_ef",
    "prune",
    "prune_",
    "select_multi",
    "select_ef_multi",
    "select_ef_multi_into",
    "one_sweep_available",
    "band_counts",
    "BandHint",
]

# --------------------------------------------------------------------------------------
# Schemas: the single definition of every dgp:: op. C++/Triton files only implement them.
# --------------------------------------------------------------------------------------
_lib = torch.library.Library("dgp", "DEF")
# cudagraph_unsafe: on CUDA every op reads a few flags back to the host once per call (NaN,
# sample misses), which a CUDA graph capture cannot hold; torch.compile's
# mode="reduce-overhead" leaves the ops out of its graphs. (``dgp_kernels.kernels.triton.cuda_graphs()`` makes the
# Triton backend capture and replay its own kernels instead.)
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
# The band arguments default to DEFAULT_TOP / DEFAULT_KEEP, as in the Python wrappers, so
# torch.ops.dgp.prune(g) works too. The dispatcher leaves trailing arguments equal to their
# defaults out when it calls a Python kernel, so every Python kernel of these ops (fake,
# reference, Triton) declares the same defaults.
_BAND = f"float top={DEFAULT_TOP!r}, float keep={DEFAULT_KEEP!r}"
for _schema in (
    f"select(Tensor g, {_BAND}) -> (Tensor indices, Tensor values)",
    f"select_ef(Tensor g, Tensor(a!) residual, {_BAND}) -> (Tensor indices, Tensor values)",
    f"prune(Tensor g, {_BAND}) -> Tensor",
    f"prune_(Tensor(a!) g, {_BAND}) -> ()",
    f"select_multi(Tensor[] gs, {_BAND}) -> (Tensor indices, Tensor values, Tensor offsets)",
    f"select_ef_multi(Tensor[] gs, Tensor(a!)[] residuals, {_BAND}) "
    "-> (Tensor indices, Tensor values, Tensor offsets)",
    # select_ef_multi with a BandHint's state (int64 [len(gs), HINT_COLS], read and updated
    # in place by the CPU kernel; other kernels leave it unchanged). Same results always.
    f"select_ef_multi_hint(Tensor[] gs, Tensor(a!)[] residuals, Tensor(b!) hint, {_BAND}) "
    "-> (Tensor indices, Tensor values, Tensor offsets)",
    # select_ef_multi_hint with the new residuals written to residuals_out (residuals are
    # only read): what lets the CPU kernel write while it counts (one sweep per step).
    f"select_ef_multi_into(Tensor[] gs, Tensor[] residuals, Tensor(a!)[] residuals_out, "
    f"Tensor(b!) hint, {_BAND}) -> (Tensor indices, Tensor values, Tensor offsets)",
):
    _lib.define(_schema, tags=_TAGS)

OP_NAMES = ("select", "select_ef", "prune", "prune_", "select_multi", "select_ef_multi",
            "select_ef_multi_hint", "select_ef_multi_into")
#: Columns of a hint row (csrc/cpu/select_core.h, kHintCols).
HINT_COLS = 7


# --------------------------------------------------------------------------------------
# Fake kernels: shapes only (k_keep depends on numel alone), never data.
# --------------------------------------------------------------------------------------
def _fake_k_keep(n, top: float, keep: float):
    if isinstance(n, int):
        return band_counts(n, top, keep)[1]
    # Symbolic numel (dynamic shapes): the count is a function of n the tracer cannot
    # evaluate with floor(); expose it as an unbacked size.
    return torch.library.get_ctx().new_dynamic_size()


@torch.library.register_fake("dgp::select")
def _select_fake(
    g: Tensor, top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP
) -> Tuple[Tensor, Tensor]:
    k = _fake_k_keep(g.numel(), top, keep)
    return g.new_empty((k,), dtype=torch.int64), g.new_empty((k,))


@torch.library.register_fake("dgp::select_ef")
def _select_ef_fake(
    g: Tensor, residual: Tensor, top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP
):
    return _select_fake(g, top, keep)


@torch.library.register_fake("dgp::prune")
def _prune_fake(g: Tensor, top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP) -> Tensor:
    return torch.empty_like(g, memory_format=torch.contiguous_format)


@torch.library.register_fake("dgp::prune_")
def _prune_inplace_fake(
    g: Tensor, top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP
) -> None:
    return None


def _multi_fake(gs: List[Tensor], top: float, keep: float):
    numels = [g.numel() for g in gs]
    if all(isinstance(n, int) for n in numels):
        total = sum(band_counts(n, top, keep)[1] for n in numels)
    else:  # one unbacked size for the total (per-layer sizes are not outputs)
        total = torch.library.get_ctx().new_dynamic_size()
    if gs:
        like = gs[0]
        idx = like.new_empty((total,), dtype=torch.int64)
        val = like.new_empty((total,))
        off = like.new_empty((len(gs) + 1,), dtype=torch.int64)
    else:
        idx = torch.empty((0,), dtype=torch.int64)
        val = torch.empty((0,), dtype=torch.float32)
        off = torch.empty((1,), dtype=torch.int64)
    return idx, val, off


@torch.library.register_fake("dgp::select_multi")
def _select_multi_fake(
    gs: List[Tensor], top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP
):
    return _multi_fake(gs, top, keep)


@torch.library.register_fake("dgp::select_ef_multi")
def _select_ef_multi_fake(
    gs: List[Tensor], residuals: List[Tensor], top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP
):
    return _multi_fake(gs, top, keep)


@torch.library.register_fake("dgp::select_ef_multi_hint")
def _select_ef_multi_hint_fake(
    gs: List[Tensor], residuals: List[Tensor], hint: Tensor, top: float = DEFAULT_TOP,
    keep: float = DEFAULT_KEEP
):
    return _multi_fake(gs, top, keep)


@torch.library.register_fake("dgp::select_ef_multi_into")
def _select_ef_multi_into_fake(
    gs: List[Tensor], residuals: List[Tensor], residuals_out: List[Tensor], hint: Tensor,
    top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP
):
    return _multi_fake(gs, top, keep)


# --------------------------------------------------------------------------------------
# Reference kernels, registered for the dispatch keys no native backend covers.
# --------------------------------------------------------------------------------------
def _ref_select(g, top=DEFAULT_TOP, keep=DEFAULT_KEEP):
    return reference.select(g, top, keep)


def _ref_select_ef(g, residual, top=DEFAULT_TOP, keep=DEFAULT_KEEP):
    return reference.select_ef(g, residual, top, keep)


def _ref_prune(g, top=DEFAULT_TOP, keep=DEFAULT_KEEP):
    return reference.prune(g, top, keep)


def _ref_prune_(g, top=DEFAULT_TOP, keep=DEFAULT_KEEP):
    reference.prune_(g, top, keep)


def _ref_select_multi(gs, top=DEFAULT_TOP, keep=DEFAULT_KEEP):
    return reference.select_multi(gs, top, keep)


def _ref_select_ef_multi(gs, residuals, top=DEFAULT_TOP, keep=DEFAULT_KEEP):
    return reference.select_ef_multi(gs, residuals, top, keep)


def _select_ef_multi_hint_composite(gs, residuals, hint, top=DEFAULT_TOP, keep=DEFAULT_KEEP):
    # Kernels without hint support (reference, Triton): the plain op; the hint is unchanged.
    return torch.ops.dgp.select_ef_multi(gs, residuals, top, keep)


def _select_ef_multi_into_composite(gs, residuals, residuals_out, hint, top=DEFAULT_TOP,
                                    keep=DEFAULT_KEEP):
    # Kernels without an out-of-place path (reference, Triton): copy, then the in-place op
    # on the copies (on a NaN residuals_out then holds the copies: its contents are
    # unspecified after an error either way). The hint is unchanged.
    for e_out, e in zip(residuals_out, residuals):
        e_out.copy_(e)
    return torch.ops.dgp.select_ef_multi(gs, residuals_out, top, keep)


_REFERENCE_IMPLS = {
    "select": _ref_select,
    "select_ef": _ref_select_ef,
    "prune": _ref_prune,
    "prune_": _ref_prune_,
    "select_multi": _ref_select_multi,
    "select_ef_multi": _ref_select_ef_multi,
}


# An empty list has no tensor to dispatch on: the multi ops then run this composite
# (returns empty outputs on CPU); any list with a tensor still reaches the device kernels.
_lib.impl("select_multi", _ref_select_multi, "CompositeExplicitAutograd")
_lib.impl("select_ef_multi", _ref_select_ef_multi, "CompositeExplicitAutograd")
# The hinted op on every key without a kernel of its own (the C++ CPU kernel has one).
_lib.impl("select_ef_multi_hint", _select_ef_multi_hint_composite, "CompositeExplicitAutograd")
_lib.impl("select_ef_multi_into", _select_ef_multi_into_composite, "CompositeExplicitAutograd")


def register_kernels(impls: Dict[str, Callable[..., Any]], dispatch_key: str) -> None:
    """Serve the dgp ops named in ``impls`` (op name -> implementation) for
    ``dispatch_key`` ("CPU", "CUDA"); how a backend written in Python plugs in."""
    for op, fn in impls.items():
        _lib.impl(op, fn, dispatch_key)


def register_reference(dispatch_key: str) -> None:
    """Serve every dgp op from the pure-torch reference for ``dispatch_key`` ("CPU", "CUDA")."""
    register_kernels(_REFERENCE_IMPLS, dispatch_key)


# --------------------------------------------------------------------------------------
# Public wrappers.
# --------------------------------------------------------------------------------------
_NATIVE_CPU: List[bool] = []  # [True] once known that the C++ kernel serves CPU tensors


def _native_cpu() -> bool:
    """Whether the C++ kernel serves the CPU key (it repeats every argument check, with the
    same wording, so plain CPU tensors and float fractions can skip the Python checks:
    ~1.5 us of a ~4.5 us call on a tiny tensor)."""
    if not _NATIVE_CPU:
        from .._backend import INFO

        _NATIVE_CPU.append(INFO.cpu == "cpp")
    return _NATIVE_CPU[0]


def select(g: Tensor, top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP) -> Tuple[Tensor, Tensor]:
    """Select the DGP band of one gradient tensor (sparse form).

    Args:
        g: float32/float64/float16/bfloat16 tensor of any shape and strides (not modified).
        top: fraction of entries dropped from the top of ``|g|`` (default 0.05).
        keep: fraction of entries kept (default 0.20); ``top + keep <= 1``.

    Returns:
        ``(indices, values)``: ``indices`` int64 ``[k_keep]`` flat row-major indices sorted
        ascending; ``values`` ``g.dtype`` ``[k_keep]`` = ``g.flatten()[indices]``, unchanged.
        ``k_keep = min(floor(keep*n + 1e-6), n - floor(top*n + 1e-6))``.

    Ranking is by ``|g|`` descending with ties broken by ascending flat index (``±0`` tie,
    ``±inf`` is largest); the band is ranks ``[k_top, k_top + k_keep)``. A NaN in ``g``
    raises ``ValueError``.
    """
    if type(g) is Tensor and type(top) is float and type(keep) is float and g.is_cpu and _native_cpu():
        return torch.ops.dgp.select(g, top, keep)
    check_fractions(top, keep)
    check_grad(g, "g")
    return torch.ops.dgp.select(g, float(top), float(keep))


def select_ef(
    g: Tensor, residual: Tensor, top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP,
    hint: "Optional[BandHint]" = None,
) -> Tuple[Tensor, Tensor]:
    """Band selection with fused error feedback; mutates ``residual`` in place.

    Computes ``v = g + residual`` (in ``g.dtype``), selects the band of ``v`` exactly as
    :func:`select`, returns ``(indices, values)`` of ``v``, and sets
    ``residual <- v`` with the kept positions zeroed, so ``dense(kept) + residual_new ==
    g + residual_old``. ``residual`` must match ``g`` in shape, dtype and device. No
    temporary of size ``n`` is allocated (for contiguous inputs). On a NaN in ``g + residual``
    a ``ValueError`` is raised and ``residual`` is left unchanged. ``hint``: an optional
    :class:`BandHint` for this one layer, carried from step to step.
    """
    if hint is not None:
        check_fractions(top, keep)
        check_grad(g, "g")
        check_residual(g, residual, "residual")
        _check_hint(hint)
        idx, val, _ = torch.ops.dgp.select_ef_multi_hint([g], [residual], hint._for(1),
                                                         float(top), float(keep))
        return idx, val
    if (type(g) is Tensor and type(residual) is Tensor and type(top) is float
            and type(keep) is float and g.is_cpu and residual.is_cpu and _native_cpu()):
        return torch.ops.dgp.select_ef(g, residual, top, keep)
    check_fractions(top, keep)
    check_grad(g, "g")
    check_residual(g, residual, "residual")
    return torch.ops.dgp.select_ef(g, residual, float(top), float(keep))


def prune(g: Tensor, top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP) -> Tensor:
    """Dense form of :func:`select`: a new contiguous tensor shaped like ``g`` holding the
    band's values and zeros elsewhere. ``g`` is not modified. Same tie and NaN rules."""
    check_fractions(top, keep)
    check_grad(g, "g")
    return torch.ops.dgp.prune(g, float(top), float(keep))


def prune_(g: Tensor, top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP) -> Tensor:
    """In-place :func:`prune`: zeroes every entry of ``g`` outside the band; returns ``g``.
    On a NaN, ``ValueError`` is raised and ``g`` is unchanged."""
    check_fractions(top, keep)
    check_grad(g, "g")
    torch.ops.dgp.prune_(g, float(top), float(keep))
    return g


def select_multi(
    gs: Sequence[Tensor], top: float = DEFAULT_TOP, keep: float = DEFAULT_KEEP
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`select` for every tensor of a list in one call (each tensor is its own layer).

    Args:
        gs: list of tensors sharing one dtype and device (any shapes).

    Returns:
        ``(indices, values, offsets)``: layer ``i``'s entries are
        ``indices[offsets[i]:offsets[i+1]]`` (int64 flat indices local to ``gs[i]``, sorted)
        and ``values[offsets[i]:offsets[i+1]]`` (dtype of ``gs``); ``offsets`` is int64
        ``[len(gs) + 1]``. A NaN raises ``ValueError`` naming ``gs[i]``.
    """
    check_fractions(top, keep)
    check_grads(gs, "gs")
    return torch.ops.dgp.select_multi(list(gs), float(top), float(keep))


class BandHint:
    """Opt-in state that makes repeated error-feedback selections of the same layers cheaper.

    In a training loop the same layers are selected every step and their two band
    boundaries (the magnitudes at ranks ``k_top`` and ``k_top + k_keep - 1``) move little.
    Pass one ``BandHint`` per layer list, the same object every step
    (``select_ef_multi(gs, residuals, hint=h)``): after each call it holds, per layer, the
    exact boundary keys, their last moves and a margin around each (twice the last
    prediction error, at least 0.2% relative). While both boundaries of a layer stay inside their margins, the C++ CPU
    kernel finds them with one counting sweep over ``g + residual`` (no sampling, no
    histograms) before the write sweep; when one leaves its margin (or a margin holds too
    many entries) that layer takes the unhinted path, which costs one extra sweep.

    Results are bit-identical with and without a hint, whatever it holds: it only
    changes the time. Layers of up to 2^15 entries do not use it (their direct path is
    cheaper). Kernels other than the C++ CPU one (reference, Triton) ignore it and leave it
    unchanged. On a NaN the call raises and the hint, like the residuals, is unchanged.

    ``state`` is ``None`` until first use, then an int64 CPU tensor ``[len(gs), 7]``
    (rows: key width of the dtype, high key, low key, high margin, low margin, last move
    of the high key, of the low key; brackets are centred on key + last move; a row of
    zeros is empty). It is re-created empty when the number of layers changes; ``reset()``
    empties it (after a big jump, e.g. a learning-rate change, to skip the misses).
    """

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: Optional[Tensor] = None

    def reset(self) -> None:
        self.state = None

    def _for(self, n_layers: int) -> Tensor:
        st = self.state
        if (not isinstance(st, Tensor) or st.dtype != torch.int64 or st.device.type != "cpu"
                or tuple(st.shape) != (n_layers, HINT_COLS) or not st.is_contiguous()):
            st = torch.zeros((n_layers, HINT_COLS), dtype=torch.int64)
            self.state = st
        return st

    def __repr__(self) -> str:
        if self.state is None:
            return "BandHint(empty)"
        used = int((self.state[:, 0] != 0).sum())
        return f"BandHint({used} of {self.state.shape[0]} layers)"


def _check_hint(hint: object) -> None:
    if not isinstance(hint, BandHint):
        raise TypeError(f"hint must be a dgp_kernels.BandHint or None, got {type(hint).__name__}")


def select_ef_multi(
    gs: Sequence[Tensor],
    residuals: Sequence[Tensor],
    top: float = DEFAULT_TOP,
    keep: float = DEFAULT_KEEP,
    hint: Optional[BandHint] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`select_ef` for every layer of a model in one call.

    ``residuals[i]`` pairs with ``gs[i]`` (same shape, dtype, device) and is mutated in
    place. Returns ``(indices, values, offsets)`` as :func:`select_multi`. Every layer is
    checked for NaN before any residual is written, so on error nothing is modified.
    ``hint``: an optional :class:`BandHint` carried from step to step (read and updated;
    the results do not depend on it).
    """
    check_fractions(top, keep)
    check_grads(gs, "gs")
    check_residuals(gs, residuals)
    if hint is None:
        return torch.ops.dgp.select_ef_multi(list(gs), list(residuals), float(top), float(keep))
    _check_hint(hint)
    gs = list(gs)
    return torch.ops.dgp.select_ef_multi_hint(gs, list(residuals), hint._for(len(gs)),
                                              float(top), float(keep))


def select_ef_multi_into(
    gs: Sequence[Tensor],
    residuals: Sequence[Tensor],
    residuals_out: Sequence[Tensor],
    top: float = DEFAULT_TOP,
    keep: float = DEFAULT_KEEP,
    hint: Optional[BandHint] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`select_ef_multi` with the new residuals written to ``residuals_out``.

    One error-feedback step per layer, out of place: with ``v = gs[i] + residuals[i]``,
    ``residuals_out[i]`` receives ``v`` with the sent positions zeroed, exactly what
    ``select_ef_multi`` leaves in ``residuals[i]``; ``residuals`` are only read. Returns
    ``(indices, values, offsets)`` as :func:`select_multi`, bit-identical to
    ``select_ef_multi``. ``residuals_out[i]``: contiguous, same shape, dtype and device as
    ``gs[i]``, sharing no memory with any tensor of ``gs``, ``residuals`` or another
    ``residuals_out``; its contents on entry are ignored. A training loop keeps two residual
    buffers per layer and swaps them after each successful call.

    Why: with the old residual intact whatever happens, the C++ CPU kernel may write while
    it counts. For a layer whose :class:`BandHint` brackets still hold, it reads ``g`` and
    ``e`` once, writing ``residuals_out`` and gathering the entries inside the brackets, and
    then fixes up only those (in-place error feedback needs a counting sweep before it may
    write; every float dtype on CPUs with AVX2 or AVX-512, see :func:`one_sweep_available`).
    Other layers, misses, CPUs without AVX2 and other kernels copy ``residuals`` into
    ``residuals_out`` and run the in-place path there.

    On a NaN (same rule and message as ``select_ef_multi``): ``ValueError``; ``residuals``
    and ``hint`` are unchanged, ``residuals_out`` holds unspecified values.
    ``hint``: as in :func:`select_ef_multi` (without one, every layer takes the copy path).
    """
    check_fractions(top, keep)
    check_grads(gs, "gs")
    check_residuals(gs, residuals)
    gs, residuals, residuals_out = list(gs), list(residuals), list(residuals_out)
    if len(residuals_out) != len(gs):
        raise ValueError(f"residuals_out has {len(residuals_out)} tensors but gs has {len(gs)}; "
                         "they must pair up one output residual per gradient")
    for i, (g, e) in enumerate(zip(gs, residuals_out)):
        check_residual(g, e, f"residuals_out[{i}]")
    if hint is None:
        state = torch.zeros((len(gs), HINT_COLS), dtype=torch.int64)
    else:
        _check_hint(hint)
        state = hint._for(len(gs))
    return torch.ops.dgp.select_ef_multi_into(gs, residuals, residuals_out, state, float(top),
                                              float(keep))


def one_sweep_available(dtype: torch.dtype, device: Union[str, torch.device] = "cpu") -> bool:
    """Whether :func:`select_ef_multi_into` reads ``g`` and ``e`` once for hinted layers of
    this dtype and device here: the C++ CPU kernel on a CPU with AVX2 or AVX-512 (every
    float dtype).
    Elsewhere it is correct but copies each residual and runs the in-place path, so
    :func:`select_ef_multi` with a hint is the faster call there."""
    if torch.device(device).type != "cpu" or not _native_cpu():
        return False
    from .. import _C

    return bool(_C.one_sweep(str(dtype).replace("torch.", "")))


def split_multi(
    indices: Tensor, values: Tensor, offsets: Tensor
) -> List[Tuple[Tensor, Tensor]]:
    """Split the flat output of the multi-tensor ops into per-layer ``(indices, values)``."""
    off = offsets.tolist()
    return [(indices[a:b], values[a:b]) for a, b in zip(off[:-1], off[1:])]
