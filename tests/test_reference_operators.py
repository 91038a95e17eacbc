"""The reference degradation operators (lorun_fast.reference.operators): adjointness in float64, the GD step,
the conventions each operator fixes (block layout, dispersion, decimation), bad input and the real data files."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F

from lorun_fast.io import data_root
from lorun_fast.reference import CASSI, BlockCS, SuperResolution, gaussian_kernel, load_mat_array
from lorun_fast.reference.operators import cs_measurement_size

TOL = {
    "adjoint_rel": 1e-12,  # |<Ax, r> − <x, Aᵀr>| / |<Ax, r>| in float64
    "float64": dict(rtol=1e-12, atol=1e-12),  # two float64 evaluations of one linear map
    "orthonormal": 1e-12,  # max |ΦΦᵀ − I| of a float64 QR
    "orthonormal_mat": 1e-10,  # max |ΦΦᵀ − I| of ISTA-Net's published matrices (measured ≈ 1e-14)
}
B = 33
N_BLOCK = B * B


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("single_thread")


@functools.lru_cache(maxsize=None)
def _gaussian(ratio: float, seed: int) -> BlockCS:
    """BlockCS.gaussian, built once per (ratio, seed): the QR of a 1089 × m matrix is the slow part."""
    return BlockCS.gaussian(ratio, seed=seed)


def _randn(gen, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _assert_adjoint(op, x: torch.Tensor, r: torch.Tensor) -> None:
    ax = op.A(x)
    assert ax.shape == r.shape
    atr = op.A_adjoint(r, tuple(x.shape[-2:]))
    assert atr.shape == x.shape
    lhs = float(torch.sum(ax * r))
    rhs = float(torch.sum(x * atr))
    assert abs(lhs) > 1e-6
    assert abs(lhs - rhs) / abs(lhs) < TOL["adjoint_rel"], (lhs, rhs)


# ----------------------------------------------------------------------------------------------------------------
# Block CS
# ----------------------------------------------------------------------------------------------------------------
def _blocks_by_loop(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, C, Hb, Wb, 1089) by zero-padding and taking x[i*33:(i+1)*33, j*33:(j+1)*33] row-major."""
    n, c, h, w = x.shape
    hb, wb = math.ceil(h / B), math.ceil(w / B)
    xp = torch.zeros(n, c, hb * B, wb * B, dtype=x.dtype)
    xp[..., :h, :w] = x
    out = torch.empty(n, c, hb, wb, N_BLOCK, dtype=x.dtype)
    for i in range(hb):
        for j in range(wb):
            out[:, :, i, j] = xp[:, :, i * B:(i + 1) * B, j * B:(j + 1) * B].reshape(n, c, -1)
    return out


def _image_from_blocks_by_loop(blocks: torch.Tensor, size) -> torch.Tensor:
    n, c, hb, wb, _ = blocks.shape
    x = torch.empty(n, c, hb * B, wb * B, dtype=blocks.dtype)
    for i in range(hb):
        for j in range(wb):
            x[:, :, i * B:(i + 1) * B, j * B:(j + 1) * B] = blocks[:, :, i, j].reshape(n, c, B, B)
    return x[..., :size[0], :size[1]]


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("size", [(33, 33), (70, 101), (66, 99)])
def test_blockcs_adjoint_gaussian(ratio, size):
    gen = _gen(hash((ratio, size)) % 2**31)
    op = _gaussian(ratio, 3)
    x = _randn(gen, 2, 1, *size)
    hb, wb = math.ceil(size[0] / B), math.ceil(size[1] / B)
    r = _randn(gen, 2, 1, hb, wb, op.num_measurements)
    _assert_adjoint(op, x, r)


