"""SIDE, MAD, the evaluation mask and the summaries of SPEC 6."""

import math

import pytest
import torch

from trainer.results.metrics import (
    REFERENCE_NORMAL_EPS,
    average_depth_baseline,
    constant_depth_baseline,
    erode,
    evaluation_mask,
    mad_error,
    side_error,
    summarize,
)
from trainer.render.geometry import intrinsics, pixel_grid

S = 64


def dome(size=S):
    """A face-like depth map [1, S, S]: a bump 0.08 deep on a 1.0 plane inside a disc, background 1.1."""
    v, u = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r2 = u**2 + v**2
    d = 1.0 - 0.08 * ((0.8 - r2).clamp(min=0) / 0.8).sqrt()
    return torch.where(r2 < 0.8, d, torch.tensor(1.1)).to(torch.float64)[None]


def tilted_plane(theta_degrees, size=S):
    """Depth [1, S, S] of the plane Z = 1 + tan(theta) X: its normal (-tan theta, 0, 1) is theta from (0, 0, 1).

    On the ray (x, y, 1) with x = (u - cx) / f, d = 1 + tan(theta) d x, so d = 1 / (1 - tan(theta) x).
    """
    K = intrinsics(size, dtype=torch.float64)
    x = (pixel_grid(size, size, dtype=torch.float64)[..., 0] - K[0, 2]) / K[0, 0]
    return (1.0 / (1.0 - math.tan(math.radians(theta_degrees)) * x))[None]


# ---------------------------------------------------------------------------------------------
# SIDE


def test_side_of_identical_depths_is_zero():
    d = dome()
    assert side_error(d, d, evaluation_mask(None, d)).item() == 0.0


def test_side_is_scale_invariant():
    d = dome()
    assert side_error(1.7 * d, d, evaluation_mask(None, d)).item() < 1e-12


def test_side_hand_example():
    # D = log pred - log gt = [0, 0.1, 0.2, 0.3], mask [1, 1, 1, 0]
    # mean_m D = 0.1; deviations -0.1, 0, 0.1; sum of squares 0.02; / 3 = 0.0066667; sqrt = 0.0816497
    gt = torch.ones(1, 1, 4)
    pred = torch.tensor([[[0.0, 0.1, 0.2, 0.3]]]).exp()
    mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    assert side_error(pred, gt, mask).item() == pytest.approx(0.0816497, abs=1e-7)


