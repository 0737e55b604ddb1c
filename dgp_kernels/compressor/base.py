"""GRACE-style compressor interface: a :class:`Compressor` (compress/decompress) and a
:class:`Memory` (per-tensor error-feedback residuals), plus the registry by name.

One compressor object serves **one client**: it owns that client's residuals and random
state, so ``compress`` is called once per round with the client's whole gradient list
(one tensor per model parameter, in model order). What it returns is a typed
:class:`~dgp_kernels.codec.payload.SparsePayload`; bytes are made by the codec, never here.

Adding a compressor: subclass :class:`Compressor`, validate every constructor argument
(``TypeError``/``ValueError`` naming it), implement ``compress`` (and ``decompress`` only
when the generic dense scatter is not enough), put any random state in a
:class:`torch.Generator` made with :meth:`Compressor._make_generator`, and decorate the
class with ``@register_compressor("name")``. See ``README.md`` beside this file.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..checks import VALUE_DTYPES, check_dtype, dtype_name
from ..codec.payload import PayloadError, SparsePayload
from ..ops import SUPPORTED_DTYPES
from ..registry import Registry

__all__ = [
    "Compressor",
    "Memory",
    "COMPRESSORS",
    "register_compressor",
    "get_compressor",
    "available_compressors",
    "VALUE_DTYPES",
]

#: Version of the dict layout written by :meth:`Compressor.state_dict`.
STATE_VERSION = 1

Like = Union[Tensor, torch.Size, Tuple[int, ...], List[int]]


# --------------------------------------------------------------------------------------
# Argument checks (once, at construction; errors name the parameter).
# --------------------------------------------------------------------------------------
def check_value_dtype(value: object, name: str = "value_dtype") -> torch.dtype:
    """Accept ``torch.float32``/``bfloat16``/``float16`` or their names; return the dtype."""
    return check_dtype(value, name, VALUE_DTYPES)


def check_grad_list(grads: object, name: str = "grads") -> List[Tensor]:
    """The boundary check of ``compress``: a list/tuple of supported floating tensors."""
    if isinstance(grads, Tensor) or not isinstance(grads, (list, tuple)):
        raise TypeError(
            f"{name} must be a list or tuple of tensors (one per model tensor), "
            f"got {type(grads).__name__}"
        )
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(g).__name__}")
        if g.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name}[{i}] has dtype {g.dtype}; compressors support float32, float64, "
                "float16 and bfloat16"
            )
    return list(grads)


def check_no_nan(grads: Sequence[Tensor], name: str = "grads", *, finite: bool = False) -> None:
    """Raise ``ValueError`` naming the first tensor holding NaN (or inf when ``finite``)."""
    for i, g in enumerate(grads):
        if g.numel() == 0:
            continue
        if finite:
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"{name}[{i}] contains NaN or inf; this compressor needs finite gradients")
        elif bool(torch.isnan(g).any()):
            raise ValueError(f"{name}[{i}] contains NaN")


# --------------------------------------------------------------------------------------
# Memory: the error-feedback residual store.
# --------------------------------------------------------------------------------------
class Memory:
    """Per-tensor error-feedback residuals of one client (GRACE's ``Memory``).

    Residual ``i`` pairs with gradient ``i`` of the list passed to ``compress``. Residuals
    are created lazily, as zeros shaped like the gradient (same shape, dtype and device,
    contiguous), the first time :meth:`residuals` sees the list. Later calls check that the
    list still matches (same length, and per tensor the same shape, dtype and device) and
    raise ``ValueError`` saying which tensor changed: a silently re-created residual would
    drop the error the client still owes.

    The compressor mutates the returned tensors in place (the fused ``select_ef`` ops write
    ``v = g + e`` into them and zero the sent positions); the memory only stores them.
    """

    def __init__(self) -> None:
        self._residuals: Optional[List[Tensor]] = None

    def __len__(self) -> int:
        return 0 if self._residuals is None else len(self._residuals)

    @property
    def initialized(self) -> bool:
        return self._residuals is not None

    def residuals(self, grads: Sequence[Tensor]) -> List[Tensor]:
        """The residuals for ``grads`` (created as zeros on first use); mutable, not copies."""
        if self._residuals is None:
            if not grads:  # an empty round does not fix the model's layout
                return []
            self._residuals = [
                torch.zeros(g.shape, dtype=g.dtype, device=g.device) for g in grads
            ]
            return self._residuals
        res = self._residuals
        if len(res) != len(grads):
            raise ValueError(
                f"the memory holds residuals for {len(res)} tensors but {len(grads)} "
                "gradients were given; the model changed since the last round (call "
                "reset() to start over, or load a matching state)"
            )
        for i, (g, e) in enumerate(zip(grads, res)):
            if e.shape != g.shape or e.dtype != g.dtype or e.device != g.device:
                raise ValueError(
                    f"residual {i} is {tuple(e.shape)} {e.dtype} on {e.device} but "
                    f"grads[{i}] is {tuple(g.shape)} {g.dtype} on {g.device}; the model "
                    "changed since the last round (call reset() to start over, or load a "
                    "matching state)"
                )
        return res

    def peek(self) -> Optional[List[Tensor]]:
        """The stored residuals (``None`` before the first round); do not mutate."""
        return self._residuals

    def reset(self) -> None:
        self._residuals = None

    def state_dict(self) -> Dict[str, Any]:
        """A snapshot (clones): ``{"residuals": None | list of tensors}``."""
        res = None if self._residuals is None else [e.detach().clone() for e in self._residuals]
        return {"residuals": res}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or "residuals" not in state:
            raise ValueError("memory state must be a dict with a 'residuals' entry")
        res = state["residuals"]
        if res is None:
            self._residuals = None
            return
        if not isinstance(res, (list, tuple)) or not all(isinstance(e, Tensor) for e in res):
            raise TypeError("memory state 'residuals' must be None or a list of tensors")
        self._residuals = [e.detach().clone().contiguous() for e in res]


# --------------------------------------------------------------------------------------
# Value casting with error feedback of the rounding error.
# --------------------------------------------------------------------------------------
def _lossless(src: torch.dtype, dst: torch.dtype) -> bool:
    return src == dst or (dst == torch.float32 and src in (torch.float16, torch.bfloat16))


def error_feedback_values(
    grads: Sequence[Tensor], residuals: Optional[Sequence[Tensor]]
) -> List[Tensor]:
    """Flat ``v = g + e`` per layer (``g`` alone without error feedback), checked for NaN.

    Raises ``ValueError`` naming the tensor before anything is modified.
    """
    vs: List[Tensor] = []
    for i, g in enumerate(grads):
        v = g.detach().reshape(-1)
        if residuals is not None:
            v = v + residuals[i].view(-1)
        vs.append(v)
    check_no_nan(vs, "grads + residuals" if residuals is not None else "grads")
    return vs


def cast_values(values: Tensor, value_dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """Cast selected values to the payload's value dtype.

    Returns ``(sent, err)`` where ``err`` (dtype of ``values``) is ``values - decoded(sent)``,
    or ``None`` when the cast is exact. Finite values beyond the value dtype's range are
    saturated to its largest finite value (fp16 tops out at 65504) instead of becoming inf;
    ``±inf`` stays ``±inf`` with zero error. For every value that is not saturated ``err``
    is exact: ``decoded`` is ``values`` rounded to fewer mantissa bits, so by Sterbenz's
    lemma the difference is representable, and ``decoded + err == values`` bitwise.
    A saturated entry's error ``v - 65504`` is computed in ``values.dtype`` (rounded only for
    ``|v| > 131008``).
    """
    if _lossless(values.dtype, value_dtype):
        return values.to(value_dtype), None
    x = values
    fmax = torch.finfo(value_dtype).max
    if fmax < torch.finfo(values.dtype).max:
        x = torch.where(torch.isinf(x), x, x.clamp(-fmax, fmax))
    sent = x.to(value_dtype)
    decoded = sent.to(values.dtype)
    err = torch.where(decoded == values, torch.zeros_like(values), values - decoded)
    return sent, err


# --------------------------------------------------------------------------------------
# Compressor base.
# --------------------------------------------------------------------------------------
class Compressor(ABC):
    """One client's gradient compressor (GRACE-style), producing typed payloads.

    Contract:

    * ``compress(grads)`` takes the client's gradients for one round — a list of tensors,
      one per model tensor, in model order, any float dtype (float32/64/16, bfloat16) —
      and returns a :class:`SparsePayload` with one :class:`LayerPayload` per tensor
      (``numel`` of the tensor, int64 flat row-major ``indices`` sorted ascending or
      ``None`` for dense/aligned layers, ``values`` in the compressor's value dtype).
      Payload tensors live on the gradients' device. ``grads`` is never modified; the
      compressor's own :class:`Memory` and random generator are updated.
    * ``decompress(payload, like)`` returns dense tensors shaped like ``like`` (tensors or
      shapes), **float32 by default** — the server accumulation dtype, and exact for every
      value dtype a payload carries — or ``dtype=``. Positions not sent are zero.
    * ``state_dict()`` / ``load_state_dict()`` snapshot and restore everything that
      decides future payloads (residuals, generator state, round counter), so a client
      restored from a checkpoint produces bitwise identical payloads. Values are tensors,
      ints, strings and ``None`` only (``torch.save``-able).
    * ``reset()`` returns the compressor to its just-constructed state (zero residuals,
      generator re-seeded with the same seed).

    Subclasses set ``name`` (via :func:`register_compressor`) and implement
    :meth:`compress` and :meth:`params`.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.memory = Memory()
        self.rounds = 0  # completed compress() calls
        self._generator: Optional[torch.Generator] = None
        self._seed: Optional[int] = None

    # ---- to implement ----------------------------------------------------------------
    @abstractmethod
    def compress(self, grads: Sequence[Tensor]) -> SparsePayload:
        """Compress one round of this client's gradients (see the class docstring)."""

    @abstractmethod
    def params(self) -> Dict[str, Any]:
        """The constructor arguments, as given (dtypes by name); ``get_compressor(name,
        **params())`` builds an equivalent compressor."""

    # ---- random state ----------------------------------------------------------------
    def _make_generator(self, seed: Optional[int]) -> torch.Generator:
        """A CPU generator seeded with ``seed`` (a fresh OS-entropy seed when ``None``).

        Random draws are made on the CPU and moved to the gradients' device, so a seeded
        compressor draws the same numbers on every device (bitwise the same payload where
        the rest is elementwise, e.g. ``randk`` and ``dp``; ``qsgd``'s norm is a reduction
        whose last bit may differ between devices).
        """
        self._seed = secrets.randbits(63) if seed is None else int(seed)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self._seed)
        self._generator = gen
        return gen

    # ---- generic decompression -------------------------------------------------------
    def decompress(
        self, payload: SparsePayload, like: Sequence[Like], *, dtype: torch.dtype = torch.float32
    ) -> List[Tensor]:
        """Dense tensors (``dtype``, default float32) shaped like ``like`` from ``payload``.

        ``like[i]`` is a tensor (its shape and device are used) or a shape. Raises
        :class:`PayloadError` when the payload does not fit ``like`` (layer count, numel,
        index count or range) or is an aligned payload (use the ADGP helpers, which know
        the positions).
        """
        return decompress_payload(payload, like, dtype=dtype)

    # ---- state ------------------------------------------------------------------------
    def _extra_state(self) -> Dict[str, Any]:
        """Subclass state beyond memory/generator/rounds (override when there is some)."""
        return {}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        """Snapshot: ``{"version", "compressor", "params", "rounds", "seed", "rng",
        "memory", "extra"}``; tensors are clones, so later rounds do not alter it."""
        return {
            "version": STATE_VERSION,
            "compressor": self.name,
            "params": _params_for_state(self.params()),
            "rounds": self.rounds,
            "seed": self._seed,
            "rng": None if self._generator is None else self._generator.get_state().clone(),
            "memory": self.memory.state_dict(),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a compressor of the same name and parameters
        (``seed`` may differ: the saved generator state and seed replace it).

        Raises ``ValueError`` naming the mismatch; nothing is changed on error.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = [k for k in ("version", "compressor", "params", "memory") if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}; it does not come from state_dict()")
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"state version {state['version']!r} is not supported (expected {STATE_VERSION})"
            )
        if state["compressor"] != self.name:
            raise ValueError(
                f"state was saved by compressor {state['compressor']!r}, cannot load it into {self.name!r}"
            )
        mine = _params_for_state(self.params())
        theirs = dict(state["params"])
        for key in sorted(set(mine) | set(theirs)):
            if key == "seed":
                continue
            if mine.get(key) != theirs.get(key):
                raise ValueError(
                    f"state was saved with {key}={theirs.get(key)!r} but this {self.name!r} "
                    f"compressor has {key}={mine.get(key)!r}"
                )
        rng = state.get("rng")
        if (rng is None) != (self._generator is None):
            raise ValueError("state and compressor disagree on having a random generator")
        # All checks passed: apply.
        self.memory.load_state_dict(state["memory"])
        self.rounds = int(state.get("rounds", 0))
        if rng is not None:
            self._seed = state.get("seed")
            self._generator.set_state(rng.clone())
            if hasattr(self, "seed"):  # params() then reports the seed the state came from
                self.seed = theirs.get("seed")
        self._load_extra_state(state.get("extra") or {})

    def reset(self) -> None:
        """Back to the just-constructed state: no residuals, generator re-seeded, round 0."""
        self.memory.reset()
        self.rounds = 0
        if self._generator is not None:
            self._generator.manual_seed(self._seed)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _params_for_state(params: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in params.items()}


