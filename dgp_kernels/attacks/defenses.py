"""The attack-side defenses: what an eavesdropper or the server sees of one client's gradient.

As in the DGP paper's attack evaluation, each defense is the *single-round*
operator applied to the shared gradient, without error feedback (error feedback changes what
is sent in later rounds, not what one round's upload reveals). It runs through the registered
compressors (:func:`dgp_kernels.compressor.get_compressor`) and the real wire codec: the
payload is encoded to bytes (their length is the upload size) and decoded back, and the
attacker gets the dense float32 gradient the server would rebuild from those bytes.

Defense specs are strings ``name[:param=value,param=value]``:

=========  =================================  ================================================
name       parameters (defaults)              meaning
=========  =================================  ================================================
none       value_dtype (float32)              the gradient as is
dgp        top (0.05), keep (0.2),            dual gradient pruning: drop the ``top`` largest
           value_dtype (float32),             magnitudes, send the next ``keep`` fraction;
           top_feedback (full)                ``top_feedback`` (full, clipped, floor, drop) is
                                              what error feedback keeps of the top band, so
                                              it matters only with error feedback (the
                                              multi-round attacker), never in one round
adgp       top (0.05), keep (0.2),            aligned DGP: the victim's values at the
           value_dtype (float32)              positions a broadcaster chose as the DGP band
                                              of *its own* gradient (``broadcaster_grads``,
                                              see below); values only on the wire
topk       keep (0.2), value_dtype            classic pruning: send the ``keep`` largest
randk      keep (0.2), value_dtype            a random ``keep`` fraction
dp         sigma | noise_multiplier, clip     Gaussian noise of std ``sigma`` on every entry;
                                              without ``clip`` nothing is clipped (the DLG
                                              paper's noise defense); with ``clip`` the update
                                              is clipped to L2 norm ``clip`` first and ``sigma``
                                              (or ``noise_multiplier * clip``) is the std
qsgd       levels (127)                       QSGD stochastic quantisation
=========  =================================  ================================================

``value_dtype`` is ``float32``, ``bfloat16`` or ``float16``. Randomised defenses (randk, dp,
qsgd) are seeded by the caller's ``seed``. Unknown names or parameters, bad values and
malformed specs raise ``ValueError`` naming the spec and what is allowed.

**adgp** (:mod:`dgp_kernels.compressor.adgp`): in aligned DGP every client of a round sends
values at the same positions per layer, which a trusted :class:`~dgp_kernels.compressor.Broadcaster`
picks as the DGP band of its own gradient (the default "fresh" rule; in one round its
residual is zero). Its single-round operator here: positions =
``Broadcaster(top, keep).choose(broadcaster_grads)``, and the victim's gradient is sent at
those positions through :class:`~dgp_kernels.compressor.ADGPCompressor` (no error feedback)
and the codec (an aligned payload: values only; ``upload_bytes`` is its encoded length). So
the victim's largest entries are withheld only where they fall in the broadcaster's top
band; its other large entries may be sent. The positions are broadcast, so the server knows
them: the attacker gets the victim's dense gradient at the positions and ``sent_mask`` = the
positions. ``band`` is ``None``: the DGP-aware attack's prior (every unsent coordinate of
the *victim's* gradient lies outside the band of its sent magnitudes, ``k_top`` of them
above it) holds for dgp, where the sent set is the victim's own magnitude band, but not for
adgp, whose sent set is the broadcaster's band; giving the attacker that prior would push
the reconstruction toward a false constraint. Mask-using attacks (``dlg-adaptive``,
``ig-adaptive``) see the same threat model as under dgp. ``apply_defense`` needs the
broadcaster's gradient (``broadcaster_grads``, one tensor per parameter, shaped like the
victim's). In the evaluator (:mod:`dgp_kernels.attacks.runner`) the broadcaster is another
client: its update on the same served model from the *next* batch of the run's targets,
``(b + 1) mod n_batches``, or, when the run has a single batch, from a fixed batch of
seeded uniform-noise images with random labels; never the victim's own images (with those
the positions are the victim's own band and adgp sends exactly what dgp sends, except that
a tensor with an empty band, which dgp sends dense, is not sent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..codec import decode, encode
from ..codec.payload import SparsePayload
from ..compressor import ADGPCompressor, AlignedPositions, Broadcaster, get_compressor
from ..ops import DEFAULT_KEEP, DEFAULT_TOP
from ..spec import parse_spec

__all__ = [
    "DEFENSE_PARAMS",
    "DefendedGradient",
    "DefenseSpec",
    "apply_defense",
    "check_gradients",
    "parse_defense",
    "sent_mask_from_payload",
]

# Clip norm standing for "no clipping" in the dp compressor (which always clips): far above
# any gradient norm a model of float32 parameters produces.
_NO_CLIP = 1e30

#: Per defense name: accepted spec parameters and their types.
DEFENSE_PARAMS: Dict[str, Dict[str, type]] = {
    "none": {"value_dtype": str},
    "dgp": {"top": float, "keep": float, "value_dtype": str, "top_feedback": str},
    "adgp": {"top": float, "keep": float, "value_dtype": str},
    "topk": {"keep": float, "value_dtype": str},
    "randk": {"keep": float, "value_dtype": str},
    "dp": {"sigma": float, "noise_multiplier": float, "clip": float},
    "qsgd": {"levels": int},
}

# Parameters filled in when a spec leaves them out (so labels show the operating point).
_SPEC_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "dgp": {"top": DEFAULT_TOP, "keep": DEFAULT_KEEP},
    "adgp": {"top": DEFAULT_TOP, "keep": DEFAULT_KEEP},
    "topk": {"keep": DEFAULT_KEEP},
    "randk": {"keep": DEFAULT_KEEP},
    "qsgd": {"levels": 127},
}


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class DefenseSpec:
    """A parsed defense spec.

    Attributes:
        name: the compressor name (a key of :data:`DEFENSE_PARAMS`).
        params: ``(param, value)`` pairs, defaults filled in, in a fixed order.
    """

    name: str
    params: Tuple[Tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """Canonical spec string, e.g. ``"dgp:top=0.05,keep=0.2"``; parses back to ``self``."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.params)

    def __str__(self) -> str:
        return self.label

    @property
    def band(self) -> Optional[Tuple[float, float]]:
        """``(top, keep)`` of the band rule for ``dgp`` and ``topk`` (top 0), else ``None``
        (``adgp`` too: its sent set is the broadcaster's band, not the victim's; see the
        module docstring)."""
        p = dict(self.params)
        if self.name == "dgp":
            return (float(p["top"]), float(p["keep"]))
        if self.name == "topk":
            return (0.0, float(p["keep"]))
        return None

    @property
    def density(self) -> float:
        """Fraction of coordinates sent (1 for dense defenses)."""
        p = dict(self.params)
        return float(p["keep"]) if "keep" in p else 1.0

    def compressor_params(self) -> Dict[str, Any]:
        """Keyword arguments for ``get_compressor(self.name, ...)`` (no seed, the compressor's
        own error-feedback default: on for dgp, off for topk/randk). The simulator trains
        with these; :func:`apply_defense` adds ``error_feedback=False`` and the seed. For
        ``adgp`` they are the simulator's defense parameters: ``top``/``keep`` configure the
        broadcaster, ``value_dtype`` the client's :class:`ADGPCompressor`."""
        p = dict(self.params)
        if self.name != "dp":
            return p
        clip = p.get("clip")
        if "sigma" in p:
            c = _NO_CLIP if clip is None else clip
            return {"clip": c, "noise_multiplier": p["sigma"] / c}
        out = {"noise_multiplier": p.get("noise_multiplier", 1.0)}
        if clip is not None:
            out["clip"] = clip
        return out


