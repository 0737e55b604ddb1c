import pytest
import torch

from dgp_kernels.cases.models import (
    MODELS,
    convnet_small,
    get_model,
    lenet_sigmoid,
    resnet18_cifar,
)


def _params(model):
    return [p for p in model.parameters()]


def test_resnet18_cifar_counts():
    # The CIFAR ResNet-18 has 11.2M parameters in 62 tensors.
    params = _params(resnet18_cifar())
    assert len(params) == 62
    assert sum(p.numel() for p in params) == 11_173_962


def test_resnet18_cifar_is_the_cifar_variant():
    model = resnet18_cifar()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] \
        == [2, 2, 2, 2]


def test_resnet18_cifar_forward_backward():
    model = resnet18_cifar(num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_lenet_sigmoid_matches_dlg():
    model = lenet_sigmoid()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(c.out_channels == 12 for c in convs)
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model.modules()) == 3
    fc = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(fc) == 1 and fc[0].in_features == 768 and fc[0].out_features == 10
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_lenet_sigmoid_uniform_half_init():
    torch.manual_seed(0)
    params = _params(lenet_sigmoid())
    flat = torch.cat([p.detach().flatten() for p in params])
    assert flat.abs().max() <= 0.5
    # Uniform on [-0.5, 0.5] has std 1/sqrt(12) ~ 0.289; Kaiming init would be much smaller.
    assert 0.27 < flat.std().item() < 0.31


@pytest.mark.parametrize("channels,size,fc_in", [(1, 28, 588), (3, 64, 3072), (3, 30, 768)])
def test_lenet_sigmoid_other_inputs(channels, size, fc_in):
    model = lenet_sigmoid(num_classes=100, channels=channels, image_size=size)
    assert model.fc.in_features == fc_in
    assert model(torch.randn(2, channels, size, size)).shape == (2, 100)


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 1, 28, 28), (1, 3, 8, 8)])
def test_convnet_small_forward(shape):
    model = convnet_small(channels=shape[1], num_classes=5)
    assert model(torch.randn(*shape)).shape == (shape[0], 5)


def test_get_model_registry():
    assert set(MODELS) == {"resnet18_cifar", "lenet_sigmoid", "convnet_small", "mlp"}
    model = get_model("lenet_sigmoid", num_classes=3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_get_model_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*resnet18_cifar"):
        get_model("resnet50")


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="image_size"):
        lenet_sigmoid(image_size=0)
    with pytest.raises(ValueError, match="width"):
        convnet_small(width=0)
