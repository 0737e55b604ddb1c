"""Attack interface: what the attacker knows (:class:`ThreatModel`), what an attack returns
(:class:`Reconstruction`), the :class:`Attack` base class and the registry by name.

Conventions shared by every attack:

* ``shared_grads`` is the list the client sent, one tensor per parameter of
  ``threat.model`` in ``model.parameters()`` order (all parameters, also frozen ones), each
  shaped like its parameter. Unsent coordinates are zeros (what a server rebuilds from a
  sparse payload); ``threat.sent_mask`` says which coordinates were actually sent.
* The gradient is of ``threat.loss_fn(model(x), y)`` over the batch (mean reduction for
  the default cross-entropy), exactly as :func:`compute_gradients` makes it.
* Images are float32 ``[B, C, H, W]`` in ``[0, 1]``; labels int64 ``[B]``.
* Attacks run where the gradients live: the dummy data is made on the device of
  ``shared_grads[0]`` (the model must already be there), so CUDA gradients mean a GPU attack.
* The model is used in the mode it is in (``train()``/``eval()``): set it as the client did.

Adding an attack: subclass :class:`Attack`, check every constructor argument
(``TypeError``/``ValueError`` naming it), implement ``__call__`` (start with
:func:`check_shared_grads`), decorate the class with ``@register_attack("name")`` and import
its module in ``dgp_kernels/attacks/__init__.py``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..registry import Registry

__all__ = [
    "ThreatModel",
    "Reconstruction",
    "Attack",
    "register_attack",
    "get_attack",
    "available_attacks",
    "infer_labels_idlg",
    "compute_gradients",
    "check_shared_grads",
    "check_setting",
    "last_linear_index",
]


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------
@dataclass
class ThreatModel:
    """What the attacker knows.

    Attributes:
        model: architecture and weights the shared gradient was computed with (for Robbing
            the Fed: the model returned by :meth:`Attack.prepare_model`).
        image_shape: ``(C, H, W)`` of one input; pixels live in ``[0, 1]``.
        num_classes: number of classes of the classifier.
        batch_size: images behind the shared gradient.
        labels: known labels, int64 ``[batch_size]``, or ``None`` (the attack infers or
            optimises them).
        sent_mask: one bool tensor per parameter, ``True`` where the coordinate was sent;
            ``None`` means everything was sent. Adaptive attackers use it.
        band: DGP ``(top, keep)`` fractions when the attacker knows the band rule.
        loss_fn: ``loss_fn(logits [B, classes], target) -> scalar``; the client's loss.
    """

    model: nn.Module
    image_shape: Tuple[int, int, int]
    num_classes: int
    batch_size: int = 1
    labels: Optional[Tensor] = None
    sent_mask: Optional[List[Tensor]] = None
    band: Optional[Tuple[float, float]] = None
    loss_fn: Callable = torch.nn.functional.cross_entropy

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        shape = tuple(self.image_shape) if isinstance(self.image_shape, (tuple, list, torch.Size)) else None
        if shape is None or len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {self.image_shape!r}")
        self.image_shape = shape  # type: ignore[assignment]
        for name in ("num_classes", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if self.labels is not None:
            if not isinstance(self.labels, Tensor):
                raise TypeError(f"labels must be an int64 tensor or None, got {type(self.labels).__name__}")
            if self.labels.dtype != torch.int64 or self.labels.shape != (self.batch_size,):
                raise ValueError(
                    f"labels must be int64 of shape [{self.batch_size}] (batch_size), got "
                    f"{self.labels.dtype} {tuple(self.labels.shape)}"
                )
            if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got {self.labels.tolist()}")
        if self.sent_mask is not None:
            params = list(self.model.parameters())
            if not isinstance(self.sent_mask, (list, tuple)) or len(self.sent_mask) != len(params):
                n = len(self.sent_mask) if isinstance(self.sent_mask, (list, tuple)) else type(self.sent_mask).__name__
                raise ValueError(f"sent_mask must be a list of {len(params)} bool tensors (one per parameter), got {n}")
            for i, (m, p) in enumerate(zip(self.sent_mask, params)):
                if not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != p.shape:
                    got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, Tensor) else type(m).__name__
                    raise ValueError(f"sent_mask[{i}] must be a bool tensor of shape {tuple(p.shape)}, got {got}")
            self.sent_mask = list(self.sent_mask)
        if self.band is not None:
            if not isinstance(self.band, (tuple, list)) or len(self.band) != 2:
                raise ValueError(f"band must be (top, keep) or None, got {self.band!r}")
            top, keep = (float(v) for v in self.band)
            if not (0.0 <= top <= 1.0 and 0.0 < keep <= 1.0 and top + keep <= 1.0 + 1e-9):
                raise ValueError(f"band must satisfy 0 <= top, 0 < keep, top + keep <= 1, got {self.band!r}")
            self.band = (top, keep)
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")


@dataclass
class Reconstruction:
    """What an attack returns.

    Attributes:
        images: float32 ``[B, C, H, W]`` in ``[0, 1]``, on the device of the gradients. The
            order need not match the client's batch (see :func:`metrics.match_order`).
        labels: int64 ``[B]``: known, inferred or optimised.
        label_source: ``"known"``, ``"inferred"`` or ``"optimised"``.
        losses: the attack objective per logged step (empty for analytic attacks).
        seconds: wall time of the attack.
        objective: the attack objective at the returned images (optimisation attacks return
            the lowest-objective iterate they visited); NaN for analytic attacks.
        setting: the hyper-parameters behind this reconstruction when it is one point of a
            tuning grid (:meth:`Attack.run_grid`), e.g. ``{"tv_weight": 0.2, "lr": 0.1,
            "restart": 0}``; empty otherwise.
    """

    images: Tensor
    labels: Tensor
    label_source: str
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    objective: float = float("nan")
    setting: Dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Attack base and registry
# --------------------------------------------------------------------------------------
class Attack(ABC):
    """One gradient inversion attack; its hyper-parameters are constructor arguments."""

    name: ClassVar[str] = ""

    def prepare_model(self, model: nn.Module, image_shape: Sequence[int], num_classes: int) -> nn.Module:
        """Malicious-server attacks (Robbing the Fed) return the model the server sends;
        passive attacks return ``model`` unchanged."""
        return model

    @abstractmethod
    def __call__(
        self, shared_grads: List[Tensor], threat: ThreatModel, *, seed: int = 0, progress: bool = False
    ) -> Reconstruction:
        """Rebuild the client's batch from ``shared_grads`` (see the module docstring)."""

    #: Constructor arguments a tuning grid may vary (besides ``restart``, the init index).
    tunable: ClassVar[Tuple[str, ...]] = ()

    def run_grid(
        self,
        shared_grads: List[Tensor],
        threat: ThreatModel,
        settings: Sequence[Dict[str, object]],
        *,
        seed: int = 0,
        progress: bool = False,
    ) -> List[Reconstruction]:
        """Run the attack once per setting of a tuning grid and return one
        :class:`Reconstruction` per setting (its ``setting`` filled in, its ``seconds`` the
        wall time of the whole grid), in order.

        A setting maps constructor arguments in :attr:`tunable` to values and may hold
        ``restart`` (int >= 0): settings with the same ``restart`` start from the same random
        initialisation (drawn from ``seed``), so the grid compares hyper-parameters on paired
        starts. This default runs the settings one after the other; attacks that can run
        them together (Inverting Gradients: one vectorised optimisation) override it.
        """
        import time

        start = time.perf_counter()
        out: List[Reconstruction] = []
        for s in settings:
            params = check_setting(s, self.tunable, type(self).__name__)
            restart = int(s.get("restart", 0))
            attack = self.with_params(**params)
            rec = attack(shared_grads, threat, seed=seed * 1_000 + restart, progress=progress)
            rec.setting = dict(s)
            out.append(rec)
        for rec in out:
            rec.seconds = time.perf_counter() - start  # the wall time of the whole grid
        return out

    def with_params(self, **params) -> "Attack":
        """A copy of this attack with some constructor arguments replaced (checked again).
        Constructor arguments are read back from the attributes of the same name."""
        import inspect

        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        kw = {n: getattr(self, n) for n in names if hasattr(self, n)}
        kw.update(params)
        return type(self)(**kw)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


