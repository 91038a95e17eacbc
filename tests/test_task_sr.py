"""Tests for the MATLAB-exact bicubic operator (reference.bicubic), the SR protocol (lorun_fast.tasks.sr) and the
Gaussian SSIM it scores with (lorun_fast.metrics.ssim_gaussian).

Expected weights are worked out by hand from MATLAB's formula (Keys cubic, a = −0.5, at the distances given in
each test), not from another resizer.
"""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lorun_fast.metrics import ssim_gaussian
from lorun_fast.reference import BicubicSR, Operator, imresize, imresize_matrix
from lorun_fast.reference import SuperResolution
from lorun_fast.tasks.sr import (SRDegradation, bicubic_baseline, degrade_bicubic, matlab_imresize_uint8, modcrop,
                                 read_hr, sr_scores, upscale_bicubic, y_channel)

# Keys' cubic (a = −0.5) at the distances that occur for ×2: k(1/4) = 111/128, k(3/4) = 29/128,
# k(5/4) = −9/128, k(7/4) = −3/128 (e.g. k(1/4) = 1.5/64 − 2.5/16 + 1).
K_QUARTER, K_THREE_QUARTERS, K_FIVE_QUARTERS, K_SEVEN_QUARTERS = 111 / 128, 29 / 128, -9 / 128, -3 / 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


def _matrix(n_in: int, n_out: int) -> np.ndarray:
    return imresize_matrix(n_in, out_length=n_out).numpy()


# ----------------------------------------------------------------------------------------------------------------
# The 1-D matrices against hand-computed weights
# ----------------------------------------------------------------------------------------------------------------
def test_downscale_x2_interior_weights():
    # Output x (1-based) samples u = 2x − 0.5; the antialiased kernel is ½·k(d/2) on the taps at distance
    # d = ±0.5, ±1.5, ±2.5, ±3.5 (±4.5 gives 0). Their sum is exactly 1, so normalising changes nothing.
    half = [K_QUARTER, K_THREE_QUARTERS, K_FIVE_QUARTERS, K_SEVEN_QUARTERS]
    expected_taps = 0.5 * np.array(half[::-1] + half)  # input pixels 2x−4 … 2x+3 (1-based)
    assert expected_taps.sum() == 1.0
    m = _matrix(16, 8)
    x = 4  # 1-based output pixel, far enough from both borders
    expected = np.zeros(16)
    expected[2 * x - 5: 2 * x + 3] = expected_taps  # 0-based slice of 1-based pixels 2x−4 … 2x+3
    np.testing.assert_array_equal(m[x - 1], expected)


def test_downscale_x2_ramp_and_symmetric_boundary():
    m = _matrix(16, 8)
    # A symmetric kernel preserves a linear ramp away from the borders: output k (0-based) sits at 2k + 0.5.
    ramp = np.arange(16, dtype=np.float64)
    np.testing.assert_allclose((m @ ramp)[2:6], 2 * np.arange(2, 6) + 0.5, atol=1e-13)
    # First output pixel: u = 1.5, taps −2 … 5 (1-based); half-sample mirroring folds 0 → 1, −1 → 2, −2 → 3.
    weight_at = {-2: K_SEVEN_QUARTERS, -1: K_FIVE_QUARTERS, 0: K_THREE_QUARTERS, 1: K_QUARTER,
                 2: K_QUARTER, 3: K_THREE_QUARTERS, 4: K_FIVE_QUARTERS, 5: K_SEVEN_QUARTERS}  # before halving
    folded = {1: weight_at[0] + weight_at[1], 2: weight_at[-1] + weight_at[2], 3: weight_at[-2] + weight_at[3],
              4: weight_at[4], 5: weight_at[5]}
    folded = {pixel: 0.5 * weight for pixel, weight in folded.items()}
    expected = np.zeros(16)
    for pixel, weight in folded.items():
        expected[pixel - 1] = weight
    np.testing.assert_array_equal(m[0], expected)
    np.testing.assert_array_equal(m[-1], expected[::-1])  # the far border mirrors the same way


def test_upscale_x2_weights_interior_and_boundary():
    m = _matrix(8, 16)
    # Output x samples u = x/2 + 1/4 with the plain kernel. x = 4: u = 2.25, distances to pixels 1 … 4 are
    # 1.25, 0.25, −0.75, −1.75.
    expected = np.zeros(8)
    expected[:4] = [K_FIVE_QUARTERS, K_QUARTER, K_THREE_QUARTERS, K_SEVEN_QUARTERS]
    np.testing.assert_array_equal(m[3], expected)
    # x = 1: u = 0.75, taps −1, 0, 1, 2 at distances 1.75, 0.75, −0.25, −1.25; mirroring folds 0 → 1, −1 → 2.
    expected = np.zeros(8)
    expected[0] = K_THREE_QUARTERS + K_QUARTER
    expected[1] = K_SEVEN_QUARTERS + K_FIVE_QUARTERS
    np.testing.assert_array_equal(m[0], expected)