@pytest.mark.parametrize("size", [(33, 33), (70, 101)])
def test_blockcs_adjoint_non_orthonormal_phi(size):
    gen = _gen(21)
    phi = _randn(gen, 150, N_BLOCK) * 0.3 + 0.1  # not orthonormal, not zero-mean
    op = BlockCS(phi)
    assert (phi @ phi.T - torch.eye(150, dtype=torch.float64)).abs().max() > 1
    x = _randn(gen, 1, 2, *size)
    r = _randn(gen, 1, 2, math.ceil(size[0] / B), math.ceil(size[1] / B), 150)
    _assert_adjoint(op, x, r)


@pytest.mark.parametrize("size", [(33, 66), (70, 101)])
def test_blockcs_blocks_row_major(size):
    gen = _gen(22)
    op = BlockCS(_randn(gen, 40, N_BLOCK))
    x = _randn(gen, 2, 3, *size)
    hb, wb = math.ceil(size[0] / B), math.ceil(size[1] / B)
    y = op.A(x)
    assert y.shape == (2, 3, hb, wb, 40)
    assert torch.equal(op.to_blocks(x), _blocks_by_loop(x))
    expected = torch.empty_like(y)
    blocks = _blocks_by_loop(x)
    for i in range(hb):
        for j in range(wb):
            expected[:, :, i, j] = blocks[:, :, i, j] @ op.phi.T
    torch.testing.assert_close(y, expected, **TOL["float64"])
    # a single pixel lands at index row*33 + col of its block
    for (row, col), (i, j) in [((5, 33 + 7), (0, 1)), ((32, 0), (0, 0)), ((size[0] - 1, size[1] - 1), (hb - 1, wb - 1))]:
        e = torch.zeros(1, 1, *size, dtype=torch.float64)
        e[0, 0, row, col] = 1.0
        b = op.to_blocks(e)
        assert b[0, 0, i, j].nonzero().flatten().tolist() == [(row % 33) * 33 + col % 33]
        assert b.sum() == 1


def test_blockcs_gaussian_phi_orthonormal_and_seeded():
    for ratio, m in [(0.1, 109), (0.25, 272), (0.5, 545)]:
        op = _gaussian(ratio, 3)
        assert op.phi.shape == (m, N_BLOCK) and op.phi.dtype == torch.float64
        assert op.num_measurements == m and op.ratio == pytest.approx(m / N_BLOCK)
        eye = torch.eye(m, dtype=torch.float64)
        assert (op.phi @ op.phi.T - eye).abs().max() < TOL["orthonormal"]
    assert torch.equal(BlockCS.gaussian(0.1, seed=3).phi, _gaussian(0.1, 3).phi)  # reproducible per seed
    assert not torch.allclose(BlockCS.gaussian(0.1, seed=4).phi, _gaussian(0.1, 3).phi)
    assert BlockCS.gaussian(0.1, seed=3, block_size=8).phi.shape == (6, 64)
    assert _gaussian(0.25, 3).default_step() == 1.0


@pytest.mark.parametrize("ratio, m", [(0.01, 11), (0.1, 109), (0.25, 272), (0.3, 327), (0.4, 436), (0.5, 545),
                                      (1.0, 1089), (1e-6, 1)])
def test_cs_measurement_size(ratio, m):
    assert cs_measurement_size(ratio) == m


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_cs_measurement_size_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        cs_measurement_size(ratio)


def test_blockcs_default_step_bounds_the_norm():
    gen = _gen(23)
    op = BlockCS(_randn(gen, 60, N_BLOCK))
    norm2 = torch.linalg.matrix_norm(op.phi, ord=2) ** 2
    assert op.default_step() == pytest.approx(float(1 / norm2), rel=1e-12)