#: The attacks by name.
ATTACKS: Registry[Attack] = Registry("attack", Attack)

#: Class decorator: register an :class:`Attack` subclass under ``name``.
register_attack = ATTACKS.register
#: Registered attack names, sorted.
available_attacks = ATTACKS.names


def get_attack(name: str, **params) -> Attack:
    """Build the attack registered as ``name`` with its keyword hyper-parameters.

    Raises ``ValueError`` listing the known names when ``name`` is unknown, and the attack's
    own ``TypeError``/``ValueError`` for a bad or unknown parameter."""
    cls = ATTACKS.get(name)
    try:
        return cls(**params)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise TypeError(f"attack {name!r}: {exc}") from None
        raise


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------
def check_setting(setting: object, tunable: Sequence[str], owner: str) -> Dict[str, object]:
    """Check one tuning-grid setting: a dict of ``tunable`` constructor arguments plus an
    optional ``restart`` int >= 0. Returns the constructor arguments (without ``restart``);
    ``TypeError``/``ValueError`` naming the key otherwise."""
    if not isinstance(setting, dict):
        raise TypeError(f"a tuning setting must be a dict, got {type(setting).__name__}")
    out: Dict[str, object] = {}
    for k, v in setting.items():
        if k == "restart":
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"setting restart must be an int >= 0, got {v!r}")
            continue
        if k not in tunable:
            raise ValueError(f"{owner} cannot tune {k!r}; tunable: {', '.join(tunable) or '(none)'}, restart")
        out[k] = v
    return out