@pytest.mark.parametrize("n_in, kwargs", [(12, {"scale": 0.5}), (15, {"scale": 1 / 3}), (20, {"scale": 0.25}),
                                          (7, {"scale": 2}), (7, {"scale": 3}), (5, {"scale": 4}),
                                          (10, {"out_length": 7}), (7, {"out_length": 10}), (4, {"scale": 0.25})])
def test_rows_sum_to_one_and_constants_survive(n_in, kwargs):
    m = imresize_matrix(n_in, **kwargs)
    assert m.dtype == torch.float64
    np.testing.assert_allclose(m.sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-14)
    x = torch.full((1, 1, n_in, n_in), 7.25, dtype=torch.float64)
    out = imresize(x, kwargs.get("scale"), size=None if "scale" in kwargs else (kwargs["out_length"],) * 2)
    np.testing.assert_allclose(out.numpy(), 7.25, rtol=0, atol=1e-12)


def test_output_length_follows_matlab_ceil():
    assert imresize_matrix(10, scale=1 / 3).shape == (4, 10)  # ceil(10/3)
    assert imresize_matrix(10, scale=0.5, dtype=torch.float32).dtype == torch.float32
    assert imresize_matrix(9, scale=1 / 3) is imresize_matrix(9, scale=1 / 3)  # cached