def test_blockcs_init_qinit_and_adjoint():
    gen = _gen(24)
    phi = _randn(gen, 30, N_BLOCK)
    qinit = _randn(gen, N_BLOCK, 30)
    size = (40, 70)
    y = _randn(gen, 2, 1, 2, 3, 30)
    # with Qinit: x0_b = Qinit @ y_b, block by block
    op = BlockCS(phi, qinit)
    expected = torch.empty(2, 1, 2, 3, N_BLOCK, dtype=torch.float64)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                expected[n, 0, i, j] = qinit @ y[n, 0, i, j]
    torch.testing.assert_close(op.init(y, size), _image_from_blocks_by_loop(expected, size), **TOL["float64"])
    assert op.init(y).shape == (2, 1, 66, 99)
    # without Qinit: Φᵀ y
    op = BlockCS(phi)
    expected = torch.einsum("mn,bcijm->bcijn", phi, y)
    torch.testing.assert_close(op.init(y, size), _image_from_blocks_by_loop(expected, size), **TOL["float64"])
    torch.testing.assert_close(op.init(y, size), op.A_adjoint(y, size), rtol=0, atol=0)


@pytest.mark.parametrize("size", [(33, 66), (70, 101)])
def test_blockcs_gd_step_formulas(size):
    gen = _gen(25)
    op = _gaussian(0.25, 1)
    phi = op.phi
    x = _randn(gen, 2, 1, *size)
    hb, wb = math.ceil(size[0] / B), math.ceil(size[1] / B)
    y = _randn(gen, 2, 1, hb, wb, op.num_measurements)
    rho = 0.37
    z = op.gd_step(x, y, rho)
    assert z.shape == x.shape
    # the generic formula x − ρ·Aᵀ(Ax − y), with a float and with a 0-d tensor step
    torch.testing.assert_close(z, x - rho * op.A_adjoint(op.A(x) - y, size), **TOL["float64"])
    torch.testing.assert_close(op.gd_step(x, y, torch.tensor(rho, dtype=torch.float64)), z, rtol=0, atol=0)
    # ISTA-Net's row formula on each flattened block: r = x − ρ x·ΦᵀΦ + ρ·y·Φ
    phitphi = phi.T @ phi
    blocks = _blocks_by_loop(x)
    out = torch.empty_like(blocks)
    for n in range(2):
        for i in range(hb):
            for j in range(wb):
                xb = blocks[n, 0, i, j][None]  # a row vector (1, 1089)
                yb = y[n, 0, i, j][None]
                out[n, 0, i, j] = (xb - rho * xb @ phitphi + rho * yb @ phi)[0]
    torch.testing.assert_close(z, _image_from_blocks_by_loop(out, size), **TOL["float64"])
    # and via unfold, the other independent way to cut blocks (pad first, then non-overlapping patches)
    xp = F.pad(x, (0, wb * B - size[1], 0, hb * B - size[0]))
    cols = F.unfold(xp, B, stride=B).transpose(1, 2)  # (N, L, 1089), L in row-major block order
    ycols = y.reshape(2, hb * wb, -1)
    rcols = cols - rho * cols @ phitphi + rho * ycols @ phi
    r = F.fold(rcols.transpose(1, 2), (hb * B, wb * B), B, stride=B)[..., :size[0], :size[1]]
    torch.testing.assert_close(z, r, **TOL["float64"])


def test_blockcs_from_mat(tmp_path):
    gen = _gen(26)
    phi, qinit = _randn(gen, 20, N_BLOCK), _randn(gen, N_BLOCK, 20)
    scipy.io.savemat(tmp_path / "phi.mat", {"phi": phi.numpy()})
    scipy.io.savemat(tmp_path / "q.mat", {"Qinit": qinit.numpy()})
    op = BlockCS.from_mat(tmp_path / "phi.mat", tmp_path / "q.mat")
    assert torch.equal(op.phi, phi) and torch.equal(op.qinit, qinit)
    assert BlockCS.from_mat(str(tmp_path / "phi.mat")).qinit is None


# ----------------------------------------------------------------------------------------------------------------
# CASSI
# ----------------------------------------------------------------------------------------------------------------
def _cassi_a_loops(mask, x, step):
    n, bands, h, w = x.shape
    y = torch.zeros(n, h, w + step * (bands - 1), dtype=x.dtype)
    for b in range(n):
        for lam in range(bands):
            for i in range(h):
                for j in range(w):
                    y[b, i, j + step * lam] += mask[i, j] * x[b, lam, i, j]
    return y