def test_side_is_per_image():
    gt = torch.ones(2, 1, 4)
    pred = torch.stack([torch.ones(1, 4), torch.tensor([[0.0, 0.1, 0.2, 0.3]]).exp()])
    mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]]).expand(2, 1, 4)
    torch.testing.assert_close(side_error(pred, gt, mask), torch.tensor([0.0, 0.0816497], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# MAD


def test_mad_of_identical_depths_is_exactly_zero_with_exact_normals():
    d = dome()
    assert mad_error(d, d, evaluation_mask(None, d), intrinsics(S)).item() == 0.0


def test_mad_reference_eps_on_a_flat_plane_matches_the_analytic_bias():
    # Fronto-parallel plane at depth 1: t_u = (2/f, 0, 0), t_v = (0, 2/f, 0), |n| = 4/f^2 = 3.0856e-5 at 64 px.
    # n / (|n| + 1e-7) has length r = |n| / (|n| + eps) = 0.996770, so n1 . n2 = r^2 and the angle is
    # acos(r^2) = 6.52 degrees although the maps are identical.
    d = torch.ones(1, S, S, dtype=torch.float64)
    mask = erode(torch.ones(1, S, S))
    f = intrinsics(S)[0, 0].item()
    n = 4 / f**2
    r = n / (n + 1e-7)
    expected = math.degrees(math.acos(r * r))
    assert expected == pytest.approx(6.52, abs=0.01)
    assert mad_error(d, d, mask, eps=REFERENCE_NORMAL_EPS).item() == pytest.approx(expected, rel=1e-6)


def test_mad_reference_eps_on_identical_face_like_maps_is_about_5_5_degrees():
    # SPEC 6: "two identical depth maps score about 5.5 degrees". Measured on this dome: 5.62 deg
    # (the bias shrinks where |n| is larger: nearer-far or tilted surfaces).
    d = dome()
    value = mad_error(d, d, evaluation_mask(None, d), eps=REFERENCE_NORMAL_EPS).item()
    assert 5.0 < value < 6.5
    assert value == pytest.approx(5.62, abs=0.01)


@pytest.mark.parametrize("theta", [5.0, 20.0, 40.0])
def test_mad_of_a_tilted_plane_vs_a_flat_one_is_the_tilt(theta):
    flat = torch.ones(1, S, S, dtype=torch.float64)
    mask = erode(torch.ones(1, S, S))
    assert mad_error(tilted_plane(theta), flat, mask).item() == pytest.approx(theta, abs=1e-6)
    # and symmetric in its arguments
    assert mad_error(flat, tilted_plane(theta), mask).item() == pytest.approx(theta, abs=1e-6)


def test_mad_accepts_channel_maps_and_float32():
    d = dome().float()
    m = evaluation_mask(None, d)
    assert mad_error(d[:, None], tilted_plane(10).float()[:, None], m[:, None]).shape == (1,)


# ---------------------------------------------------------------------------------------------
# masks


def test_erode_removes_every_pixel_with_an_outside_neighbour():
    m = torch.zeros(1, 5, 5)
    m[0, 1:4, 1:4] = 1
    expected = torch.zeros(1, 5, 5, dtype=torch.float64)
    expected[0, 2, 2] = 1
    assert torch.equal(erode(m), expected)


def test_erode_treats_outside_the_image_as_background():
    full = erode(torch.ones(1, 6, 6))
    assert full[0, 1:-1, 1:-1].eq(1).all() and full.sum() == 16  # only the 4x4 interior stays


def test_erode_a_hole_takes_its_8_neighbours():
    m = torch.ones(1, 7, 7)
    m[0, 3, 3] = 0
    e = erode(m)
    assert e[0, 2:5, 2:5].sum() == 0 and e[0, 1:6, 1:6].sum() == 25 - 9


def test_evaluation_mask_is_the_product_of_eroded_masks():
    gt = torch.full((1, 8, 8), 1.1)
    gt[0, 1:7, 1:7] = 1.0  # foreground 6x6 -> eroded 4x4 at rows/cols 2..5
    pred = torch.zeros(1, 8, 8)
    pred[0, :, :5] = 1  # covered columns 0..4 -> eroded 1..3 (border row/col also go)
    m = evaluation_mask(pred, gt)
    expected = torch.zeros(1, 8, 8, dtype=torch.float64)
    expected[0, 2:6, 2:4] = 1
    assert torch.equal(m, expected)
    # no prediction mask: the gt mask alone
    assert evaluation_mask(None, gt).sum() == 16


def test_evaluation_mask_takes_the_max_per_image():
    gt = torch.full((2, 8, 8), 1.1)
    gt[1] = 1.08  # image 1's background is nearer than image 0's: its own max is 1.08
    gt[:, 1:7, 1:7] = 1.0
    m = evaluation_mask(None, gt)
    assert m[0].sum() == 16 and m[1].sum() == 16  # a batch-wide max (1.1) would keep all of image 1


# ---------------------------------------------------------------------------------------------
# summaries and baselines


def test_summarize_uses_bessel_like_torch_std():
    s = summarize(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert s["mean"] == 2.5 and s["n"] == 4
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))  # 1.290994 = torch.std; numpy's ddof=0 gives 1.118034
    assert s["std"] == pytest.approx(torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item())
    assert summarize([1.0, 2.0, 3.0, 4.0], ddof=0)["std"] == pytest.approx(math.sqrt(1.25))


def test_summarize_drops_nan_and_handles_one_value():
    s = summarize([1.0, float("nan"), 3.0])
    assert s == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    one = summarize([5.0])
    assert one["mean"] == 5.0 and math.isnan(one["std"])


def test_constant_baseline_value_does_not_matter():
    gt = dome()
    mask = evaluation_mask(None, gt)
    a, b = constant_depth_baseline(gt), constant_depth_baseline(gt, value=0.93)
    assert a.shape == gt.shape and a.eq(1.0).all()
    assert side_error(a, gt, mask).item() == pytest.approx(side_error(b, gt, mask).item(), rel=1e-12)
    assert mad_error(a, gt, mask).item() == pytest.approx(mad_error(b, gt, mask).item(), rel=1e-12)
    assert side_error(a, gt, mask).item() > 0


def test_average_depth_baseline_streams_batches():
    torch.manual_seed(0)
    depths = 1 + 0.1 * torch.rand(5, 4, 4)
    expected = depths.double().mean(0)
    torch.testing.assert_close(average_depth_baseline(depths), expected)
    torch.testing.assert_close(average_depth_baseline(iter([depths[:2], depths[2:]])), expected)
    with pytest.raises(ValueError):
        average_depth_baseline([])
