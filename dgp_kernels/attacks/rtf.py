"""Robbing the Fed (Fowl et al. 2022): a malicious server inserts an *imprint* block in front
of the model and reads the client's inputs off its gradient, exactly.

The imprint block (:class:`ImprintBlock`) sees the flattened input ``x`` (``D = C*H*W``):

* ``h_i = relu(m . x - t_i)`` for ``K`` bins, ``m`` the measurement (uniform ``1/D``: the
  mean pixel value) and thresholds ``t_0 < t_1 < ... < t_{K-1}`` (``t_0`` below every
  possible measurement, the others at the ``i/K`` quantiles of the measurement's
  distribution: a normal law with the given mean/std, or the empirical one of
  ``calibration`` images);
* output ``x + c * sum_i h_i`` reshaped to ``[B, C, H, W]`` (a per-image brightness shift,
  ``c = 1/K``), fed to the unchanged original model.

Since every ``h_i`` reaches the output with the same weight, ``dL/dh_{b,i} = g_b`` does not
depend on ``i``, so row ``i`` of the weight gradient is ``sum_{b: m.x_b > t_i} g_b x_b`` and
entry ``i`` of the bias gradient ``sum_{b: m.x_b > t_i} g_b``. For consecutive rows the
difference keeps exactly the samples whose measurement falls in ``(t_i, t_{i+1}]``; when that
bin holds one sample, ``(dW_i - dW_{i+1}) / (db_i - db_{i+1})`` *is* that sample (up to
float rounding of the sums). Bins holding two or more samples
give their ``g``-weighted mean; an image whose ``g_b`` is 0 leaves no trace.

``prepare_model`` returns :class:`ImprintedModel` (imprint parameters first, then the
original model's); the client's gradient must be computed on it.
"""

from __future__ import annotations

import math
import time
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .base import Attack, Reconstruction, ThreatModel, check_shared_grads, register_attack
from .matching import check_count, check_number, resolve_labels

__all__ = ["ImprintBlock", "ImprintedModel", "RobbingTheFed"]


class ImprintBlock(nn.Module):
    """Linear imprint layer with ``num_bins`` rows; input and output ``[B, C, H, W]``.

    ``linear0`` (``D -> K``): weight rows all equal to ``1/D``, bias ``-thresholds``;
    ``linear1`` (``K -> D``): every weight ``1/K``, bias 0."""

    def __init__(self, image_shape: Sequence[int], thresholds: Tensor) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        d = math.prod(self.image_shape)
        k = thresholds.numel()
        self.linear0 = nn.Linear(d, k)
        self.linear1 = nn.Linear(k, d)
        with torch.no_grad():
            self.linear0.weight.fill_(1.0 / d)
            self.linear0.bias.copy_(-thresholds.to(torch.float32))
            self.linear1.weight.fill_(1.0 / k)
            self.linear1.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        out = flat + self.linear1(torch.relu(self.linear0(flat)))
        return out.view(x.shape)


class ImprintedModel(nn.Module):
    """``model(imprint(x))``: what the malicious server sends."""

    def __init__(self, imprint: ImprintBlock, model: nn.Module) -> None:
        super().__init__()
        self.imprint = imprint
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.imprint(x))


def _normal_quantiles(k: int, mean: float, std: float) -> Tensor:
    p = torch.arange(1, k, dtype=torch.float64) / k
    return mean + std * math.sqrt(2.0) * torch.special.erfinv(2 * p - 1)