def _cassi_at_loops(mask, r, bands, step):
    n, h, _ = r.shape
    w = mask.shape[1]
    x = torch.zeros(n, bands, h, w, dtype=r.dtype)
    for b in range(n):
        for lam in range(bands):
            for i in range(h):
                for j in range(w):
                    x[b, lam, i, j] = mask[i, j] * r[b, i, j + step * lam]
    return x


@pytest.mark.parametrize("bands, step", [(28, 2), (7, 3), (3, 0)])
def test_cassi_adjoint(bands, step):
    gen = _gen(31 + bands)
    mask = torch.rand(32, 40, generator=gen, dtype=torch.float64)
    op = CASSI(mask, bands, step)
    x = _randn(gen, 2, bands, 32, 40)
    r = _randn(gen, 2, 32, 40 + step * (bands - 1))
    _assert_adjoint(op, x, r)


def test_cassi_explicit_shift_and_sum_tiny():
    gen = _gen(32)
    mask = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    for bands, step in [(3, 2), (4, 1)]:
        op = CASSI(mask, bands, step)
        x = _randn(gen, 2, bands, 3, 4)
        y = op.A(x)
        assert y.shape == (2, 3, 4 + step * (bands - 1))
        torch.testing.assert_close(y, _cassi_a_loops(mask, x, step), **TOL["float64"])
        r = _randn(gen, *y.shape)
        torch.testing.assert_close(op.A_adjoint(r), _cassi_at_loops(mask, r, bands, step), **TOL["float64"])
        z = op.gd_step(x, r, 0.3)
        expected = x - 0.3 * _cassi_at_loops(mask, _cassi_a_loops(mask, x, step) - r, bands, step)
        torch.testing.assert_close(z, expected, **TOL["float64"])


def test_cassi_measurement_width_28_bands():
    op = CASSI(torch.rand(4, 256, generator=_gen(33)), 28, 2)
    assert op.measurement_width == 256 + 2 * 27 == 310
    y = op.A(torch.rand(1, 28, 4, 256, generator=_gen(34)))
    assert y.shape == (1, 4, 310)
    assert op.image_size(y) == (4, 256)


