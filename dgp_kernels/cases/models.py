"""Models of the DGP literature, in pure torch (torchvision does not import beside torch 2.13 CPU).

* :func:`resnet18_cifar` — the CIFAR ResNet-18 the DGP authors train (3x3 stem, no max-pool,
  BasicBlocks [2, 2, 2, 2]): 11,173,962 parameters in 62 tensors for 10 classes.
* :func:`lenet_sigmoid` — the sigmoid LeNet of DLG (Zhu et al. 2019) that the attack papers
  invert: 3 conv layers x 12 channels with sigmoid, one FC layer (768 -> classes for 32x32
  input), every weight and bias uniform in [-0.5, 0.5].
* :func:`convnet_small` — a small ReLU ConvNet for quick simulator runs and tests.
* :func:`mlp` — a one-hidden-layer ReLU perceptron: learns the 8x8 digits in a few rounds,
  for the simulator's tests.

Add a model: write a function returning an ``nn.Module`` (keyword arguments only, with
defaults), add it to ``MODELS`` and a parameter-count/forward-shape test in
``tests/cases/test_models.py``.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn

__all__ = ["MODELS", "get_model", "resnet18_cifar", "lenet_sigmoid", "convnet_small", "mlp"]


# --------------------------------------------------------------------------------------
# CIFAR ResNet-18 (He et al. 2016, CIFAR variant as in kuangliu/pytorch-cifar)
# --------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stride-1 stem, no max-pool, four stages, global avg-pool."""

    def __init__(self, num_blocks: List[int], num_classes: int = 10, channels: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet18_cifar(num_classes: int = 10, channels: int = 3) -> nn.Module:
    """CIFAR ResNet-18: input ``[B, channels, H, W]`` (32x32 in the papers), output
    ``[B, num_classes]``; 11,173,962 parameters in 62 tensors for 10 classes and 3 channels."""
    return ResNetCifar([2, 2, 2, 2], num_classes=num_classes, channels=channels)


# --------------------------------------------------------------------------------------
# DLG's sigmoid LeNet
# --------------------------------------------------------------------------------------
def _uniform_half(module: nn.Module) -> None:
    """DLG's ``weights_init``: every weight and bias uniform in [-0.5, 0.5]. The attacks are
    tuned to this init (the default Kaiming init makes DLG far weaker)."""
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if isinstance(p, torch.Tensor):
            with torch.no_grad():
                p.uniform_(-0.5, 0.5)


class LeNetSigmoid(nn.Module):
    def __init__(self, num_classes: int = 10, channels: int = 3, image_size: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        # Each stride-2 conv (k=5, p=2) maps H to ceil(H / 2): 32 -> 16 -> 8, so 12*8*8 = 768.
        side = (image_size + 3) // 4  # ceil(ceil(H / 2) / 2) == ceil(H / 4)
        self.fc = nn.Linear(12 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(x), 1))


def lenet_sigmoid(num_classes: int = 10, channels: int = 3, image_size: int = 32) -> nn.Module:
    """DLG's LeNet: input ``[B, channels, image_size, image_size]``, output
    ``[B, num_classes]``; FC 768 -> classes at 32x32; weights and biases uniform ±0.5."""
    if image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    model = LeNetSigmoid(num_classes=num_classes, channels=channels, image_size=image_size)
    model.apply(_uniform_half)
    return model


# --------------------------------------------------------------------------------------
# Small ReLU ConvNet
# --------------------------------------------------------------------------------------
def convnet_small(num_classes: int = 10, channels: int = 3, width: int = 32) -> nn.Module:
    """Small ConvNet (conv-ReLU-pool x2, conv-ReLU, global avg-pool, linear) for any input
    ``[B, channels, H, W]`` with H, W >= 4; output ``[B, num_classes]``. ~57k parameters at
    width 32: fast enough for simulator runs and tests on 2 CPU cores."""
    if width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


# --------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------
def mlp(num_classes: int = 10, channels: int = 3, image_size: int = 32, hidden: int = 64) -> nn.Module:
    """Flatten, Linear(channels * image_size**2 -> hidden), ReLU, Linear(hidden ->
    num_classes): input ``[B, channels, image_size, image_size]``, output
    ``[B, num_classes]``; 4,810 parameters for 8x8 grayscale digits at hidden 64."""
    for name, v in (("channels", channels), ("image_size", image_size), ("hidden", hidden)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * image_size * image_size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "lenet_sigmoid": lenet_sigmoid,
    "convnet_small": convnet_small,
    "mlp": mlp,
}


def get_model(name: str, **kw) -> nn.Module:
    """Build the model registered as ``name`` (one of ``MODELS``) with keyword arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kw)