def _like_shape(x: Like, i: int) -> Tuple[torch.Size, Optional[torch.device]]:
    if isinstance(x, Tensor):
        return x.shape, x.device
    if isinstance(x, (torch.Size, tuple, list)) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in x
    ):
        return torch.Size(x), None
    raise TypeError(f"like[{i}] must be a tensor or a shape (tuple of ints), got {x!r}")


def check_layers_fit(payload: SparsePayload, like: Sequence[Like]) -> List[Tuple[torch.Size, Optional[torch.device]]]:
    """Shapes/devices of ``like`` after checking the payload has one fitting layer each."""
    if not isinstance(payload, SparsePayload):
        raise TypeError(f"payload must be a SparsePayload, got {type(payload).__name__}")
    if isinstance(like, Tensor) or not isinstance(like, (list, tuple)):
        raise TypeError(f"like must be a list or tuple of tensors or shapes, got {type(like).__name__}")
    shapes = [_like_shape(x, i) for i, x in enumerate(like)]
    if len(payload.layers) != len(shapes):
        raise PayloadError(
            f"payload has {len(payload.layers)} layers but {len(shapes)} tensors were expected"
        )
    for i, (layer, (shape, _)) in enumerate(zip(payload.layers, shapes)):
        if layer.numel != shape.numel():
            raise PayloadError(
                f"layer {i}: payload numel {layer.numel} does not match the expected tensor "
                f"of shape {tuple(shape)} (numel {shape.numel()})"
            )
    return shapes


