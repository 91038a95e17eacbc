"""CASSI task: cube reading, 28-band resampling, mask-crop sampler, protocol scores, tiles, GAP-TV, previews."""
import math

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

from lorun_fast.evaluate import ImageResult
from lorun_fast.reference import CASSI
from lorun_fast.tasks import cassi
from lorun_fast.tasks.cassi import (CASSI_WAVELENGTHS, CAVE_WAVELENGTHS, CassiSampler, cassi_scores, evaluate_cassi,
                                    false_colour_png, gap_tv, load_cube_28, load_mask, plot_spectra, read_cube,
                                    reconstructor, tiles, to_28_bands, tv_denoise, use_mask)

pytestmark = pytest.mark.usefixtures("single_thread")

CAVE_FILES = {"feathers": (512, "orig", "/255"), "paints": (512, "orig", "/255"), "sponges": (512, "orig", "/255"),
              "sushi": (512, "orig", "/255"), "cloth_256": (256, "Omsi", "/65535")}


def _save_mat(path, **arrays):
    scipy.io.savemat(str(path), arrays)
    return path


def _smooth_cube(h, w, bands, seed=0):
    """A piecewise-smooth synthetic scene: a few flat rectangles, each with its own smooth spectrum."""
    rng = np.random.default_rng(seed)
    cube = np.full((h, w, bands), 0.1)
    t = np.linspace(0, 1, bands)
    for _ in range(6):
        top, left = rng.integers(0, h - 8), rng.integers(0, w - 8)
        spectrum = 0.2 + 0.6 * np.abs(np.sin(3 * t + rng.uniform(0, 3)))
        cube[top:top + rng.integers(8, h // 2), left:left + rng.integers(8, w // 2)] = spectrum
    return cube


def _psnr_db(x_rec, x_true):
    return cassi_scores(np.clip(x_rec, 0, 1), x_true)[0]


def _to_cube(x):
    return np.moveaxis(x[0].double().numpy(), 0, -1)


def _to_batch(cube, dtype=torch.float64):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(cube, -1, 0)))[None].to(dtype)


# ------------------------------------------------------------------------------------------------------------------
# read_cube
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.data
@pytest.mark.parametrize("scene", sorted(CAVE_FILES))
def test_each_real_cave_file_reads_as_float_cube_in_unit_range(shared_data, scene):
    side, key, scaling = CAVE_FILES[scene]
    cube, description = read_cube(shared_data / "cassi" / "cave" / f"{scene}.mat")
    assert cube.shape == (side, side, 31) and cube.dtype == np.float64
    assert 0.0 <= cube.min() and cube.max() <= 1.0 and cube.max() > 0.5
    assert f"[{key!r}]" in description and scaling in description and "hwb detected" in description


def test_layout_is_detected_both_ways(tmp_path):
    hwb = np.random.default_rng(0).integers(0, 256, size=(20, 16, 5), dtype=np.uint8)
    np.save(tmp_path / "hwb.npy", hwb)
    np.save(tmp_path / "bhw.npy", np.moveaxis(hwb, -1, 0).copy())
    cube_a, note_a = read_cube(tmp_path / "hwb.npy")
    cube_b, note_b = read_cube(tmp_path / "bhw.npy")
    np.testing.assert_array_equal(cube_a, cube_b)
    assert cube_a.shape == (20, 16, 5)
    assert "hwb detected" in note_a and "bhw detected" in note_b


