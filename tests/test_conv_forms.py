"""The decoders' faster CPU convolution forms compute the reference's layers (issue 14)."""

import pytest
import torch
import torch.nn.functional as F

from trainer.model.conv_forms import (
    FewChannelConv2d,
    NearestUpsampledConv2d,
    few_channel_conv,
    nearest_upsample_conv3x3,
)
from trainer.model.nets import ConfidenceNet, EncoderDecoder


def forward_and_gradients(fn, x, weight, seed=0):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    out = fn(x, weight)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(upstream)
    return out.detach(), x.grad, weight.grad


def assert_same(a, b, tol):
    for got, want in zip(a, b):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("cin,cout,size", [(16, 16, 32), (3, 5, 7), (8, 2, 1)])
def test_upsample_then_conv3x3_is_one_transposed_convolution(cin, cout, size):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, cin, size, size + 1, generator=generator, dtype=torch.float64)
    weight = torch.randn(cout, cin, 3, 3, generator=generator, dtype=torch.float64)

    def reference(x, w):
        return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=1)

    assert_same(forward_and_gradients(nearest_upsample_conv3x3, x, weight),
                forward_and_gradients(reference, x, weight), 1e-12)


@pytest.mark.parametrize("cout,kernel,factor", [(1, 5, 4), (2, 5, 2), (3, 5, 2), (3, 3, 4), (1, 3, 2), (2, 7, 4)])
def test_a_few_channel_convolution_is_a_strided_one_with_pixel_shuffle(cout, kernel, factor):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 16, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(cout, 6, kernel, kernel, generator=generator, dtype=torch.float64)

    def reference(x, w):
        return F.conv2d(x, w, padding=kernel // 2)

    assert_same(forward_and_gradients(lambda x, w: few_channel_conv(x, w, factor), x, weight),
                forward_and_gradients(reference, x, weight), 1e-12)


def test_the_layers_use_the_forms_on_cpu_and_match_the_reference_layers_in_bf16():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 32, 32, generator=generator)
    up = NearestUpsampledConv2d(16, 16)
    head = FewChannelConv2d(16, 1, 5)
    plain_up = torch.nn.Conv2d(16, 16, 3, 1, 1, bias=False)
    plain_head = torch.nn.Conv2d(16, 1, 5, 1, 2, bias=False)
    plain_up.load_state_dict(up.state_dict())
    plain_head.load_state_dict(head.state_dict())
    # Same parameter names and shapes as the reference's layers: checkpoints load either way.
    assert up.state_dict().keys() == plain_up.state_dict().keys() == {"weight"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = head(torch.relu(up(x))).float()
        reference = plain_head(torch.relu(plain_up(F.interpolate(x, scale_factor=2, mode="nearest")))).float()
    # bf16 rounds the inputs of both alike; the sums differ in order only.
    assert (ours - reference).abs().max() <= 2e-2 * reference.abs().max()


def test_a_few_channel_layer_falls_back_where_the_size_does_not_divide():
    head = FewChannelConv2d(4, 1, 5)
    x = torch.randn(1, 4, 10, 10)  # 10 is not a multiple of the block factor 4
    torch.testing.assert_close(head(x), F.conv2d(x, head.weight, padding=2))
    with pytest.raises(ValueError, match="odd kernel_size"):
        FewChannelConv2d(4, 1, 4)


def test_the_nets_compute_what_the_reference_layer_plan_computes():
    """The decoders with the new layers give the reference's outputs (nn.Upsample + Conv2d heads)."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for net in (EncoderDecoder(3, 8, 16, activation=torch.nn.Tanh()).double(), ConfidenceNet(8, 16).double()):
        with torch.no_grad():
            ours = net(x)
            net_reference = reference_layer_plan(net)
            theirs = net_reference(x)
        for a, b in zip(ours if isinstance(ours, tuple) else [ours], theirs if isinstance(theirs, tuple) else [theirs]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def reference_layer_plan(net):
    """The same net with the reference's layers: nn.Upsample + nn.Conv2d, plain nn.Conv2d heads."""
    import copy

    net = copy.deepcopy(net)
    for module in net.modules():
        if isinstance(module, torch.nn.Sequential):
            for index, layer in enumerate(module):
                if isinstance(layer, NearestUpsampledConv2d):
                    plain = torch.nn.Conv2d(layer.in_channels, layer.out_channels, 3, 1, 1, bias=False).double()
                    plain.load_state_dict(layer.state_dict())
                    module[index] = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="nearest"), plain)
                elif isinstance(layer, FewChannelConv2d):
                    k = layer.kernel_size[0]
                    plain = torch.nn.Conv2d(layer.in_channels, layer.out_channels, k, 1, k // 2, bias=False).double()
                    plain.load_state_dict(layer.state_dict())
                    module[index] = plain
    return net