def _parse_value(spec: str, key: str, text: str, kind: type) -> Any:
    if kind is str:
        return text
    try:
        v = int(text) if kind is int else float(text)
    except ValueError:
        raise ValueError(
            f"defense {spec!r}: {key}={text!r} is not a{'n int' if kind is int else ' number'}"
        ) from None
    if kind is float and not math.isfinite(v):
        raise ValueError(f"defense {spec!r}: {key} must be finite, got {text!r}")
    return v


def parse_defense(spec: object) -> DefenseSpec:
    """Parse ``"name[:param=value,...]"`` (see the module docstring) into a :class:`DefenseSpec`.

    A :class:`DefenseSpec` is returned unchanged. The values are checked by building the
    compressor once, so a bad operating point (``keep=1.5``, ``top + keep > 1``, ``levels=0``)
    fails here with the compressor's message, prefixed with the spec.
    """
    if isinstance(spec, DefenseSpec):
        return spec
    name, raw = parse_spec(spec)  # the syntax shared with dgp train and SimConfig
    if name not in DEFENSE_PARAMS:
        raise ValueError(
            f"unknown defense {name!r} in spec {spec!r}; known defenses: "
            f"{', '.join(DEFENSE_PARAMS)}"
        )
    allowed = DEFENSE_PARAMS[name]
    given: Dict[str, Any] = {}
    for key, val in raw.items():
        if key not in allowed:
            raise ValueError(
                f"defense {spec!r}: {name} has no parameter {key!r}; its parameters are: "
                f"{', '.join(allowed) or '(none)'}"
            )
        given[key] = _parse_value(spec, key, val, allowed[key])
    if name == "dp":
        if "sigma" in given and "noise_multiplier" in given:
            raise ValueError(f"defense {spec!r}: give sigma or noise_multiplier, not both")
        if "sigma" not in given and "noise_multiplier" not in given:
            raise ValueError(f"defense {spec!r}: dp needs sigma=<noise std> (or noise_multiplier)")
        if "sigma" in given and given["sigma"] < 0:
            raise ValueError(f"defense {spec!r}: sigma must be >= 0, got {given['sigma']!r}")
    merged = dict(_SPEC_DEFAULTS.get(name, {}))
    merged.update(given)
    order = list(allowed)
    params = tuple((k, merged[k]) for k in order if k in merged)
    out = DefenseSpec(name=name, params=params)
    try:
        if name == "adgp":
            Broadcaster(top=merged["top"], keep=merged["keep"])
            get_compressor(name, **{k: v for k, v in merged.items() if k == "value_dtype"})
        else:
            get_compressor(name, **out.compressor_params())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"defense {spec!r}: {exc}") from None
    return out