def compute_gradients(
    model: nn.Module, images: Tensor, labels: Tensor, loss_fn: Callable = torch.nn.functional.cross_entropy
) -> List[Tensor]:
    """The client's gradient: ``d loss_fn(model(images), labels) / d p`` for every parameter
    ``p`` of ``model`` (``model.parameters()`` order; zeros for parameters the loss does not
    reach). ``images`` float ``[B, C, H, W]``, ``labels`` int64 ``[B]``. Returns detached
    tensors shaped like the parameters, on the model's device."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images).__name__)}")
    if not isinstance(labels, Tensor) or labels.shape != images.shape[:1]:
        raise ValueError(
            f"labels must be a [B] tensor matching images (B={images.shape[0]}), got "
            f"{getattr(labels, 'shape', type(labels).__name__)}"
        )
    params = list(model.parameters())
    loss = loss_fn(model(images), labels)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]


def check_shared_grads(shared_grads: object, threat: ThreatModel) -> List[Tensor]:
    """Check ``shared_grads`` against ``threat.model``: a list with one floating tensor per
    parameter, shaped like it, finite. Returns the list (detached). Errors name the index."""
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    if not isinstance(shared_grads, (list, tuple)):
        raise TypeError(f"shared_grads must be a list of tensors, got {type(shared_grads).__name__}")
    params = list(threat.model.parameters())
    if len(shared_grads) != len(params):
        raise ValueError(
            f"shared_grads has {len(shared_grads)} tensors but threat.model has {len(params)} parameters "
            "(one gradient per parameter, in model.parameters() order)"
        )
    out = []
    for i, (g, p) in enumerate(zip(shared_grads, params)):
        if not isinstance(g, Tensor):
            raise TypeError(f"shared_grads[{i}] must be a torch.Tensor, got {type(g).__name__}")
        if not g.is_floating_point():
            raise TypeError(f"shared_grads[{i}] must be floating point, got {g.dtype}")
        if g.shape != p.shape:
            raise ValueError(
                f"shared_grads[{i}] has shape {tuple(g.shape)} but parameter {i} of threat.model has "
                f"shape {tuple(p.shape)}"
            )
        if g.device != p.device:
            raise ValueError(f"shared_grads[{i}] is on {g.device} but threat.model is on {p.device}")
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"shared_grads[{i}] contains NaN or inf")
        out.append(g.detach().to(p.dtype))
    _check_image_shape(threat)
    return out


def _check_image_shape(threat: ThreatModel) -> None:
    """One forward pass of a zero image (eval mode, no grad: BatchNorm statistics untouched)
    so that an image shape the model cannot take fails here, naming ``image_shape``."""
    model = threat.model
    was_training = model.training
    param = next(iter(model.parameters()))
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros((1, *threat.image_shape), dtype=param.dtype, device=param.device))
    except RuntimeError as exc:
        raise ValueError(f"threat.image_shape {threat.image_shape} does not fit threat.model: {exc}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.shape != (1, threat.num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"threat.model maps one image to {got}, expected (1, num_classes={threat.num_classes})")


def last_linear_index(threat: ThreatModel) -> int:
    """Index (in ``model.parameters()`` order) of the last 2-D parameter with
    ``num_classes`` rows: the classifier's weight, whose gradient the iDLG rule reads."""
    params = list(threat.model.parameters())
    for i in range(len(params) - 1, -1, -1):
        p = params[i]
        if p.dim() == 2 and p.shape[0] == threat.num_classes:
            return i
    raise ValueError(
        f"threat.model has no 2-D parameter with num_classes={threat.num_classes} rows (a final linear "
        "layer); the iDLG label rule needs one"
    )


