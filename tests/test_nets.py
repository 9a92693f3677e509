"""The five nets of SPEC section 2: parameter counts pinned, shapes at 64, 128 and 256 px."""

import pytest
import torch

from trainer.model.nets import ConfidenceNet, Encoder, EncoderDecoder, count_parameters

EXPECTED_64PX = {
    "depth": 12_979_648,
    "albedo": 12_982_848,
    "light": 1_739_264,
    "view": 1_739_776,
    "confidence": 7_678_208,
}


def build_nets(size: int) -> dict:
    return {
        "depth": EncoderDecoder(1, 64, 256, size),
        "albedo": EncoderDecoder(3, 64, 256, size, activation=torch.nn.Tanh()),
        "light": Encoder(4, 32, size),
        "view": Encoder(6, 32, size),
        "confidence": ConfidenceNet(64, 128, size),
    }


def test_parameter_counts_match_the_reference_at_64px():
    nets = build_nets(64)
    counts = {name: count_parameters(net) for name, net in nets.items()}
    assert counts == EXPECTED_64PX
    assert sum(counts.values()) == 37_119_744  # "about 37.12M"


def test_no_conv_has_a_bias_and_group_norm_has_4_channels_per_group():
    for net in build_nets(64).values():
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                assert module.bias is None
            if isinstance(module, torch.nn.GroupNorm):
                assert module.num_channels == 4 * module.num_groups


@pytest.mark.parametrize("size", [64, 128, 256])
def test_output_shapes_at_each_size(size):
    nets = build_nets(size) if size == 64 else {
        # narrower nets keep the 256 px case quick; the layer plan is what is under test
        "depth": EncoderDecoder(1, 8, 16, size),
        "albedo": EncoderDecoder(3, 8, 16, size, activation=torch.nn.Tanh()),
        "light": Encoder(4, 8, size),
        "view": Encoder(6, 8, size),
        "confidence": ConfidenceNet(8, 16, size),
    }
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert nets["depth"](x).shape == (2, 1, size, size)
        albedo = nets["albedo"](x)
        assert albedo.shape == (2, 3, size, size) and albedo.abs().max() <= 1
        assert nets["light"](x).shape == (2, 4)
        assert nets["view"](x).shape == (2, 6)
        photometric, perceptual = nets["confidence"](x)
        assert photometric.shape == (2, 2, size, size) and perceptual.shape == (2, 2, size // 4, size // 4)
        assert photometric.min() > 0 and perceptual.min() > 0


def test_image_size_must_be_a_power_of_two_of_at_least_64():
    with pytest.raises(ValueError, match="image_size"):
        Encoder(4, 8, 96)