@dataclass
class DefendedGradient:
    """One client's gradient as it leaves the client under a defense.

    Attributes:
        spec: the defense.
        shared_grads: dense float32 tensors shaped like the model's parameters, decoded from
            the encoded upload (zeros where nothing was sent); on the gradients' device.
        sent_mask: bool tensors of the same shapes, True where a value was sent (every
            coordinate for the dense defenses none/dp/qsgd).
        band: ``(top, keep)`` for dgp/topk (what a band-aware attacker may know), else None.
        upload_bytes: length of the encoded payload (header, layer table and checksum included).
        dense_bytes: bytes of the same gradient as dense float32 (``4 * numel``).
        payload: the decoded :class:`SparsePayload` (values and indices as on the wire;
            for adgp values only, ``aligned=True``).
        positions: for adgp the broadcaster's :class:`~dgp_kernels.compressor.AlignedPositions`
            (the sent coordinates per layer), else None.
    """

    spec: DefenseSpec
    shared_grads: List[Tensor]
    sent_mask: List[Tensor]
    band: Optional[Tuple[float, float]]
    upload_bytes: int
    dense_bytes: int
    payload: SparsePayload
    positions: Optional[AlignedPositions] = None

    @property
    def sent_fraction(self) -> float:
        total = sum(m.numel() for m in self.sent_mask)
        return sum(int(m.sum()) for m in self.sent_mask) / total if total else 0.0


def check_gradients(grads: object, model: Optional[nn.Module] = None, name: str = "grads") -> List[Tensor]:
    """Check ``grads`` is a list of floating tensors and, with ``model``, that there is one per
    trainable parameter with the same shape. Raises ``TypeError``/``ValueError`` naming the
    parameter that does not fit."""
    if isinstance(grads, Tensor) or not isinstance(grads, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors (one per model parameter), got {type(grads).__name__}")
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(g).__name__}")
        if not g.dtype.is_floating_point:
            raise TypeError(f"{name}[{i}] must be a floating tensor, got {g.dtype}")
    if model is not None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if len(named) != len(grads):
            raise ValueError(
                f"{name} has {len(grads)} tensors but the model has {len(named)} trainable "
                "parameters; the gradient was computed on another model"
            )
        for i, ((pname, p), g) in enumerate(zip(named, grads)):
            if g.shape != p.shape:
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(g.shape)} but model parameter {pname!r} has "
                    f"shape {tuple(p.shape)}; the gradient was computed on another model"
                )
    return list(grads)


def sent_mask_from_payload(payload: SparsePayload, like: Sequence[Tensor]) -> List[Tensor]:
    """Bool masks shaped like ``like``: True at each layer's sent indices (all True for a
    dense layer). Raises ``ValueError`` when the payload does not fit ``like``."""
    if len(payload.layers) != len(like):
        raise ValueError(f"payload has {len(payload.layers)} layers for {len(like)} tensors")
    masks: List[Tensor] = []
    for i, (layer, t) in enumerate(zip(payload.layers, like)):
        if layer.numel != t.numel():
            raise ValueError(f"payload layer {i} has numel {layer.numel}, tensor {i} has {t.numel()}")
        if layer.indices is None:
            masks.append(torch.ones(t.shape, dtype=torch.bool, device=t.device))
            continue
        m = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        m[layer.indices.to(t.device)] = True
        masks.append(m.view(t.shape))
    return masks