def test_ambiguous_layout_asks_for_it_and_an_explicit_layout_resolves_it(tmp_path):
    np.save(tmp_path / "cube.npy", np.zeros((8, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="layout=") as info:
        read_cube(tmp_path / "cube.npy")
    assert "cube.npy" in str(info.value)
    cube, note = read_cube(tmp_path / "cube.npy", layout="bhw")
    assert cube.shape == (8, 8, 8) and "bhw given" in note


def test_uint8_and_uint16_are_scaled_by_their_full_range(tmp_path):
    _save_mat(tmp_path / "a.mat", orig=np.full((12, 12, 4), 51, dtype=np.uint8))
    _save_mat(tmp_path / "b.mat", Omsi=np.full((12, 12, 4), 13107, dtype=np.uint16))
    cube_a, note_a = read_cube(tmp_path / "a.mat")
    cube_b, note_b = read_cube(tmp_path / "b.mat")
    np.testing.assert_allclose(cube_a, 0.2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(cube_b, 0.2, rtol=0, atol=1e-15)
    assert "/255" in note_a and "/65535" in note_b


def test_float_cube_in_unit_range_is_taken_as_is(tmp_path):
    data = np.random.default_rng(1).random((10, 9, 3)).astype(np.float32)
    np.save(tmp_path / "f.npy", data)
    cube, note = read_cube(tmp_path / "f.npy")
    np.testing.assert_array_equal(cube, data.astype(np.float64))
    assert "as is" in note


def test_float_cube_outside_unit_range_is_refused(tmp_path):
    _save_mat(tmp_path / "big.mat", img=np.full((10, 10, 3), 2.5))
    with pytest.raises(ValueError, match=r"big\.mat.*\[0, 1\]"):
        read_cube(tmp_path / "big.mat")


def test_non_finite_values_are_refused_naming_file_and_key(tmp_path):
    data = np.zeros((10, 10, 3))
    data[1, 2, 0] = np.nan
    _save_mat(tmp_path / "nan.mat", cube=data)
    with pytest.raises(ValueError, match=r"nan\.mat\['cube'\].*NaN"):
        read_cube(tmp_path / "nan.mat")


def test_other_integer_types_are_refused(tmp_path):
    np.save(tmp_path / "i32.npy", np.zeros((10, 10, 3), dtype=np.int32))
    with pytest.raises(ValueError, match=r"i32\.npy.*int32"):
        read_cube(tmp_path / "i32.npy")


def test_several_cubes_in_one_file_need_a_key(tmp_path):
    _save_mat(tmp_path / "two.mat", img=np.zeros((10, 10, 3), np.uint8), data=np.ones((10, 10, 3), np.uint8),
              label=np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"two\.mat.*\['data', 'img'\].*key="):
        read_cube(tmp_path / "two.mat")
    cube, note = read_cube(tmp_path / "two.mat", key="data")
    assert cube.max() == pytest.approx(1 / 255) and "['data']" in note
    with pytest.raises(KeyError, match="two.mat"):
        read_cube(tmp_path / "two.mat", key="nope")


def test_missing_file_and_unknown_suffix_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mat"):
        read_cube(tmp_path / "missing.mat")
    (tmp_path / "cube.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=r"cube\.txt.*\.mat or \.npy"):
        read_cube(tmp_path / "cube.txt")


def test_matlab_v73_file_gets_a_clear_error(tmp_path):
    # the 128-byte MAT header of a v7.3 file (version 0x0200) is what scipy checks before giving up
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    (tmp_path / "v73.mat").write_bytes(header + b"\x00" * 512)
    with pytest.raises(ValueError, match=r"v73\.mat.*v7\.3"):
        read_cube(tmp_path / "v73.mat")


# ------------------------------------------------------------------------------------------------------------------
# Bands
# ------------------------------------------------------------------------------------------------------------------
def test_wavelength_tables_have_the_expected_grids():
    assert len(CAVE_WAVELENGTHS) == 31 and CAVE_WAVELENGTHS[0] == 400 and CAVE_WAVELENGTHS[-1] == 700
    assert len(CASSI_WAVELENGTHS) == 28 and CASSI_WAVELENGTHS[0] == 453.5 and CASSI_WAVELENGTHS[-1] == 648.0
    assert all(b > a for a, b in zip(CASSI_WAVELENGTHS, CASSI_WAVELENGTHS[1:]))


def test_cube_linear_in_wavelength_interpolates_exactly():
    rng = np.random.default_rng(2)
    offset, slope = rng.random((6, 5, 1)), rng.random((6, 5, 1)) * 1e-3
    cube = offset + slope * np.asarray(CAVE_WAVELENGTHS)
    out, note = to_28_bands(cube)
    np.testing.assert_allclose(out, offset + slope * np.asarray(CASSI_WAVELENGTHS), rtol=0, atol=1e-13)
    assert out.shape == (6, 5, 28) and "linear interpolation" in note


def test_nearest_band_picks_the_closest_cave_band_and_the_shorter_on_a_tie():
    cube = np.broadcast_to(np.asarray(CAVE_WAVELENGTHS), (2, 2, 31))
    out, note = to_28_bands(cube, method="nearest")
    assert out[0, 0, 0] == 450.0   # 453.5 nm
    assert out[0, 0, 25] == 620.0  # 625.0 nm, halfway between 620 and 630
    assert out[0, 0, 27] == 650.0  # 648.0 nm
    assert "nearest band" in note


def test_28_band_cube_passes_through_unchanged():
    cube = np.random.default_rng(3).random((4, 4, 28))
    out, note = to_28_bands(cube)
    np.testing.assert_array_equal(out, cube)
    assert "as given" in note


def test_wrong_band_count_is_refused():
    with pytest.raises(ValueError, match="30 bands"):
        to_28_bands(np.zeros((4, 4, 30)))
    with pytest.raises(ValueError, match="does not cover"):
        to_28_bands(np.zeros((4, 4, 3)), wavelengths_in=[500, 550, 600])
    with pytest.raises(ValueError, match="method"):
        to_28_bands(np.zeros((4, 4, 31)), method="cubic")


def test_load_cube_28_describes_reading_and_resampling(tmp_path):
    _save_mat(tmp_path / "s.mat", orig=np.full((40, 40, 31), 255, dtype=np.uint8))
    cube, note = load_cube_28(tmp_path / "s.mat")
    np.testing.assert_allclose(cube, 1.0, rtol=0, atol=1e-15)
    assert cube.shape == (40, 40, 28) and "/255" in note and "linear interpolation" in note
    _save_mat(tmp_path / "bad.mat", orig=np.zeros((40, 40, 20), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"bad\.mat.*20 bands"):
        load_cube_28(tmp_path / "bad.mat")


# ------------------------------------------------------------------------------------------------------------------
# Mask
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.data
def test_default_mask_is_the_shared_256_mask(shared_data):
    mask = load_mask()
    assert mask.shape == (256, 256) and mask.dtype == np.float64
    assert 0.006 < mask.min() and mask.max() == 1.0


def test_bad_masks_are_refused_with_the_file_named(tmp_path):
    _save_mat(tmp_path / "zero.mat", mask=np.zeros((8, 8)))
    _save_mat(tmp_path / "cube.mat", mask=np.ones((8, 8, 2)))
    bad = np.ones((8, 8))
    bad[0, 0] = np.inf
    _save_mat(tmp_path / "inf.mat", mask=bad)
    _save_mat(tmp_path / "nokey.mat", code=np.ones((8, 8)))
    with pytest.raises(ValueError, match=r"zero\.mat.*all zero"):
        load_mask(tmp_path / "zero.mat")
    with pytest.raises(ValueError, match=r"cube\.mat.*2-D"):
        load_mask(tmp_path / "cube.mat")
    with pytest.raises(ValueError, match=r"inf\.mat.*NaN or inf"):
        load_mask(tmp_path / "inf.mat")
    with pytest.raises(KeyError, match=r"nokey\.mat.*'mask'"):
        load_mask(tmp_path / "nokey.mat")
    with pytest.raises(FileNotFoundError, match="absent.mat"):
        load_mask(tmp_path / "absent.mat")


# ------------------------------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------------------------------
def _sampler(**kwargs):
    rng = np.random.default_rng(4)
    scenes = [rng.random((40, 36, 28)), rng.random((32, 50, 28))]
    options = dict(crop=16, batch_size=3, seed=7)
    options.update(kwargs)
    return CassiSampler(scenes, rng.random((24, 24)), **options), scenes


def test_sampler_batch_is_a_pure_function_of_seed_and_step():
    sampler, _ = _sampler()
    x1, m1 = sampler.batch(5)
    x2, m2 = _sampler()[0].batch(5)
    x3, m3 = sampler.batch(6)
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    assert not torch.equal(x1, x3)
    assert not torch.equal(_sampler(seed=8)[0].batch(5)[0], x1)


def test_sampler_shapes_dtypes_and_one_mask_crop_per_batch():
    sampler, _ = _sampler()
    x, mask_crop = sampler.batch(0)
    assert x.shape == (3, 28, 16, 16) and x.dtype == torch.float32
    assert mask_crop.shape == (16, 16) and mask_crop.dtype == torch.float32
    mask = torch.from_numpy(sampler.mask)
    crops = [mask[t:t + 16, l:l + 16] for t in range(9) for l in range(9)]
    assert any(torch.equal(mask_crop, c) for c in crops)


def test_sampler_without_augment_gives_plain_crops_of_the_scenes():
    sampler, scenes = _sampler(augment=False, batch_size=4)
    x, _ = sampler.batch(3)
    for patch in x.numpy():
        patch = np.moveaxis(patch, 0, -1)
        found = any(np.array_equal(patch, s.astype(np.float32)[t:t + 16, l:l + 16])
                    for s in scenes for t in range(s.shape[0] - 15) for l in range(s.shape[1] - 15))
        assert found


def test_sampler_refuses_a_crop_larger_than_the_mask_or_a_scene():
    with pytest.raises(ValueError, match="larger than the mask"):
        _sampler(crop=30)
    with pytest.raises(ValueError, match=r"larger than 1 scene\(s\), e.g. scene 1 of size 32×50"):
        CassiSampler([np.zeros((40, 40, 28)), np.zeros((32, 50, 28))], np.ones((64, 64)), crop=36, batch_size=1)
    with pytest.raises(ValueError, match="same number of bands"):
        CassiSampler([np.zeros((40, 40, 28)), np.zeros((40, 40, 31))], np.ones((64, 64)), crop=8, batch_size=1)


def test_use_mask_copies_the_batch_mask_into_the_operator():
    operator = CASSI(torch.ones(16, 16), 28, 2)
    crop = torch.rand(16, 16)
    use_mask(operator, crop)
    assert torch.equal(operator.mask, crop)
    other = torch.rand(8, 8, dtype=torch.float64)  # another size (evaluation tiles): the buffer is replaced
    use_mask(operator, other)
    assert operator.mask.shape == (8, 8) and operator.mask.dtype == torch.float32
    assert operator.A(torch.rand(1, 28, 8, 8)).shape == (1, 8, 8 + 54)
    with pytest.raises(ValueError, match="2-D"):
        use_mask(operator, torch.rand(8))


# ------------------------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------------------------
def test_constant_offset_gives_the_known_psnr():
    truth = np.random.default_rng(5).random((32, 32, 28)) * 0.9
    psnr, _ = cassi_scores(truth + 0.01, truth)
    assert psnr == pytest.approx(40.0, abs=1e-9)  # 20·log10(1 / 0.01)


def test_psnr_is_averaged_over_bands_not_computed_on_the_whole_cube():
    truth = np.zeros((16, 16, 3))
    deltas = np.array([0.1, 0.01, 0.001])
    psnr, _ = cassi_scores(truth + deltas, truth)
    assert psnr == pytest.approx(np.mean(20 * np.log10(1 / deltas)), abs=1e-9)  # 40 dB
    assert psnr != pytest.approx(10 * np.log10(1 / np.mean(deltas ** 2)), abs=1e-3)


def test_identical_cubes_give_infinite_psnr_and_ssim_one():
    truth = np.random.default_rng(6).random((20, 20, 4))
    psnr, ssim = cassi_scores(truth, truth.copy())
    assert psnr == math.inf and ssim == pytest.approx(1.0, abs=1e-12)


def _mst_ssim_2d(x, ref):
    """MST's torch_ssim written out with one 2-D conv2d over all bands (groups = bands), float64."""
    t = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-t ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    bands = x.shape[-1]
    window = (g[:, None] @ g[None, :]).expand(bands, 1, 11, 11).contiguous()
    a = torch.from_numpy(np.moveaxis(x, -1, 0))[None]
    b = torch.from_numpy(np.moveaxis(ref, -1, 0))[None]

    def conv(img):
        return F.conv2d(img, window, padding=5, groups=bands)

    mu1, mu2 = conv(a), conv(b)
    s1, s2, s12 = conv(a * a) - mu1 ** 2, conv(b * b) - mu2 ** 2, conv(a * b) - mu1 * mu2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float((((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))).mean())


def test_ssim_matches_msts_gaussian_zero_padded_whole_map_mean():
    rng = np.random.default_rng(7)
    truth = rng.random((24, 30, 5))
    noisy = np.clip(truth + rng.normal(0, 0.1, truth.shape), 0, 1)
    _, ssim = cassi_scores(noisy, truth)
    assert ssim == pytest.approx(_mst_ssim_2d(noisy, truth), abs=1e-12)
    assert 0.0 < ssim < 1.0


def test_scores_accept_tensors_and_refuse_shape_mismatch():
    truth = np.random.default_rng(8).random((12, 12, 3))
    assert cassi_scores(torch.from_numpy(truth + 0.1), truth)[0] == pytest.approx(20.0, abs=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        cassi_scores(truth[:, :, :2], truth)


# ------------------------------------------------------------------------------------------------------------------
# Tiles
# ------------------------------------------------------------------------------------------------------------------
def test_center_tile_is_the_centred_crop_named_after_the_scene():
    cube = np.random.default_rng(9).random((70, 90, 2))
    [(name, tile)] = tiles(cube, 32, "center", "feathers")
    assert name == "feathers"
    np.testing.assert_array_equal(tile, cube[19:51, 29:61])


def test_tiles_cover_the_scene_row_by_row_and_drop_the_remainder():
    cube = np.random.default_rng(10).random((70, 100, 2))
    result = tiles(cube, 32, "tiles", "feathers")
    assert [n for n, _ in result] == ["feathers_r0c0", "feathers_r0c1", "feathers_r0c2",
                                      "feathers_r1c0", "feathers_r1c1", "feathers_r1c2"]
    np.testing.assert_array_equal(dict(result)["feathers_r1c2"], cube[32:64, 64:96])


def test_tiles_refuse_a_scene_smaller_than_the_tile_and_unknown_modes():
    with pytest.raises(ValueError, match="smaller than the 32×32"):
        tiles(np.zeros((31, 64, 2)), 32)
    with pytest.raises(ValueError, match="mode"):
        tiles(np.zeros((64, 64, 2)), 32, "random")


# ------------------------------------------------------------------------------------------------------------------
# GAP-TV
# ------------------------------------------------------------------------------------------------------------------
def test_tv_denoise_keeps_a_constant_image_and_smooths_noise():
    flat = torch.full((1, 2, 16, 16), 0.3, dtype=torch.float64)
    torch.testing.assert_close(tv_denoise(flat, 0.1, 10), flat)
    noisy = flat + 0.05 * torch.randn(flat.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (tv_denoise(noisy, 0.05, 20) - flat).pow(2).mean() < 0.5 * (noisy - flat).pow(2).mean()


def test_gap_tv_improves_on_x0_for_a_synthetic_scene():
    cube = _smooth_cube(48, 48, 28, seed=1)
    mask = torch.from_numpy(np.random.default_rng(2).random((48, 48)))
    operator = CASSI(mask, 28, 2)
    y = operator.A(_to_batch(cube))
    x0_psnr = _psnr_db(_to_cube(operator.init(y)), cube)
    gap_psnr = _psnr_db(_to_cube(gap_tv(y, operator, iterations=40, tv_weight=0.05, tv_iterations=5)), cube)
    assert gap_psnr > x0_psnr + 3


@pytest.mark.data
def test_gap_tv_improves_on_x0_for_a_real_cave_crop(shared_data):
    cube, _ = load_cube_28(shared_data / "cassi" / "cave" / "feathers.mat")
    [(_, tile)] = tiles(cube, 128, "center", "feathers")
    operator = CASSI(torch.from_numpy(load_mask()[64:192, 64:192]).float(), 28, 2)
    y = operator.A(_to_batch(tile, torch.float32))
    x0_psnr = _psnr_db(_to_cube(operator.init(y)), tile)
    gap_psnr = _psnr_db(_to_cube(gap_tv(y, operator, iterations=30, tv_weight=0.1, tv_iterations=5)), tile)
    assert gap_psnr > x0_psnr + 2, (x0_psnr, gap_psnr)


# ------------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------------
def test_evaluate_cassi_gives_one_row_per_tile_and_writes_previews(tmp_path):
    for seed, name in enumerate(["alpha", "beta"]):
        np.save(tmp_path / f"{name}.npy", _smooth_cube(64, 32, 31, seed).astype(np.float32))
    mask = np.random.default_rng(3).random((32, 32))
    paths = [tmp_path / "alpha.npy", tmp_path / "beta.npy"]
    x0_rows = evaluate_cassi(reconstructor("x0"), paths, mask, mode="tiles", dtype=torch.float64)
    gap_rows = evaluate_cassi(reconstructor("gap-tv", iterations=20, tv_iterations=3), paths, mask, mode="tiles",
                              dtype=torch.float64, out_dir=tmp_path / "out")
    assert [r.name for r in gap_rows] == ["alpha_r0c0", "alpha_r1c0", "beta_r0c0", "beta_r1c0"]
    assert all(isinstance(r, ImageResult) and (r.height, r.width) == (32, 32) and r.seconds >= 0 for r in gap_rows)
    assert np.mean([r.psnr for r in gap_rows]) > np.mean([r.psnr for r in x0_rows]) + 2
    assert (tmp_path / "out" / "beta_r1c0.png").is_file() and (tmp_path / "out" / "beta_r1c0_spectra.png").is_file()
    with pytest.raises(ValueError, match="does not match the 16×16"):
        evaluate_cassi(reconstructor("x0"), paths, mask, size=16)


def test_reconstructor_runs_a_model_with_the_evaluation_mask():
    class ShiftBack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.operator = CASSI(torch.ones(8, 8, dtype=torch.float64), 28, 2)

        def forward(self, y, size=None):
            return self.operator.init(y, size)

    model = ShiftBack()
    operator = CASSI(torch.rand(8, 8, dtype=torch.float64) + 0.1, 28, 2)
    y = operator.A(torch.rand(1, 28, 8, 8, dtype=torch.float64))
    torch.testing.assert_close(reconstructor(model)(y, operator), operator.init(y))
    assert torch.equal(model.operator.mask, operator.mask)
    with pytest.raises(ValueError, match="x0"):
        reconstructor("admm")


# ------------------------------------------------------------------------------------------------------------------
# Previews
# ------------------------------------------------------------------------------------------------------------------
def test_false_colour_png_is_an_rgb_image_of_the_cube_size(tmp_path):
    cube = _smooth_cube(20, 30, 28)
    path = false_colour_png(cube, tmp_path / "sub" / "scene.png")
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (30, 20)
        assert np.asarray(image).max() == 255
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".")]  # no temp file left


def test_plot_spectra_writes_a_png(tmp_path):
    truth = _smooth_cube(20, 20, 28)
    path = plot_spectra(truth * 0.9, truth, tmp_path / "spectra.png", pixels=[(3, 4), (15, 15), (10, 2)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="outside"):
        plot_spectra(truth, truth, tmp_path / "x.png", pixels=[(20, 0)])


def test_module_lists_its_public_names():
    assert all(hasattr(cassi, name) for name in cassi.__all__)