def decompress_payload(
    payload: SparsePayload, like: Sequence[Like], *, dtype: torch.dtype = torch.float32
) -> List[Tensor]:
    """Scatter a non-aligned payload into dense ``dtype`` tensors shaped like ``like``."""
    shapes = check_layers_fit(payload, like)
    if payload.aligned:
        raise PayloadError(
            "payload is aligned (ADGP): its positions are not in it; decompress it with "
            "dgp_kernels.compressor.decompress_aligned(payload, positions, like)"
        )
    out: List[Tensor] = []
    for i, (layer, (shape, device)) in enumerate(zip(payload.layers, shapes)):
        dev = device if device is not None else layer.values.device
        values = layer.values.to(device=dev, dtype=dtype)
        if layer.indices is None:
            if layer.k != layer.numel:
                raise PayloadError(
                    f"layer {i}: no indices but {layer.k} values for {layer.numel} entries "
                    "(a dense layer needs one value per entry)"
                )
            out.append(values.reshape(shape).clone())
            continue
        idx = layer.indices
        if idx.numel() != layer.k:
            raise PayloadError(f"layer {i}: {idx.numel()} indices but {layer.k} values")
        dense = torch.zeros(shape.numel(), dtype=dtype, device=dev)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= layer.numel:
                raise PayloadError(
                    f"layer {i}: index out of range [0, {layer.numel}) (min {lo}, max {hi})"
                )
            dense[idx.to(dev)] = values
        out.append(dense.reshape(shape))
    return out


# --------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------
#: The compressors by name (``none``, ``dgp``, ``adgp``, ``topk``, ``randk``, ``dp``, ``qsgd``).
COMPRESSORS: Registry[Compressor] = Registry("compressor", Compressor)

#: Class decorator: make ``get_compressor(name, **params)`` build this class.
register_compressor = COMPRESSORS.register
#: Registered compressor names, sorted.
available_compressors = COMPRESSORS.names


def get_compressor(name: str, **params: Any) -> Compressor:
    """Build the compressor registered as ``name`` with keyword ``params``.

    Raises ``ValueError`` listing the known names for an unknown ``name``; ``TypeError``
    naming an unknown parameter (and listing the accepted ones); the constructor's own
    ``TypeError``/``ValueError`` naming a parameter of the wrong type or value.
    """
    return COMPRESSORS.build(name, **params)