def test_cassi_gd_step_formula_and_init():
    gen = _gen(35)
    mask = torch.rand(8, 12, generator=gen, dtype=torch.float64) * 0.9 + 0.1
    op = CASSI(mask, 5, 2)
    x = _randn(gen, 2, 5, 8, 12)
    y = _randn(gen, 2, 8, 20)
    torch.testing.assert_close(op.gd_step(x, y, 0.21), x - 0.21 * op.A_adjoint(op.A(x) - y), **TOL["float64"])
    # init = Aᵀ(y / Σ_λ shift_λ(mask²)); default_step = 1 / max Σ_λ shift_λ(mask²) = 1/‖A‖² (AAᵀ is diagonal)
    weight = _cassi_a_loops(mask, mask.expand(1, 5, 8, 12), 2)[0]
    torch.testing.assert_close(op.init(y), op.A_adjoint(y / weight), **TOL["float64"])
    assert op.default_step() == pytest.approx(float(1 / weight.max()), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Super-resolution
# ----------------------------------------------------------------------------------------------------------------
def _sr_a_explicit(kernel, x, scale):
    """y[i, j] = Σ_ab k[a, b]·x[(s·i + a − p) mod H, (s·j + b − q) mod W]: circular correlation, then decimation."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    p, q = kh // 2, kw // 2
    y = torch.zeros(n, c, h // scale, w // scale, dtype=x.dtype)
    for i in range(h // scale):
        for j in range(w // scale):
            for a in range(kh):
                for b in range(kw):
                    y[..., i, j] += kernel[a, b] * x[..., (scale * i + a - p) % h, (scale * j + b - q) % w]
    return y


def _kernels(gen):
    return {
        "gauss3": gaussian_kernel(3, 0.8),
        "gauss5": gaussian_kernel(5, 1.2),
        "gauss7": gaussian_kernel(7, 1.6),
        "random5": torch.rand(5, 5, generator=gen, dtype=torch.float64),
        "random3x7": torch.rand(3, 7, generator=gen, dtype=torch.float64),
        "random7": _randn(gen, 7, 7),
    }


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("kernel_name", ["gauss3", "gauss5", "gauss7", "random5", "random3x7", "random7"])
def test_sr_adjoint(scale, kernel_name):
    gen = _gen(40 + scale)
    kernel = _kernels(gen)[kernel_name]
    op = SuperResolution(kernel, scale)
    x = _randn(gen, 2, 3, 24, 36)
    r = _randn(gen, 2, 3, 24 // scale, 36 // scale)
    _assert_adjoint(op, x, r)
    torch.testing.assert_close(op.gd_step(x, r, 0.8), x - 0.8 * op.A_adjoint(op.A(x) - r, (24, 36)),
                               **TOL["float64"])


def test_sr_explicit_correlation_and_decimation_tiny():
    gen = _gen(41)
    for kernel, scale, size in [(_randn(gen, 3, 3), 2, (6, 8)), (_randn(gen, 5, 3), 3, (6, 9)),
                                (gaussian_kernel(5, 1.0), 2, (4, 6))]:
        op = SuperResolution(kernel, scale)
        x = _randn(gen, 1, 2, *size)
        torch.testing.assert_close(op.A(x), _sr_a_explicit(kernel, x, scale), **TOL["float64"])
    # a non-symmetric kernel is correlated, not convolved: a delta image reproduces the flipped kernel
    kernel = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    op = SuperResolution(kernel, 1)
    e = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    e[0, 0, 2, 2] = 1
    assert torch.equal(op.A(e)[0, 0, 1:4, 1:4], kernel.flip(0, 1))


def test_sr_misc():
    k = gaussian_kernel(7, 1.6)
    assert k.shape == (7, 7) and k.dtype == torch.float64
    assert float(k.sum()) == pytest.approx(1.0, rel=1e-14)
    torch.testing.assert_close(k, k.T, rtol=0, atol=0)
    op = SuperResolution(k, 4)
    y = torch.rand(1, 1, 6, 9, generator=_gen(42), dtype=torch.float64)
    assert op.image_size(y) == (24, 36)
    assert op.init(y).shape == (1, 1, 24, 36)
    assert op.A_adjoint(y).shape == (1, 1, 24, 36)
    # default_step ≤ 1/‖A‖² (power iteration estimate of ‖A‖²)
    v = torch.rand(1, 1, 24, 36, generator=_gen(43), dtype=torch.float64)
    for _ in range(50):
        v = op.A_adjoint(op.A(v))
        norm = v.norm()
        v = v / norm
    assert op.default_step() * float(norm) <= 1 + 1e-9


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
def test_blockcs_bad_phi_and_qinit():
    with pytest.raises(ValueError, match=r"phi: expected width 1089"):
        BlockCS(torch.zeros(10, 1000, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"phi"):
        BlockCS(torch.zeros(1089, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"phi: expected 1 to 1089 rows"):
        BlockCS(torch.zeros(1090, 1089, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"qinit: expected shape \(1089, 10\)"):
        BlockCS(torch.zeros(10, 1089, dtype=torch.float64), torch.zeros(10, 1089, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"qinit"):
        BlockCS(torch.zeros(10, 1089, dtype=torch.float64), torch.zeros(1089, 11, dtype=torch.float64))


def test_blockcs_bad_measurement_and_image():
    gen = _gen(50)
    op = _gaussian(0.1, 0)
    x = _randn(gen, 1, 1, 66, 66)
    for bad in [_randn(gen, 1, 1, 2, 2, 108), _randn(gen, 1, 2, 2, 109), _randn(gen, 2, 2, 109)]:
        with pytest.raises(ValueError, match=r"y: expected \(N, C, Hb, Wb, 109\)"):
            op.A_adjoint(bad)
        with pytest.raises(ValueError, match=r"y: expected"):
            op.gd_step(x, bad, 1.0)
        with pytest.raises(ValueError, match=r"y: expected"):
            op.init(bad)
    # right m, wrong number of blocks or batch: must not broadcast silently
    for bad in [_randn(gen, 1, 1, 1, 1, 109), _randn(gen, 2, 1, 2, 2, 109), _randn(gen, 1, 1, 2, 3, 109)]:
        with pytest.raises(ValueError, match=r"y: expected the measurement shape \(1, 1, 2, 2, 109\)"):
            op.gd_step(x, bad, 1.0)
    with pytest.raises(ValueError, match=r"size"):
        op.A_adjoint(_randn(gen, 1, 1, 2, 2, 109), (33, 66))
    for size in [(32, 40), (40, 20), (1, 1)]:
        with pytest.raises(ValueError, match=r"x: image .* smaller than one 33×33 block"):
            op.A(_randn(gen, 1, 1, *size))
    with pytest.raises(ValueError, match=r"x: expected a 4-D batch"):
        op.A(_randn(gen, 66, 66))
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor"):
        op.A(torch.zeros(1, 1, 33, 33, dtype=torch.int64))


def test_cassi_bad_input():
    gen = _gen(51)
    op = CASSI(torch.rand(8, 10, generator=gen, dtype=torch.float64), 28, 2)
    with pytest.raises(ValueError, match=r"x: expected 28 channel"):
        op.A(_randn(gen, 1, 27, 8, 10))
    with pytest.raises(ValueError, match=r"x: expected spatial size \(8, 10\)"):
        op.A(_randn(gen, 1, 28, 8, 11))
    x = _randn(gen, 2, 28, 8, 10)
    for bad in [_randn(gen, 2, 8, 63), _randn(gen, 2, 9, 64), _randn(gen, 2, 1, 8, 64), _randn(gen, 8, 64)]:
        with pytest.raises(ValueError, match=r"y: expected \(N, 8, 64\)"):
            op.A_adjoint(bad)
        with pytest.raises(ValueError, match=r"y: expected"):
            op.gd_step(x, bad, 1.0)
    with pytest.raises(ValueError, match=r"y: expected the measurement shape \(2, 8, 64\)"):
        op.gd_step(x, _randn(gen, 1, 8, 64), 1.0)  # batch 1 against 2 must not broadcast
    with pytest.raises(ValueError, match=r"mask"):
        CASSI(torch.rand(8), 28, 2)
    with pytest.raises(ValueError, match=r"num_bands"):
        CASSI(torch.rand(8, 10), 0, 2)


def test_sr_bad_input():
    gen = _gen(52)
    op = SuperResolution(gaussian_kernel(5, 1.0), 3)
    for size in [(25, 36), (24, 35), (10, 10)]:
        with pytest.raises(ValueError, match=r"x: image .* not a multiple of the scale 3"):
            op.A(_randn(gen, 1, 1, *size))
    with pytest.raises(ValueError, match=r"y: .* is not the measurement of a"):
        op.A_adjoint(_randn(gen, 1, 1, 8, 12), (27, 36))
    for shape in [(4, 4), (3, 4), (4, 5)]:
        with pytest.raises(ValueError, match=r"kernel: expected odd sizes"):
            SuperResolution(torch.ones(*shape), 2)
    with pytest.raises(ValueError, match=r"kernel"):
        SuperResolution(torch.ones(5), 2)
    for scale in [0, -2, 2.0, True]:
        with pytest.raises(ValueError, match=r"scale"):
            SuperResolution(torch.ones(3, 3), scale)
    with pytest.raises(ValueError, match=r"size"):
        gaussian_kernel(4)
    with pytest.raises(ValueError, match=r"sigma"):
        gaussian_kernel(5, 0.0)


def test_mat_missing_file(tmp_path):
    missing = tmp_path / "nope" / "phi.mat"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        load_mat_array(missing, "phi")
    with pytest.raises(FileNotFoundError, match="nope"):
        BlockCS.from_mat(missing)
    scipy.io.savemat(tmp_path / "phi.mat", {"phi": np.zeros((5, 1089))})
    with pytest.raises(FileNotFoundError, match="qinit_missing.mat"):
        BlockCS.from_mat(tmp_path / "phi.mat", tmp_path / "qinit_missing.mat")


@pytest.mark.parametrize("content", [b"garbage bytes, certainly not MATLAB\n" * 8,
                                     bytes(range(256)) * 2, b""])
def test_mat_corrupt_file(tmp_path, content):
    path = tmp_path / "x.mat"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="x.mat"):
        load_mat_array(path, "phi")
    with pytest.raises(ValueError, match="x.mat"):
        BlockCS.from_mat(path)


def test_mat_missing_key(tmp_path):
    path = tmp_path / "other.mat"
    scipy.io.savemat(path, {"Phi_input": np.zeros((5, 1089)), "extra": np.ones(3)})
    with pytest.raises(KeyError, match=r"no key 'phi'.*\['Phi_input', 'extra'\]"):
        load_mat_array(path, "phi")
    with pytest.raises(KeyError, match=r"Phi_input"):
        BlockCS.from_mat(path)
    with pytest.raises(KeyError, match=r"mask"):
        CASSI.from_mat(path)


def test_mat_non_numeric(tmp_path):
    path = tmp_path / "s.mat"
    scipy.io.savemat(path, {"phi": "not numbers"})
    with pytest.raises(ValueError, match="not numeric"):
        load_mat_array(path, "phi")


def test_mat_roundtrip_is_float64(tmp_path):
    path = tmp_path / "m.mat"
    scipy.io.savemat(path, {"mask": np.arange(12, dtype=np.float32).reshape(3, 4)})
    arr = load_mat_array(path, "mask")
    assert arr.dtype == torch.float64 and arr.shape == (3, 4)
    assert CASSI.from_mat(path, num_bands=2).measurement_width == 6


# ----------------------------------------------------------------------------------------------------------------
# The real shared data
# ----------------------------------------------------------------------------------------------------------------
def _data(sub: str):
    path = data_root() / sub
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set LORUN_DATA to run the data tests)")
    return path


@pytest.mark.data
@pytest.mark.parametrize("ratio, m", [(10, 109), (25, 272), (40, 436)])
def test_real_phi_orthonormal(ratio, m):
    folder = _data("cs_sampling")
    op = BlockCS.from_mat(folder / f"phi_0_{ratio}_1089.mat")
    assert op.phi.shape == (m, N_BLOCK) and op.phi.dtype == torch.float64
    assert (op.phi @ op.phi.T - torch.eye(m, dtype=torch.float64)).abs().max() < TOL["orthonormal_mat"]
    assert op.default_step() == 1.0
    qinit = folder / f"Initialization_Matrix_{ratio}.mat"
    if qinit.exists():
        op = BlockCS.from_mat(folder / f"phi_0_{ratio}_1089.mat", qinit)
        assert op.qinit.shape == (N_BLOCK, m)


@pytest.mark.data
def test_real_cassi_mask():
    path = _data("cassi") / "mask.mat"
    if not path.exists():
        pytest.skip(f"{path} not found")
    op = CASSI.from_mat(path)
    assert op.mask.shape == (256, 256)
    assert op.measurement_width == 310
    y = op.A(torch.rand(1, 28, 256, 256, generator=_gen(60), dtype=torch.float64))
    assert y.shape == (1, 256, 310)