def infer_labels_idlg(shared_grads: List[Tensor], threat: ThreatModel) -> Tensor:
    """iDLG label rule (Zhao et al. 2020), extended to batches.

    With softmax cross-entropy and non-negative features ``h`` entering the last linear
    layer (sigmoid, ReLU), row ``c`` of its weight gradient is
    ``sum_b (p_bc - 1[y_b = c]) h_b / B``: its sum is negative only for classes present in
    the batch. So for one image the label is the argmin over classes of the row sums.

    Batch extension (documented, in the spirit of Yin et al. 2021 and LLG, Wainakh et al.
    2022): classes are ranked by row sum, most negative first. If at least ``B`` classes have a
    negative sum, the ``B`` most negative ones are returned (distinct labels). Otherwise every
    negative class is taken once and the remaining slots are split among the negative classes
    in proportion to their negative mass (largest remainder), since the mass grows with the
    number of samples of the class. With no negative row (e.g. a defense zeroed them), the
    ``B`` smallest sums are used. Labels are returned sorted by class.

    Returns int64 ``[threat.batch_size]`` on the gradients' device.
    """
    grads = check_shared_grads(shared_grads, threat)
    g = grads[last_linear_index(threat)]
    sums = g.double().sum(dim=1)  # [classes]
    b = threat.batch_size
    order = torch.argsort(sums, stable=True)
    neg = order[sums[order] < 0]
    if neg.numel() >= b:
        labels = neg[:b]
    elif neg.numel() == 0:
        reps = math.ceil(b / sums.numel())
        labels = order.repeat(reps)[:b]
    else:
        mass = -sums[neg]
        extra = b - neg.numel()
        share = mass / mass.sum() * extra
        counts = torch.floor(share).long()
        left = extra - int(counts.sum())
        if left > 0:
            frac_order = torch.argsort(share - counts, descending=True, stable=True)
            counts[frac_order[:left]] += 1
        labels = torch.repeat_interleave(neg, 1 + counts)
    return torch.sort(labels).values.to(torch.int64)