def defense_compressor(spec: "DefenseSpec", *, error_feedback: bool, seed: int):
    """The registered compressor of a parsed defense: error feedback on or off where the
    compressor has it (dgp, topk, randk), ``seed`` where it is randomised (randk, dp, qsgd).
    ``adgp`` has no compressor of its own here: its positions come from a broadcaster
    (:func:`apply_defense` with ``broadcaster_grads``), so it raises ``ValueError``."""
    if spec.name == "adgp":
        raise ValueError(
            f"defense {spec.label!r}: adgp sends at a broadcaster's positions; apply it with "
            "apply_defense(..., broadcaster_grads=...)"
        )
    kwargs = spec.compressor_params()
    if spec.name in ("dgp", "topk", "randk"):
        kwargs["error_feedback"] = error_feedback
    if spec.name in ("randk", "dp", "qsgd"):
        kwargs["seed"] = int(seed)
    return get_compressor(spec.name, **kwargs)


def apply_defense(spec: object, grads: Sequence[Tensor], *, seed: int = 0,
                  model: Optional[nn.Module] = None,
                  broadcaster_grads: Optional[Sequence[Tensor]] = None) -> DefendedGradient:
    """Apply ``spec`` once (no error feedback) to one client's gradient.

    Args:
        spec: a spec string or :class:`DefenseSpec`.
        grads: one float tensor per model parameter (any float dtype, any device); not modified.
        seed: seed of the randomised defenses (randk, dp, qsgd).
        model: when given, ``grads`` must match its trainable parameters (``ValueError`` otherwise).
        broadcaster_grads: for ``adgp`` only, and required there: the broadcaster's own
            gradient, one tensor per parameter shaped like ``grads``, whose DGP band per
            layer gives the positions (see the module docstring); not modified. Passing it
            with another defense raises ``ValueError``.

    Returns:
        a :class:`DefendedGradient`: the dense float32 gradient decoded from the real encoded
        payload, the per-layer sent mask, the band and the upload size in bytes.
    """
    spec = parse_defense(spec)
    grads = check_gradients(grads, model)
    detached = [g.detach() for g in grads]
    device = detached[0].device if detached else torch.device("cpu")
    numels = [g.numel() for g in detached]
    positions: Optional[AlignedPositions] = None
    if spec.name == "adgp":
        if broadcaster_grads is None:
            raise ValueError(
                f"defense {spec.label!r} needs broadcaster_grads (the broadcaster's own gradient, "
                "whose DGP band gives the positions every client sends)"
            )
        bgrads = check_gradients(broadcaster_grads, model, name="broadcaster_grads")
        if len(bgrads) != len(detached):
            raise ValueError(f"broadcaster_grads has {len(bgrads)} tensors but grads has {len(detached)}")
        for i, (b, g) in enumerate(zip(bgrads, detached)):
            if b.shape != g.shape:
                raise ValueError(
                    f"broadcaster_grads[{i}] has shape {tuple(b.shape)} but grads[{i}] has {tuple(g.shape)}"
                )
        p = dict(spec.params)
        positions = Broadcaster(top=p["top"], keep=p["keep"]).choose([b.detach() for b in bgrads])
        comp = ADGPCompressor(error_feedback=False, value_dtype=p.get("value_dtype", torch.float32))
        comp.set_positions(positions)
    elif broadcaster_grads is not None:
        raise ValueError(f"broadcaster_grads is only for adgp, not for defense {spec.label!r}")
    else:
        comp = defense_compressor(spec, error_feedback=False, seed=seed)
    wire = encode(comp.compress(detached))
    payload = decode(wire, numels)
    dense = comp.decompress(payload, [g.shape for g in detached])
    shared = [d.to(device) for d in dense]
    if positions is None:
        masks = sent_mask_from_payload(payload, shared)
    else:
        masks = []
        for idx, t in zip(positions.indices, shared):
            m = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
            m[idx.to(t.device)] = True
            masks.append(m.view(t.shape))
    return DefendedGradient(
        spec=spec,
        shared_grads=shared,
        sent_mask=masks,
        band=spec.band,
        upload_bytes=len(wire),
        dense_bytes=4 * sum(numels),
        payload=payload,
        positions=positions,
    )