# ----------------------------------------------------------------------------------------------------------------
# The operator
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale, hw", [(2, (26, 34)), (3, (39, 51)), (4, (52, 68))])
def test_adjointness_float64(scale, hw):
    op = BicubicSR(scale)
    assert isinstance(op, Operator)
    gen = torch.Generator().manual_seed(scale)
    x = torch.randn(2, 3, *hw, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 3, hw[0] // scale, hw[1] // scale, generator=gen, dtype=torch.float64)
    ax = op.A(x)
    assert ax.shape == y.shape
    lhs = torch.sum(ax * y).item()
    rhs = torch.sum(x * op.A_adjoint(y, hw)).item()
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), abs(rhs))
    assert op.A_adjoint(y).shape == x.shape  # size defaults to scale × the measurement


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_operator_matches_imresize_and_init_upscales(scale):
    op = BicubicSR(scale)
    gen = torch.Generator().manual_seed(10 + scale)
    x = torch.rand(1, 2, 8 * scale, 5 * scale, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op.A(x), imresize(x, 1 / scale), rtol=0, atol=1e-13)
    y = op.A(x)
    x0 = op.init(y)
    assert x0.shape == x.shape
    torch.testing.assert_close(x0, imresize(y, scale), rtol=0, atol=1e-13)
    # float32 runs in float32 with the same matrices
    assert op.A(x.float()).dtype == torch.float32
    torch.testing.assert_close(op.A(x.float()).double(), op.A(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_default_step_bounds_the_operator_norm(scale):
    step = BicubicSR(scale).default_step()
    for h, w in ((4 * scale, 4 * scale), (5 * scale, 9 * scale), (31 * scale, 17 * scale)):
        norm_h = torch.linalg.matrix_norm(imresize_matrix(h, out_length=h // scale), ord=2).item()
        norm_w = torch.linalg.matrix_norm(imresize_matrix(w, out_length=w // scale), ord=2).item()
        inverse_norm2 = 1.0 / (norm_h * norm_w) ** 2
        assert step <= inverse_norm2
        assert step >= 0.9999 * inverse_norm2  # and not needlessly small
    assert step == pytest.approx(scale ** 2, rel=1e-4)


def test_gd_step_runs_with_default_step():
    op = BicubicSR(2)
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    y = op.A(torch.rand(1, 1, 16, 16, dtype=torch.float64))
    before = torch.sum((op.A(x) - y) ** 2)
    after = torch.sum((op.A(op.gd_step(x, y, op.default_step())) - y) ** 2)
    assert after < before
    assert "scale=2" in repr(op)


def test_operator_errors():
    with pytest.raises(ValueError, match=r"scale.*\(2, 3, 4\).*5"):
        BicubicSR(5)
    with pytest.raises(ValueError, match="scale"):
        BicubicSR(2.0)
    op = BicubicSR(3)
    with pytest.raises(ValueError, match="not a multiple of the scale 3"):
        op.A(torch.zeros(1, 1, 24, 25, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than"):
        op.A(torch.zeros(1, 1, 6, 24, dtype=torch.float64))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        op.A(np.zeros((1, 1, 24, 24)))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        op.A(torch.zeros(1, 1, 24, 24, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x: expected a 4-D"):
        op.A(torch.zeros(24, 24))
    with pytest.raises(ValueError, match="y: expected a 4-D"):
        op.A_adjoint(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="size"):
        op.A_adjoint(torch.zeros(1, 1, 8, 8), (24, 27))
    with pytest.raises(ValueError, match="exactly one"):
        imresize_matrix(8)
    with pytest.raises(ValueError, match="scale"):
        imresize_matrix(8, scale=float("nan"))
    with pytest.raises(ValueError, match="in_length"):
        imresize_matrix(0, scale=2)


# ----------------------------------------------------------------------------------------------------------------
# uint8 protocol pieces
# ----------------------------------------------------------------------------------------------------------------
def test_matlab_uint8_rounding_is_half_away_from_zero():
    # Rows 0 and 1 of the ×2 matrix of length 8 give pixel 1 (0-based) the weights 102/256 and 29/256
    # (see test_downscale_x2_ramp_and_symmetric_boundary), so 128 there gives exactly 51 and 14.5; MATLAB
    # rounds the tie up to 15 (np.round would give 14). The third output row gives it −3/256 → −1.5 → 0.
    hr = np.zeros((8, 8), dtype=np.uint8)
    hr[1, :] = 128
    lr = degrade_bicubic(hr, 2)
    assert lr.dtype == np.uint8 and lr.shape == (4, 4)
    np.testing.assert_array_equal(lr[:, 0], [51, 15, 0, 0])
    assert np.all(lr == lr[:, :1])


def test_uint8_resize_is_two_rounded_passes_rows_first():
    gen = np.random.default_rng(3)
    img = gen.integers(0, 256, size=(18, 12, 3), dtype=np.uint8)
    rows, cols = _matrix(18, 6), _matrix(12, 4)
    expected = np.empty((6, 4, 3), dtype=np.uint8)
    for c in range(3):
        first = np.floor(np.clip(rows @ img[..., c].astype(np.float64), 0, 255) + 0.5)
        expected[..., c] = np.floor(np.clip(first @ cols.T, 0, 255) + 0.5)
    np.testing.assert_array_equal(degrade_bicubic(img, 3), expected)
    np.testing.assert_array_equal(matlab_imresize_uint8(img[..., 0], size=(6, 4)), expected[..., 0])
    assert upscale_bicubic(expected, 3).shape == (18, 12, 3)


def test_modcrop_and_y_channel():
    img = np.arange(7 * 10 * 3, dtype=np.uint8).reshape(7, 10, 3)
    assert modcrop(img, 3).shape == (6, 9, 3)
    np.testing.assert_array_equal(modcrop(img, 3), img[:6, :9])
    assert modcrop(img[..., 0], 2).shape == (6, 10)
    gray = np.array([[0, 128], [255, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(y_channel(gray), gray.astype(np.float64))  # gray: Y is the image itself
    white = np.full((2, 2, 3), 255, dtype=np.uint8)
    np.testing.assert_allclose(y_channel(white), 235.0)  # RGB: BT.601 studio swing


def test_sr_scores_shave_and_hand_values():
    hr = np.full((40, 40), 100.0)
    sr = hr.copy()
    sr[:3, :] = 0.0  # only inside the shaved border at ×3
    sr[20, 20] = 110.0  # one error of 10 over the 34×34 remaining pixels
    scores = sr_scores(sr, hr, 3)
    assert scores.psnr == pytest.approx(10 * math.log10(255.0 ** 2 / (100.0 / 34 ** 2)), abs=1e-10)
    assert 0.0 < scores.ssim < 1.0
    assert sr_scores(hr, hr, 2).ssim == pytest.approx(1.0, abs=1e-15)


# ----------------------------------------------------------------------------------------------------------------
# Gaussian SSIM
# ----------------------------------------------------------------------------------------------------------------
def _ssim_by_convolution(x: np.ndarray, ref: np.ndarray, pad: int, data_range: float) -> float:
    """The formula of Wang et al. written out with F.conv2d and an 11×11 window (zero padding ``pad``)."""
    g = torch.tensor([math.exp(-((i - 5) ** 2) / (2 * 1.5 ** 2)) for i in range(11)], dtype=torch.float64)
    window = (torch.outer(g, g) / torch.outer(g, g).sum())[None, None]

    def filt(a):
        return F.conv2d(torch.from_numpy(a)[None, None], window, padding=pad)[0, 0]

    mx, mr = filt(x), filt(ref)
    vx, vr, cxr = filt(x * x) - mx ** 2, filt(ref * ref) - mr ** 2, filt(x * ref) - mx * mr
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float((((2 * mx * mr + c1) * (2 * cxr + c2)) / ((mx ** 2 + mr ** 2 + c1) * (vx + vr + c2))).mean())


def test_ssim_gaussian_valid_and_same_against_the_formula():
    gen = np.random.default_rng(0)
    ref = gen.uniform(0, 255, size=(23, 30))
    x = np.clip(ref + gen.normal(0, 25, size=ref.shape), 0, 255)
    assert ssim_gaussian(x, ref) == pytest.approx(_ssim_by_convolution(x, ref, 0, 255.0), abs=1e-13)
    assert ssim_gaussian(x / 255, ref / 255, data_range=1.0, padding="same") == pytest.approx(
        _ssim_by_convolution(x / 255, ref / 255, 5, 1.0), abs=1e-13)
    assert ssim_gaussian(ref, ref) == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_gaussian(x[:10], ref[:10])
    with pytest.raises(ValueError, match="padding"):
        ssim_gaussian(x, ref, padding="reflect")


# ----------------------------------------------------------------------------------------------------------------
# Files and bad input
# ----------------------------------------------------------------------------------------------------------------
def _write_png(path, array: np.ndarray, bit_depth: int, colour_type: int) -> None:
    """A minimal PNG writer, because PIL cannot write 16-bit RGB."""
    h, w = array.shape[:2]
    sample = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + array[i].astype(sample).tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_gray_file_baseline_and_lr_file(tmp_path):
    gen = np.random.default_rng(1)
    hr = (gen.uniform(0, 1, size=(50, 49)) ** 2 * 255).astype(np.uint8)
    hr_path = tmp_path / "gray.png"
    Image.fromarray(hr).save(hr_path)
    assert read_hr(hr_path).shape == (50, 49)
    scores = bicubic_baseline(hr_path, 2)
    cropped = modcrop(hr, 2)
    assert scores == sr_scores(y_channel(upscale_bicubic(degrade_bicubic(cropped, 2), 2)), y_channel(cropped), 2)
    lr_path = tmp_path / "gray_x2.png"
    Image.fromarray(degrade_bicubic(cropped, 2)).save(lr_path)
    assert bicubic_baseline(hr_path, 2, lr_path) == scores
    bad_lr = tmp_path / "gray_x2_bad.png"
    Image.fromarray(degrade_bicubic(cropped, 2)[:-1]).save(bad_lr)
    with pytest.raises(ValueError, match="gray_x2_bad.png.*times 2"):
        bicubic_baseline(hr_path, 2, bad_lr)


def test_file_errors(tmp_path):
    g16 = tmp_path / "gray16.png"
    _write_png(g16, np.full((40, 40), 1000), 16, 0)
    with pytest.raises(ValueError, match="gray16.png"):
        bicubic_baseline(g16, 2)
    rgb16 = tmp_path / "rgb16.png"
    _write_png(rgb16, np.full((40, 40, 3), 1000), 16, 2)
    with pytest.raises(ValueError, match="rgb16.png.*16 bits"):
        bicubic_baseline(rgb16, 2)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(tiny)
    with pytest.raises(ValueError, match="tiny.png.*smaller than"):
        bicubic_baseline(tiny, 3)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        bicubic_baseline(tmp_path / "missing.png", 2)


def test_protocol_errors():
    hr = np.zeros((24, 24, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*5"):
        degrade_bicubic(hr, 5)
    with pytest.raises(ValueError, match="not a multiple of the scale 3"):
        degrade_bicubic(hr[:, :23], 3)
    with pytest.raises(TypeError, match="hr_uint8.*uint8"):
        degrade_bicubic(hr.astype(np.float32), 2)
    y = np.zeros((30, 30))
    bad = y.copy()
    bad[4, 5] = np.nan
    with pytest.raises(ValueError, match="sr_y: 1 non-finite"):
        sr_scores(bad, y, 2)
    with pytest.raises(ValueError, match="hr_y: 1 non-finite"):
        sr_scores(y, np.where(bad == bad, y, np.inf), 2)
    with pytest.raises(ValueError, match="shapes differ"):
        sr_scores(y[:-1], y, 2)
    with pytest.raises(ValueError, match="smaller than the 11"):
        sr_scores(y[:16, :16], y[:16, :16], 4)


# ----------------------------------------------------------------------------------------------------------------
# The Gaussian blur + decimation degradation
# ----------------------------------------------------------------------------------------------------------------
def test_gaussian_degradation_by_hand():
    """σ and the support resolve as documented; the LR is the operator on the 8-bit HR, rounded half away from
    zero and saturated; a constant image stays constant (the kernel sums to 1, circular boundaries)."""
    degradation = SRDegradation(2, "gaussian", 0.7)
    assert degradation.size == 2 * math.ceil(2.1) + 1 == 7
    assert SRDegradation(3, "gaussian").record() == {"scale": 3, "degradation": "gaussian", "blur_sigma": 1.6,
                                                     "blur_size": 11}
    assert SRDegradation.from_record(degradation.record()) == SRDegradation(2, "gaussian", 0.7, 7)
    assert SRDegradation.from_record({"task": "sr", "scale": 3}) == SRDegradation(3)
    operator = degradation.operator()
    assert isinstance(operator, SuperResolution) and operator.scale == 2 and operator.kernel.shape == (7, 7)
    t = np.arange(7) - 3.0
    g = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * 0.7 ** 2))
    np.testing.assert_allclose(operator.kernel.numpy(), g / g.sum(), rtol=1e-12)

    rng = np.random.default_rng(3)
    hr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    lr = degradation.degrade(hr)
    assert lr.dtype == np.uint8 and lr.shape == (6, 5, 3)
    # One LR pixel by hand: the kernel centred on HR pixel (2·1, 2·2), wrapping at the borders.
    k = g / g.sum()
    rows, cols = (np.arange(7) - 3 + 2) % 12, (np.arange(7) - 3 + 4) % 10
    value = float((k * hr[np.ix_(rows, cols, [1])][..., 0]).sum())
    assert lr[1, 2, 1] == math.floor(value + 0.5)
    assert np.all(degradation.degrade(np.full((12, 10), 77, dtype=np.uint8)) == 77)


def test_gaussian_degradation_errors():
    with pytest.raises(ValueError, match="blur_sigma: expected a finite number > 0"):
        SRDegradation(2, "gaussian", -1.0)
    with pytest.raises(ValueError, match="blur_size: expected an odd positive int, got 6"):
        SRDegradation(2, "gaussian", 1.0, 6)
    with pytest.raises(ValueError, match="options of the gaussian degradation, not of bicubic"):
        SRDegradation(2, "bicubic", 1.0)
    with pytest.raises(ValueError, match="degradation: expected one of"):
        SRDegradation(2, "box")
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*5"):
        SRDegradation(5, "gaussian")
    degradation = SRDegradation(4, "gaussian", 2.0, 13)
    with pytest.raises(ValueError, match="not a multiple of the scale 4"):
        degradation.degrade(np.zeros((16, 18), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"smaller than the 13×13 blur kernel's reach \(7 pixels\)"):
        degradation.degrade(np.zeros((4, 16), dtype=np.uint8))


def test_gaussian_baseline_on_a_file(tmp_path):
    """The bicubic baseline on a Gaussian LR: scored by the same protocol, below the bicubic-LR baseline (the
    LR was blurred harder and decimated without the half-pixel centring of imresize)."""
    rng = np.random.default_rng(5)
    small = (rng.random((12, 12)) * 255).astype(np.uint8)
    path = tmp_path / "g.png"
    Image.fromarray(small).resize((48, 48), Image.BICUBIC).save(path)
    plain = bicubic_baseline(path, 2)
    blurred = bicubic_baseline(path, 2, degradation=SRDegradation(2, "gaussian"))
    assert math.isfinite(blurred.psnr) and blurred.psnr < plain.psnr
    with pytest.raises(ValueError, match="a ×3 degradation for scale 2"):
        bicubic_baseline(path, 2, degradation=SRDegradation(3, "gaussian"))


# ----------------------------------------------------------------------------------------------------------------
# The published Set5 bicubic baseline
# ----------------------------------------------------------------------------------------------------------------
SET5_BICUBIC = {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)}


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set5_bicubic_baseline_matches_published(shared_data, scale):
    folder = shared_data / "Set5"
    paths = sorted(folder.glob("*.png"))
    if len(paths) != 5:
        pytest.skip(f"Set5 not found at {folder}")
    scores = [bicubic_baseline(path, scale) for path in paths]
    mean_psnr = float(np.mean([s.psnr for s in scores]))
    mean_ssim = float(np.mean([s.ssim for s in scores]))
    psnr_ref, ssim_ref = SET5_BICUBIC[scale]
    assert mean_psnr == pytest.approx(psnr_ref, abs=0.03)
    assert mean_ssim == pytest.approx(ssim_ref, abs=0.002)