@register_attack("rtf")
class RobbingTheFed(Attack):
    """Robbing the Fed with a mean-brightness imprint block.

    Args:
        num_bins: rows of the imprint layer (more bins, fewer collisions in a batch).
        mean, std: normal law of an image's mean pixel value used for the thresholds when no
            ``calibration`` is given (defaults: rough natural-photo figures in [0, 1]).
        calibration: images ``[N, C, H, W]`` whose mean pixel values give empirical
            quantiles instead (the server's public data).
    """

    def __init__(
        self, num_bins: int = 128, mean: float = 0.47, std: float = 0.12, calibration: Optional[Tensor] = None
    ) -> None:
        self.num_bins = check_count(num_bins, "num_bins", 2)
        self.mean = float(mean)
        if not math.isfinite(self.mean):
            raise ValueError(f"mean must be finite, got {mean!r}")
        self.std = check_number(std, "std", positive=True)
        if calibration is not None:
            if not isinstance(calibration, Tensor) or calibration.dim() != 4 or calibration.shape[0] < 1:
                raise ValueError(
                    f"calibration must be images [N, C, H, W], got {getattr(calibration, 'shape', type(calibration).__name__)}"
                )
        self.calibration = calibration

    def thresholds(self, image_shape: Sequence[int]) -> Tensor:
        """The ``num_bins`` ascending thresholds (float64): ``t_0 = -1`` (every image in
        [0, 1] is above it), then the ``i / num_bins`` quantiles."""
        k = self.num_bins
        if self.calibration is not None:
            if tuple(self.calibration.shape[1:]) != tuple(image_shape):
                raise ValueError(
                    f"calibration images are {tuple(self.calibration.shape[1:])} but image_shape is {tuple(image_shape)}"
                )
            stats = self.calibration.double().flatten(1).mean(1)
            q = torch.quantile(stats, torch.arange(1, k, dtype=torch.float64) / k)
        else:
            q = _normal_quantiles(k, self.mean, self.std)
        q, _ = torch.sort(q)
        return torch.cat([torch.tensor([-1.0], dtype=torch.float64), q])

    def prepare_model(self, model: nn.Module, image_shape: Sequence[int], num_classes: int) -> nn.Module:
        """The model the server sends: :class:`ImprintedModel` (imprint block in front of
        ``model``, on ``model``'s device)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if len(tuple(image_shape)) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
        device = next(iter(model.parameters()), torch.empty(0)).device
        return ImprintedModel(ImprintBlock(image_shape, self.thresholds(image_shape)), model).to(device)

    @staticmethod
    def _find_imprint(threat: ThreatModel) -> Tuple[ImprintBlock, int, int]:
        blocks = [m for m in threat.model.modules() if isinstance(m, ImprintBlock)]
        if len(blocks) != 1:
            raise ValueError(
                f"rtf needs threat.model to be the model returned by prepare_model (one ImprintBlock), "
                f"found {len(blocks)} imprint blocks"
            )
        block = blocks[0]
        if block.image_shape != tuple(threat.image_shape):
            raise ValueError(
                f"the imprint block was built for images {block.image_shape}, threat.image_shape is {threat.image_shape}"
            )
        ids = [id(p) for p in threat.model.parameters()]
        return block, ids.index(id(block.linear0.weight)), ids.index(id(block.linear0.bias))

    def __call__(
        self, shared_grads: List[Tensor], threat: ThreatModel, *, seed: int = 0, progress: bool = False
    ) -> Reconstruction:
        start = time.perf_counter()
        shared = check_shared_grads(shared_grads, threat)
        _, wi, bi = self._find_imprint(threat)
        dw = shared[wi].double()  # [K, D]
        db = shared[bi].double()  # [K]
        zero_w = torch.zeros_like(dw[:1])
        zero_b = torch.zeros_like(db[:1])
        diff_w = dw - torch.cat([dw[1:], zero_w])  # bin i: samples with t_i < m.x <= t_{i+1}
        diff_b = db - torch.cat([db[1:], zero_b])
        mag = diff_b.abs()
        b = threat.batch_size
        # The batch has at most b occupied bins; take the b largest bias differences that are
        # clearly non-zero (an empty bin's difference is 0 up to rounding of the cumulative sums).
        tol = 1e-9 * float(mag.max()) if mag.numel() else 0.0
        order = torch.argsort(mag, descending=True)[:b]
        order = order[mag[order] > tol]
        order = torch.sort(order).values
        images = torch.full((b, *threat.image_shape), 0.5, dtype=torch.float64, device=dw.device)
        if order.numel():
            rec = diff_w[order] / diff_b[order, None]
            images[: order.numel()] = rec.view(order.numel(), *threat.image_shape)
        labels, source = resolve_labels(shared, threat, "auto" if threat.labels is not None else "infer")
        return Reconstruction(
            images=images.clamp(0, 1).float(),
            labels=labels.to(torch.int64),
            label_source=source,
            losses=[],
            seconds=time.perf_counter() - start,
        )
