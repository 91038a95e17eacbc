"""Fused gradient-descent steps (lorun_fast.kernels.gd_step_cs / _cassi / _sr / _bicubic) and the fast operators
(lorun_fast.operators) against the reference operators' ``gd_step`` in float64, forward and autograd (x, y, ρ).

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. The interpreter costs ~0.1 ms per tile
operation, so the CPU cases are few and small (this file takes about a minute on two busy cores); the realistic
shapes (256×256 CASSI with 28 bands, 256×256 CS at batch 4, SR on 256²), TF32 and autotuning are GPU-only tests.
"""
import os

import torch

# Triton decides between compiling and interpreting when a kernel is *decorated*, i.e. when
# the lorun_fast.kernels.gd_step_* modules are first imported, so the variable must be set before that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from lorun_fast import operators as fops  # noqa: E402
from lorun_fast.io import data_root  # noqa: E402
from lorun_fast.kernels import gd_step as gs  # noqa: E402
from lorun_fast.kernels import gd_step_common, gd_step_cs as gs_cs  # noqa: E402
from lorun_fast.kernels.gd_step_bicubic import gd_step_bicubic  # noqa: E402
from lorun_fast.kernels.gd_step_cassi import gd_step_cassi  # noqa: E402
from lorun_fast.kernels.gd_step_cs import gd_step_cs  # noqa: E402
from lorun_fast.kernels.gd_step_sr import gd_step_sr  # noqa: E402
from lorun_fast.reference.bicubic import BicubicSR  # noqa: E402
from lorun_fast.testing import assert_close_to_reference  # noqa: E402
from lorun_fast.reference.operators import (  # noqa: E402
    CASSI, BlockCS, SuperResolution, gaussian_kernel, load_mat_array)

INTERPRET = gd_step_common._INTERPRET
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"

pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                       reason="lorun_fast.kernels.gd_step_* were imported before TRITON_INTERPRET=1 was set and "
                              "there is no CUDA device (tests/conftest.py should set TRITON_INTERPRET=1 without CUDA)"),
    pytest.mark.usefixtures("single_thread"),
]
gpu_only = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA device and compiled (not interpreted) "
                                                                "Triton kernels")

# Tolerances: lorun_fast.testing. The scale of z, dx and dy is max|ref|; that of dρ is Σ|G·Aᵀ(Ax − y)| (a sum of
# many signed terms: its rounding error grows with the terms, not with the possibly cancelled total).


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element the kernels skip shows up as NaN."""
    monkeypatch.setattr(gd_step_common, "POISON_OUTPUTS", True)
    assert gd_step_common._empty((2,), torch.empty(0)).isnan().all(), "poisoning is not active"


# --------------------------------------------------------------------------------------------------------------------
# shared test code
# --------------------------------------------------------------------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale


@functools.lru_cache(maxsize=None)
def _gaussian_cs(ratio, seed):
    return BlockCS.gaussian(ratio, seed=seed)  # the QR of a 1089 × m matrix is the slow part: once per (ratio, seed)


def _random_phi(m, seed):
    """A Φ that is not orthonormal (so ΦᵀΦ is not a projection): Gaussian / √n."""
    return rnd(m, 1089, seed=seed, scale=1089 ** -0.5)


def _shared(sub):
    path = data_root() / sub
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set LORUN_DATA to run the data tests)")
    return path


def make_case(op, x_shape, seed):
    """float64 x, y (a measurement of another image plus noise, so the residual is O(1)), upstream gradient G."""
    x = rnd(*x_shape, seed=seed)
    y = op.A(rnd(*x_shape, seed=seed + 1)) + 0.1 * rnd(*op.A(x).shape, seed=seed + 2)
    return {"x": x, "y": y, "g": rnd(*x_shape, seed=seed + 3), "rho": 0.7}


def run(step_fn, case, dtype, rho_grad=True, device=DEVICE):
    """z and the gradients (x, y, ρ) of ⟨z, G⟩ through ``step_fn(x, y, rho)``, all returned in float64 on the CPU."""
    x = case["x"].to(device, dtype).requires_grad_()
    y = case["y"].to(device, dtype).requires_grad_()
    rho = torch.tensor(case["rho"], dtype=dtype, device=device).requires_grad_(rho_grad)
    z = step_fn(x, y, rho)
    leaves = [x, y, rho] if rho_grad else [x, y]
    grads = torch.autograd.grad(z, leaves, case["g"].to(device, dtype))
    out = {"z": z.detach(), "dx": grads[0], "dy": grads[1]}
    if rho_grad:
        out["drho"] = grads[2]
    return {k: v.double().cpu() for k, v in out.items()}


def scales(op, case, ref):
    """The scale each quantity is judged against (see the note on tolerances above)."""
    adj = op.A_adjoint(op.A(case["x"]) - case["y"], tuple(case["x"].shape[-2:]))
    s = {k: v.abs().max().item() for k, v in ref.items()}
    s["drho"] = (case["g"].abs() * adj.abs()).sum().item()
    return s


def assert_fp32(name, got, want, scale, mode="ieee"):
    assert_close_to_reference(name, got, want, mode, scale=scale)


def check_against_reference(op, step_fn, case, mode="ieee"):
    got = run(step_fn, case, torch.float32)
    ref = run(op.gd_step, case, torch.float64, device="cpu")
    sc = scales(op, case, ref)
    for name in ref:
        assert_fp32(name, got[name], ref[name], sc[name], mode)


def check_half(op, step_fn, case, dtype):
    got = run(step_fn, case, dtype)
    torch_same = run(op.gd_step, case, dtype, device="cpu")
    ref = run(op.gd_step, case, torch.float64, device="cpu")
    sc = scales(op, case, ref)
    for name in ref:
        assert_close_to_reference(name, got[name], ref[name], dtype, scale=sc[name], torch_same=torch_same[name])


def cs_fn(op, algorithm="auto", mode="ieee"):
    return lambda x, y, rho: gd_step_cs(x, y, op.phi.to(x.device), rho, algorithm=algorithm, input_precision=mode,
                                        block_size=op.block_size)


def cassi_fn(op):
    return lambda x, y, rho: gd_step_cassi(x, y, op.mask.to(x.device), rho, step=op.step, num_bands=op.num_bands)


def sr_fn(op):
    return lambda x, y, rho: gd_step_sr(x, y, op.kernel.to(x.device), rho, scale=op.scale)


def bicubic_fn(op):
    return lambda x, y, rho: gd_step_bicubic(x, y, rho, scale=op.scale)


# --------------------------------------------------------------------------------------------------------------------
# block CS
# --------------------------------------------------------------------------------------------------------------------

#        image      N  C  Φ                    algorithm
CS_CASES = [
    ((70, 101), 3, 1, ("gaussian", 0.25), "two_gemm"),   # 36 blocks: two block tiles; m = 272 = 256 + 16
    ((70, 101), 1, 2, ("random", 300), "one_gemm"),      # non-orthonormal Φ, two channels
    ((66, 66), 2, 1, ("random", 300), "two_gemm"),       # m = 300 = 256 + 64: the two-tile residual
    ((66, 66), 1, 1, ("gaussian", 0.10), "one_gemm"),    # m = 109
    ((20, 13), 2, 1, ("block8", 0.25), "two_gemm"),      # 8×8 blocks (n = 64 → 128 padded), m = 16
    ((20, 13), 1, 1, ("block8", 0.5), "one_gemm"),       # m = 32
]


def _cs_op(phi_spec):
    kind, arg = phi_spec
    if kind == "block8":
        return BlockCS.gaussian(arg, seed=4, block_size=8)
    return _gaussian_cs(arg, 3) if kind == "gaussian" else BlockCS(_random_phi(arg, 5))


@pytest.mark.parametrize("size,n,c,phi_spec,algorithm", CS_CASES)
def test_cs_matches_reference_with_gradients(size, n, c, phi_spec, algorithm):
    op = _cs_op(phi_spec)
    case = make_case(op, (n, c, *size), seed=sum(size) + n)
    check_against_reference(op, cs_fn(op, algorithm=algorithm), case)


@pytest.mark.parametrize("ksplit", [1, 3])
def test_cs_two_gemm_split_reduction(monkeypatch, ksplit):
    """The first GEMM's pixel reduction in 1 range (r written directly) and in 3 (partial sums added by the second
    kernel); the shape alone picks 9 for these small test images, which the cases above cover."""
    monkeypatch.setattr(gs_cs, "_cs_ksplit", lambda nblk, m, np_: ksplit)
    op = _gaussian_cs(0.25, 3)
    case = make_case(op, (2, 1, 40, 70), seed=21 + ksplit)
    check_against_reference(op, cs_fn(op, algorithm="two_gemm"), case)


def test_cs_split_depends_on_the_shape_only():
    # 256² at batch 1: 64 blocks, split 9 ways; batch 16: 1024 blocks, no split; 8×8 blocks: one 128-pixel chunk.
    assert gs_cs._cs_ksplit(64, 272, 1152) == 9
    assert gs_cs._cs_ksplit(256, 272, 1152) == 3
    assert gs_cs._cs_ksplit(1024, 272, 1152) == 1
    assert gs_cs._cs_ksplit(4, 16, 128) == 1


@pytest.mark.data
@pytest.mark.parametrize("ratio", [10, 25, 40])
def test_cs_shared_sampling_matrices(ratio):
    path = _shared("cs_sampling") / f"phi_0_{ratio}_1089.mat"
    op = BlockCS(load_mat_array(path, "phi"))
    case = make_case(op, (1, 1, 66, 70), seed=ratio)
    x, y = case["x"].float().to(DEVICE), case["y"].float().to(DEVICE)
    ref = op.gd_step(case["x"], case["y"], 0.9)
    scale = ref.abs().max().item()
    # m = 109, 272, 436 < n/2: "auto" is the two-GEMM path; the one-GEMM path is checked on one ratio (time).
    algorithms = ("auto", "one_gemm") if ratio == 25 else ("auto",)
    for algorithm in algorithms:
        z = gd_step_cs(x, y, op.phi.to(DEVICE), 0.9, algorithm=algorithm, input_precision="ieee")
        assert_fp32(f"z[{algorithm}]", z.double().cpu(), ref, scale)


@pytest.mark.parametrize("side", [256, 512])
def test_cs_standard_sizes_forward(side):
    """The standard test image sizes (256: 8×8 blocks, 512: 16×16 blocks, both padded) with the default
    algorithm."""
    op = _gaussian_cs(0.25, 3)
    case = make_case(op, (1, 1, side, side), seed=side)
    z = gd_step_cs(case["x"].float().to(DEVICE), case["y"].float().to(DEVICE), op.phi.to(DEVICE), 0.7,
                   input_precision="ieee")
    ref = op.gd_step(case["x"], case["y"], 0.7)
    assert_fp32("z", z.double().cpu(), ref, ref.abs().max().item())


def test_cs_strided_input_and_shape1_rho():
    """x as a non-contiguous view, y transposed in memory, ρ of shape (1,)."""
    op = _gaussian_cs(0.25, 3)
    case = make_case(op, (2, 1, 40, 35), seed=11)
    wide = torch.zeros(2, 1, 40, 70, dtype=torch.float32, device=DEVICE)
    wide[..., ::2] = case["x"].float().to(DEVICE)
    x = wide[..., ::2]
    assert not x.is_contiguous()
    y = case["y"].float().to(DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
    rho = torch.tensor([0.7], device=DEVICE).requires_grad_()
    z = gd_step_cs(x, y, op.phi.to(DEVICE), rho, input_precision="ieee")
    ref = op.gd_step(case["x"], case["y"], 0.7)
    assert z.shape == ref.shape and z.is_contiguous()
    assert_fp32("z", z.detach().double().cpu(), ref, ref.abs().max().item())
    z.sum().backward()
    assert rho.grad.shape == (1,)


def test_cs_prepared_phi_is_cached_per_version():
    phi = _random_phi(40, 9).float()
    a = gs_cs._cs_prepared(phi, torch.float32, 33)
    assert gs_cs._cs_prepared(phi, torch.float32, 33) is a
    assert gs_cs._cs_prepared(phi, torch.bfloat16, 33) is not a
    phi.mul_(2.0)  # in place: the version counter moves, the cache must not serve the old Φ
    b = gs_cs._cs_prepared(phi, torch.float32, 33)
    assert b is not a and torch.equal(b.phi_c, phi)
    assert b.mp == 128 and gs_cs._cs_prepared(_random_phi(272, 9).float(), torch.float32, 33).mp == 384
    assert gs_cs.resolve_cs_algorithm("auto", 272, 1089) == "two_gemm"
    assert gs_cs.resolve_cs_algorithm("auto", 545, 1089) == "one_gemm"


def test_gd_step_module_reexports_the_steps_and_forwards_the_poison_switch(monkeypatch):
    """``lorun_fast.kernels.gd_step`` keeps the names it always had; its ``POISON_OUTPUTS`` is the common one."""
    assert (gs.gd_step_cs, gs.gd_step_cassi, gs.gd_step_sr) == (gd_step_cs, gd_step_cassi, gd_step_sr)
    assert set(gs.__all__) <= set(dir(gs))
    assert gs.POISON_OUTPUTS is True  # set by the autouse fixture, on gd_step_common
    monkeypatch.setattr(gs, "POISON_OUTPUTS", False)
    assert gd_step_common.POISON_OUTPUTS is False
    monkeypatch.setattr(gs, "POISON_OUTPUTS", True)
    assert gd_step_common.POISON_OUTPUTS is True


# --------------------------------------------------------------------------------------------------------------------
# block CS with a sampling matrix and a step size per sample
# --------------------------------------------------------------------------------------------------------------------

def _indexed_phis():
    """Three Φ's of different m (10%, 25%, 40% of 1089): two Gaussian ones with orthonormal rows and a random one."""
    return [_gaussian_cs(0.10, 3).phi, _gaussian_cs(0.25, 3).phi, _random_phi(436, 6)]


def make_indexed_case(phis, index, shape, seed, garbage=(float("nan"), 1e6)):
    """float64 x, y (N, C, Hb, Wb, m_max), per-sample ρ and upstream gradient G. Sample n's y is a measurement of
    another image by Φ_{index[n]} plus noise in its first m_g entries and ``garbage`` (in turn) past them."""
    nb, c, h, w = shape
    hb, wb = -(-h // 33), -(-w // 33)
    m_max = max(p.shape[0] for p in phis)
    y = torch.empty(nb, c, hb, wb, m_max, dtype=torch.float64)
    for n, g in enumerate(index.tolist()):
        m = phis[g].shape[0]
        other = rnd(1, c, h, w, seed=seed + 10 + n)
        y[n, ..., :m] = BlockCS(phis[g]).A(other)[0] + 0.1 * rnd(c, hb, wb, m, seed=seed + 20 + n)
        y[n, ..., m:] = garbage[n % len(garbage)]
    rho = torch.tensor([0.7, 0.45, 1.2, 0.9, 0.3, 1.05][:nb], dtype=torch.float64)
    return {"x": rnd(*shape, seed=seed), "y": y, "g": rnd(*shape, seed=seed + 3), "rho": rho, "phis": phis,
            "index": index}


def indexed_reference(phis, index, x, y, rho):
    """``BlockCS.gd_step`` sample by sample, with its Φ_g, the first m_g entries of its y and its ρ (or the one ρ)."""
    out = []
    for n, g in enumerate(index.tolist()):
        m = phis[g].shape[0]
        out.append(BlockCS(phis[g]).gd_step(x[n:n + 1], y[n:n + 1, ..., :m], rho[n] if rho.dim() else rho))
    return torch.cat(out)


def indexed_fn(case, algorithm="auto", mode="ieee"):
    def step(x, y, rho):
        return gs_cs.gd_step_cs_indexed(x, y, [p.to(x.device) for p in case["phis"]], case["index"].to(x.device),
                                        rho, algorithm=algorithm, input_precision=mode)
    return step


def run_indexed(step_fn, case, dtype, device=DEVICE):
    """z and the gradients (x, y, ρ (N,)) of ⟨z, G⟩, in float64 on the CPU (``run`` with a per-sample ρ)."""
    x = case["x"].to(device, dtype).requires_grad_()
    y = case["y"].to(device, dtype).requires_grad_()
    rho = case["rho"].to(device, dtype).requires_grad_()
    z = step_fn(x, y, rho)
    dx, dy, drho = torch.autograd.grad(z, [x, y, rho], case["g"].to(device, dtype))
    return {k: v.detach().double().cpu() for k, v in (("z", z), ("dx", dx), ("dy", dy), ("drho", drho))}


def reference_indexed_fn(case):
    return lambda x, y, rho: indexed_reference(case["phis"], case["index"], x, y, rho)


def indexed_scales(case, ref):
    """As ``scales``, with dρ_n judged per sample against Σ|G_n·A_gᵀ(A_g x_n − y_n)|."""
    s = {k: v.abs().max().item() for k, v in ref.items() if k != "drho"}
    s["drho"] = []
    for n, g in enumerate(case["index"].tolist()):
        op, m = BlockCS(case["phis"][g]), case["phis"][g].shape[0]
        x = case["x"][n:n + 1]
        adj = op.A_adjoint(op.A(x) - case["y"][n:n + 1, ..., :m], tuple(x.shape[-2:]))
        s["drho"].append((case["g"][n:n + 1].abs() * adj.abs()).sum().item())
    return s


def check_indexed(case, got, ref, mode, torch_same=None):
    sc = indexed_scales(case, ref)
    for name in ("z", "dx", "dy"):
        assert_close_to_reference(name, got[name], ref[name], mode, scale=sc[name],
                                  torch_same=None if torch_same is None else torch_same[name])
    for n, scale in enumerate(sc["drho"]):
        assert_close_to_reference(f"drho[{n}]", got["drho"][n], ref["drho"][n], mode, scale=scale,
                                  torch_same=None if torch_same is None else torch_same["drho"][n])
    # Past each sample's m_g, y is not read: its gradient is exactly zero (not merely small, nor NaN).
    for n, g in enumerate(case["index"].tolist()):
        tail = got["dy"][n, ..., case["phis"][g].shape[0]:]
        assert torch.equal(tail, torch.zeros_like(tail)), f"dy[{n}] past m_g"


#        N  C  image      index         algorithm      Φ_1 (m = 272) unused, Φ_0 and Φ_2 twice / Φ_2 (m_max) unused
@pytest.mark.parametrize("shape,index,algorithm", [
    ((4, 1, 40, 70), (0, 2, 0, 2), "two_gemm"),
    ((3, 2, 40, 70), (1, 0, 1), "one_gemm"),
])
def test_cs_indexed_matches_reference_with_gradients(shape, index, algorithm):
    """Partial blocks, y past each m_g full of NaN / 1e6, per-sample ρ: z and the gradients of x, y and ρ against
    float64 autograd through ``BlockCS`` sample by sample."""
    case = make_indexed_case(_indexed_phis(), torch.tensor(index), shape, seed=sum(shape) + len(algorithm))
    got = run_indexed(indexed_fn(case, algorithm), case, torch.float32)
    ref = run_indexed(reference_indexed_fn(case), case, torch.float64, device="cpu")
    check_indexed(case, got, ref, "ieee")


def test_cs_indexed_bfloat16_against_torch_error():
    case = make_indexed_case(_indexed_phis(), torch.tensor([2, 0, 2]), (3, 1, 33, 40), seed=45)
    got = run_indexed(indexed_fn(case, "two_gemm"), case, torch.bfloat16)
    torch_same = run_indexed(reference_indexed_fn(case), case, torch.bfloat16, device="cpu")
    ref = run_indexed(reference_indexed_fn(case), case, torch.float64, device="cpu")
    check_indexed(case, got, ref, torch.bfloat16, torch_same)


@pytest.mark.parametrize("algorithm,nb", [("two_gemm", 1), ("two_gemm", 3), ("one_gemm", 1)])
def test_cs_indexed_one_phi_equals_gd_step_cs(algorithm, nb):
    """One Φ for the whole batch and one ρ (a 0-dim tensor with a gradient of that shape, or a Python float): the
    result of ``gd_step_cs``. One image has the same block tiles, so in the interpreter (one tile config) the
    same bits; over several images the tiles differ (a tile per image), so the same values to rounding."""
    op = _gaussian_cs(0.10, 3)
    phi = op.phi.float().to(DEVICE)
    case = make_case(op, (nb, 1, 33, 40), seed=46 + nb)
    index = torch.zeros(nb, dtype=torch.int64, device=DEVICE)
    want = run(cs_fn(op, algorithm), case, torch.float32)
    got = run(lambda x, y, rho: gs_cs.gd_step_cs_indexed(x, y, [phi], index, rho, algorithm=algorithm,
                                                        input_precision="ieee"), case, torch.float32)
    assert got["drho"].shape == ()
    for name in want:
        if nb == 1 and INTERPRET:
            assert torch.equal(got[name], want[name]), name
        assert_fp32(name, got[name], want[name], want[name].abs().max().item())
    x, y = case["x"].float().to(DEVICE), case["y"].float().to(DEVICE)
    z = gs_cs.gd_step_cs_indexed(x, y, (phi,), index, 0.7, algorithm=algorithm, input_precision="ieee")
    assert_fp32("z[rho=0.7]", z.double().cpu(), want["z"], want["z"].abs().max().item())


def test_cs_indexed_empty_batch():
    phis = [_random_phi(20, 1).float().to(DEVICE), _random_phi(30, 2).float().to(DEVICE)]
    x = torch.zeros(0, 1, 40, 40, device=DEVICE).requires_grad_()
    y = torch.zeros(0, 1, 2, 2, 30, device=DEVICE)
    rho = torch.zeros(0, device=DEVICE).requires_grad_()
    z = gs_cs.gd_step_cs_indexed(x, y, phis, torch.zeros(0, dtype=torch.int64, device=DEVICE), rho)
    assert z.shape == x.shape
    z.sum().backward()
    assert rho.grad.shape == (0,) and x.grad.shape == x.shape


def test_cs_indexed_stack_is_cached_per_list_and_version():
    phis = [_random_phi(40, 9).float(), _random_phi(70, 10).float()]
    a = gs_cs._cs_stacked(phis, torch.float32, 33)
    assert gs_cs._cs_stacked(list(phis), torch.float32, 33) is a
    assert gs_cs._cs_stacked(phis[::-1], torch.float32, 33) is not a      # the order is the Φ numbering
    assert gs_cs._cs_stacked(phis, torch.bfloat16, 33) is not a
    assert a.m == 70 and a.mp == 128 and a.phi.shape == (2, 128, 1152) and a.ms.tolist() == [40, 70]
    assert torch.equal(a.phi[0, :40, :1089], phis[0]) and not a.phi[0, 40:].any() and not a.phi[:, :, 1089:].any()
    phis[1].mul_(2.0)  # in place: the version counter moves, the cache must not serve the old stack
    b = gs_cs._cs_stacked(phis, torch.float32, 33)
    assert b is not a and torch.equal(b.phi[1, :70, :1089], phis[1])
    gs_cs.clear_cache()
    assert gs_cs._cs_stacked(phis, torch.float32, 33) is not b


def _cs_indexed_args():
    return dict(x=torch.randn(3, 1, 40, 70), y=torch.randn(3, 1, 2, 3, 30), phis=[torch.randn(10, 1089),
                torch.randn(30, 1089)], index=torch.tensor([0, 1, 1]), rho=torch.rand(3))


@pytest.mark.parametrize("change,exc,match", [
    (dict(phis=torch.randn(2, 10, 1089)), TypeError, "phis: expected a list or tuple of G sampling matrices"),
    (dict(phis=[]), ValueError, "phis: expected at least one sampling matrix, got an empty list"),
    (dict(phis=[torch.randn(10, 1089), torch.randn(30, 1000)]), ValueError,
     r"phis\[1\]: expected a 2-D matrix \(m, 1089\) for 33×33 blocks, got shape \(30, 1000\)"),
    (dict(phis=[torch.randn(10, 1089), torch.randn(1089)]), ValueError, r"phis\[1\]: expected a 2-D matrix"),
    (dict(phis=[torch.randint(0, 2, (10, 1089)), torch.randn(30, 1089)]), TypeError,
     r"phis\[0\]: expected a floating-point tensor"),
    (dict(phis=[torch.randn(10, 1089), "phi"]), TypeError, r"phis\[1\]: expected a torch.Tensor, got str"),
    (dict(phis=[torch.randn(10, 1089), torch.randn(30, 1089, device="meta")]), ValueError,
     r"phis\[1\]: on device meta, but x is on cpu"),
    (dict(phis=[torch.randn(10, 1089, requires_grad=True), torch.randn(30, 1089)]), ValueError,
     r"phis\[0\]: gradients with respect to phis\[0\] are not supported"),
    (dict(index=[0, 1, 1]), TypeError, "index: expected a torch.Tensor"),
    (dict(index=torch.tensor([0, 1, 1], dtype=torch.int32)), TypeError,
     "index: expected dtype torch.int64, got torch.int32"),
    (dict(index=torch.tensor([0, 1])), ValueError, r"index: expected a 1-D tensor of length 3 .* got shape \(2,\)"),
    (dict(index=torch.tensor([[0, 1, 1]])), ValueError, "index: expected a 1-D tensor of length 3"),
    (dict(index=torch.tensor([0, 1, 1], device="meta")), ValueError, "index: on device meta, but x is on cpu"),
    (dict(index=torch.tensor([0, 2, 1])), ValueError,
     r"index: values must lie in \[0, 2\) for 2 sampling matrices in phis, got values from 0 to 2"),
    (dict(index=torch.tensor([0, -1, 1])), ValueError, r"index: values must lie in \[0, 2\).* from -1 to 1"),
    (dict(y=torch.randn(3, 1, 2, 3, 10)), ValueError,
     r"y: expected the last dimension m_max = 30 \(the most rows of any Φ in phis: \[10, 30\]\), got 10"),
    (dict(y=torch.randn(3, 1, 2, 2, 30)), ValueError, "y: expected the measurement shape"),
    (dict(y=torch.randn(3, 1, 2, 3, 30).half()), TypeError, "y: dtype torch.float16 does not match"),
    (dict(y=torch.randn(3, 1, 2, 3, 30, device="meta")), ValueError, "y: on device meta"),
    (dict(rho=torch.rand(2)), ValueError,
     r"rho: expected 3 per-sample step sizes \(shape \(3,\)\) or one shared step .* got shape \(2,\)"),
    (dict(rho=torch.rand(3, 1)), ValueError, r"rho: expected 3 per-sample step sizes"),
    (dict(rho=torch.ones(3, dtype=torch.int64)), TypeError, "rho: expected a floating-point tensor"),
    (dict(rho=torch.rand(3, device="meta")), ValueError, "rho: on device meta"),
    (dict(rho=float("inf")), ValueError, "rho: expected a finite number"),
    (dict(rho="0.5"), TypeError, "rho: expected a Python float"),
    (dict(x=torch.randn(3, 1, 40, 70, dtype=torch.float64)), TypeError, "x: dtype torch.float64 is not supported"),
    (dict(x=torch.randn(3, 1, 20, 70)), ValueError, "x: image 20×70 is smaller than one 33×33 block"),
])
def test_cs_indexed_bad_inputs(change, exc, match):
    args = _cs_indexed_args()
    args.update(change)
    with pytest.raises(exc, match=match):
        gs_cs.gd_step_cs_indexed(args["x"], args["y"], args["phis"], args["index"], args["rho"])


@pytest.mark.parametrize("kw,match", [
    (dict(algorithm="fast"), "algorithm: expected one of"),
    (dict(input_precision="bf16x3"), "input_precision: expected one of"),
    (dict(block_size=0), "block_size: expected an int ≥ 1"),
])
def test_cs_indexed_bad_options(kw, match):
    args = _cs_indexed_args()
    with pytest.raises(ValueError, match=match):
        gs_cs.gd_step_cs_indexed(args["x"], args["y"], args["phis"], args["index"], args["rho"], **kw)


def test_cs_indexed_opcheck(monkeypatch):
    # opcheck runs the ops a dozen times: one pixel range in the two-GEMM path keeps that quick in the interpreter.
    monkeypatch.setattr(gs_cs, "_cs_ksplit", lambda nblk, m, np_: 1)
    phis = [_random_phi(20, 1).float().to(DEVICE), _random_phi(12, 2).float().to(DEVICE)]
    index = torch.tensor([1, 0], device=DEVICE)
    x, y = torch.randn(2, 1, 33, 33, device=DEVICE), torch.randn(2, 1, 1, 1, 20, device=DEVICE)
    y[0, ..., 12:] = float("nan")
    rho = torch.tensor([0.5, 0.8], device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.lorun_fast.gd_step_cs_indexed.default,
                          (x.clone().requires_grad_(), y.clone().requires_grad_(), phis, index, rho, 33, "two_gemm",
                           "ieee", True))
    r = torch.randn(2, 1, 1, 1, 20, device=DEVICE)
    torch.library.opcheck(torch.ops.lorun_fast.gd_step_cs_indexed_backward.default,
                          (x, phis, index, torch.tensor([0.5, 0.8], device=DEVICE), r, 33, "two_gemm", "ieee", True,
                           True, True))


# --------------------------------------------------------------------------------------------------------------------
# CASSI
# --------------------------------------------------------------------------------------------------------------------

def _shared_mask(h, w):
    path = _shared("cassi") / "mask.mat"
    if not path.exists():
        pytest.skip(f"{path} not found")
    # A crop away from the border (the operator needs mask shape == image shape).
    return load_mat_array(path, "mask")[100:100 + h, 60:60 + w].contiguous()


@pytest.mark.parametrize("mask_kind,n,bands,step,h,w", [
    ("shared", 2, 28, 2, 10, 24),   # the standard 28 bands, step 2; 10 rows: a partial row tile
    ("random", 1, 5, 3, 9, 40),     # another band count and dispersion
])
def test_cassi_matches_reference_with_gradients(mask_kind, n, bands, step, h, w):
    if mask_kind == "shared":
        mask = _shared_mask(h, w)
    else:
        mask = (torch.rand(h, w, generator=_gen(7), dtype=torch.float64) > 0.4).double() * 0.9 + 0.05
    op = CASSI(mask, bands, step)
    case = make_case(op, (n, bands, h, w), seed=bands + step)
    check_against_reference(op, cassi_fn(op), case)


def test_cassi_zero_step():
    """step = 0: every band lands on the same pixel (y has the image's width)."""
    op = CASSI(torch.rand(5, 7, generator=_gen(3), dtype=torch.float64), 3, 0)
    case = make_case(op, (1, 3, 5, 7), seed=5)
    check_against_reference(op, cassi_fn(op), case)


# --------------------------------------------------------------------------------------------------------------------
# super-resolution
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale,kh,kw,n,c,hl,wl", [
    (2, 3, 3, 2, 1, 5, 7),
    (3, 5, 5, 1, 2, 3, 4),
    (4, 7, 7, 1, 1, 2, 3),     # 8×12 HR: the 7×7 kernel wraps around the circular boundary
    (2, 7, 3, 1, 1, 4, 9),     # non-square kernel
])
def test_sr_matches_reference_with_gradients(scale, kh, kw, n, c, hl, wl):
    k = gaussian_kernel(max(kh, kw), 1.3)[:kh, :kw] + 0.02 * rnd(kh, kw, seed=kh * 10 + kw)  # not symmetric
    op = SuperResolution(k, scale)
    case = make_case(op, (n, c, hl * scale, wl * scale), seed=scale * 100 + kh)
    check_against_reference(op, sr_fn(op), case)


@pytest.mark.parametrize("scale,n,c,hl,wl", [
    (2, 2, 1, 5, 7),     # 10×14 HR: mirrored taps on every side
    (3, 1, 2, 4, 5),     # ×3: zero weights inside the kernel (k(±1) = 0) shorten the tables
    (4, 1, 1, 4, 6),     # 16×24: the smallest ×4 height, every LR row touches a border
    (4, 1, 1, 9, 4),     # tall and odd: a row tile tail and a width below the kernel's reach of both borders
])
def test_bicubic_matches_reference_with_gradients(scale, n, c, hl, wl):
    op = BicubicSR(scale)
    case = make_case(op, (n, c, hl * scale, wl * scale), seed=scale * 200 + hl)
    check_against_reference(op, bicubic_fn(op), case)


def test_bicubic_strided_input():
    """x as a column slice of a wider tensor (non-contiguous) and y transposed in memory."""
    op = BicubicSR(2)
    case = make_case(op, (2, 3, 12, 10), seed=91)
    want = op.gd_step(case["x"], case["y"], 0.6)
    wide = torch.cat([case["x"], torch.full_like(case["x"], float("nan"))], dim=-1).float().to(DEVICE)
    x = wide[..., :10]
    y = case["y"].float().transpose(-1, -2).contiguous().transpose(-1, -2).to(DEVICE)
    assert not x.is_contiguous() and not y.is_contiguous()
    got = gd_step_bicubic(x, y, 0.6, scale=2)
    assert_fp32("z", got.double().cpu(), want, want.abs().max().item())


# --------------------------------------------------------------------------------------------------------------------
# 16-bit inputs: judged against PyTorch's own error at the same precision
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["cs_two_gemm", "cs_one_gemm", "cassi", "sr", "bicubic"])
def test_bfloat16_against_torch_error(which):
    if which.startswith("cs"):
        op = _gaussian_cs(0.25, 3)
        case, fn = make_case(op, (1, 1, 40, 66), seed=41), cs_fn(op, algorithm=which[3:])
    elif which == "cassi":
        op = CASSI(torch.rand(6, 20, generator=_gen(8), dtype=torch.float64), 28, 2)
        case, fn = make_case(op, (1, 28, 6, 20), seed=42), cassi_fn(op)
    elif which == "sr":
        op = SuperResolution(gaussian_kernel(5, 1.1), 2)
        case, fn = make_case(op, (1, 2, 10, 12), seed=43), sr_fn(op)
    else:
        op = BicubicSR(2)
        case, fn = make_case(op, (1, 2, 10, 12), seed=44), bicubic_fn(op)
    check_half(op, fn, case, torch.bfloat16)


def test_float16_cs():
    op = _gaussian_cs(0.25, 3)
    check_half(op, cs_fn(op, algorithm="two_gemm"), make_case(op, (1, 1, 33, 40), seed=44), torch.float16)


# --------------------------------------------------------------------------------------------------------------------
# determinism, partial gradients, empty batches, custom ops, torch.compile
# --------------------------------------------------------------------------------------------------------------------

def test_rho_gradient_is_deterministic_and_partial_grads():
    op = SuperResolution(gaussian_kernel(3, 1.0), 2)
    case = make_case(op, (2, 1, 8, 10), seed=51)
    a = run(sr_fn(op), case, torch.float32)
    b = run(sr_fn(op), case, torch.float32)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between two identical runs"
    # Only some inputs need a gradient: the backward skips the rest, and what it computes is unchanged.
    x = case["x"].float().to(DEVICE).requires_grad_()
    y = case["y"].float().to(DEVICE)
    z = gd_step_sr(x, y, op.kernel.to(DEVICE), 0.7, scale=2)  # Python-float ρ: no residual saved, no dρ
    (dx,) = torch.autograd.grad(z, [x], case["g"].float().to(DEVICE))
    assert torch.equal(dx.double().cpu(), a["dx"])
    rho = torch.tensor(0.7, device=DEVICE, requires_grad=True)
    z = gd_step_sr(x.detach(), y, op.kernel.to(DEVICE), rho, scale=2)
    (drho,) = torch.autograd.grad(z, [rho], case["g"].float().to(DEVICE))
    assert torch.equal(drho.double().cpu(), a["drho"])


def test_empty_batch():
    cs = _gaussian_cs(0.25, 3)
    for op, fn, shape in ((cs, cs_fn(cs), (0, 1, 40, 40)),
                          (CASSI(torch.rand(4, 6, dtype=torch.float64), 3, 2), None, (0, 3, 4, 6)),
                          (SuperResolution(gaussian_kernel(3, 1.0), 2), None, (0, 2, 4, 6)),
                          (BicubicSR(2), bicubic_fn(BicubicSR(2)), (0, 1, 8, 10))):
        fn = fn or (cassi_fn(op) if isinstance(op, CASSI) else sr_fn(op))
        x = torch.zeros(shape, device=DEVICE).requires_grad_()
        y = op.A(torch.zeros(shape, dtype=torch.float64)).float().to(DEVICE)
        rho = torch.tensor(0.5, device=DEVICE, requires_grad=True)
        z = fn(x, y, rho)
        assert z.shape == x.shape
        z.sum().backward()
        assert rho.grad.item() == 0.0 and x.grad.shape == x.shape


def test_opcheck_custom_ops():
    op = SuperResolution(gaussian_kernel(3, 1.0), 2)
    x, y = torch.randn(1, 1, 4, 6, device=DEVICE), torch.randn(1, 1, 2, 3, device=DEVICE)
    k = op.kernel.float().to(DEVICE)
    for requires_grad in (False, True):
        args = (x.clone().requires_grad_(requires_grad), y.clone().requires_grad_(requires_grad), k,
                torch.tensor(0.5, device=DEVICE, requires_grad=requires_grad), 2)
        torch.library.opcheck(torch.ops.lorun_fast.gd_step_sr.default, args)
    rho = torch.tensor(0.5, device=DEVICE)
    r = torch.randn(1, 1, 2, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.lorun_fast.gd_step_sr_backward.default, (x, k, rho, r, 2, True, True, True))
    xb, yb = torch.randn(1, 1, 8, 10, device=DEVICE), torch.randn(1, 1, 4, 5, device=DEVICE)
    for requires_grad in (False, True):
        args = (xb.clone().requires_grad_(requires_grad), yb.clone().requires_grad_(requires_grad),
                torch.tensor(0.5, device=DEVICE, requires_grad=requires_grad), 2)
        torch.library.opcheck(torch.ops.lorun_fast.gd_step_bicubic.default, args)
    torch.library.opcheck(torch.ops.lorun_fast.gd_step_bicubic_backward.default,
                          (xb, rho, torch.randn(1, 1, 4, 5, device=DEVICE), 2, True, True, True))
    cassi_mask = torch.rand(3, 4, device=DEVICE)
    torch.library.opcheck(torch.ops.lorun_fast.gd_step_cassi.default,
                          (torch.randn(1, 2, 3, 4, device=DEVICE), torch.randn(1, 3, 5, device=DEVICE), cassi_mask,
                           rho, 1))
    phi = _random_phi(20, 1).float().to(DEVICE)
    torch.library.opcheck(torch.ops.lorun_fast.gd_step_cs.default,
                          (torch.randn(1, 1, 33, 33, device=DEVICE), torch.randn(1, 1, 1, 1, 20, device=DEVICE), phi,
                           rho, 33, "two_gemm", "ieee", True))


def _compile_check(backend):
    op = CASSI(torch.rand(4, 10, generator=_gen(9), dtype=torch.float64), 4, 2)
    case = make_case(op, (1, 4, 4, 10), seed=61)
    mask = op.mask.float().to(DEVICE)

    def loss_fn(x, y, rho):
        z = gd_step_cassi(x, y, mask, rho, step=2)
        return (z * z).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    leaves = [case["x"].float().to(DEVICE), case["y"].float().to(DEVICE), torch.tensor(0.7, device=DEVICE)]
    eager = [t.clone().requires_grad_() for t in leaves]
    comp = [t.clone().requires_grad_() for t in leaves]
    loss_e, loss_c = loss_fn(*eager), compiled(*comp)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    for name, ge, gc in zip(("x", "y", "rho"), eager, comp):
        torch.testing.assert_close(gc.grad, ge.grad, rtol=1e-6, atol=1e-7, msg=f"d{name}")


def test_torch_compile_fullgraph_aot_eager():
    # The custom ops are opaque to the compiler: Dynamo/AOTAutograd trace them through register_fake and
    # register_autograd; their bodies (the Triton launches, interpreted on CPU) run eagerly.
    torch._dynamo.reset()
    _compile_check("aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="Inductor on CPU needs a C++ compiler")
def test_torch_compile_fullgraph_inductor():
    torch._dynamo.reset()
    _compile_check("inductor")


# --------------------------------------------------------------------------------------------------------------------
# the fast operators
# --------------------------------------------------------------------------------------------------------------------

def test_fast_operators_match_reference_gd_step():
    cs = _gaussian_cs(0.25, 3)
    cassi = CASSI(torch.rand(5, 9, generator=_gen(12), dtype=torch.float64), 3, 2)
    sr = SuperResolution(gaussian_kernel(3, 0.9), 2)
    for ref_op, shape in ((cs, (1, 1, 34, 40)), (cassi, (1, 3, 5, 9)), (sr, (1, 2, 6, 8)),
                          (BicubicSR(3), (1, 2, 12, 15))):
        fast = fops.fast_operator(ref_op, backend="triton", input_precision="ieee").to(DEVICE)
        assert type(fast).__name__ == "Fast" + type(ref_op).__name__ and isinstance(fast, type(ref_op))
        case = make_case(ref_op, shape, seed=sum(shape))
        want = ref_op.gd_step(case["x"], case["y"], 0.7)
        got = fast.gd_step(case["x"].float().to(DEVICE), case["y"].float().to(DEVICE), 0.7)
        assert_fp32(type(fast).__name__, got.double().cpu(), want, want.abs().max().item())
        back = fops.reference_operator(fast)
        assert type(back) is type(ref_op) and not hasattr(back, "backend")


def test_fast_operator_backend_choice(monkeypatch):
    calls = []
    original = gs_cs.gd_step_cs

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gs_cs, "gd_step_cs", counting)
    ref_op = _gaussian_cs(0.25, 3)
    fast = fops.fast_operator(ref_op)
    # The same buffer tensors, not copies; the module containers are separate.
    assert fast.phi is ref_op.phi and fast._buffers is not ref_op._buffers
    x = torch.randn(1, 1, 33, 33)
    y = ref_op.A(x)
    # "auto" on CPU tensors: the reference, bit for bit.
    assert torch.equal(fast.gd_step(x, y, 0.5), ref_op.gd_step(x, y, 0.5)) and not calls
    assert torch.equal(fops.fast_operator(ref_op, backend="reference").gd_step(x, y, 0.5), ref_op.gd_step(x, y, 0.5))
    assert not calls
    if INTERPRET:
        monkeypatch.setattr(fops, "BACKEND", "triton")  # the module-level switch forces the kernels
        fast.gd_step(x, y, 0.5)
        assert calls
    with pytest.raises(ValueError, match="backend: expected one of"):
        fops.FastCASSI(torch.rand(3, 3), 2, 1, backend="cuda")
    with pytest.raises(TypeError, match="op: expected a BlockCS"):
        fops.fast_operator(torch.nn.Identity())
    same = fops.fast_operator(fast)
    assert same is fast
    built = fops.FastSuperResolution(gaussian_kernel(3, 1.0), 2, backend="reference")
    assert "backend='reference'" in repr(built)


# --------------------------------------------------------------------------------------------------------------------
# input validation (no kernel launches)
# --------------------------------------------------------------------------------------------------------------------

def _cs_args():
    return dict(x=torch.randn(2, 1, 40, 70), y=torch.randn(2, 1, 2, 3, 10), phi=torch.randn(10, 1089), rho=0.5)


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=torch.randn(1, 40, 70)), ValueError, "x: expected a 4-D"),
    (dict(x=torch.randint(0, 3, (2, 1, 40, 70))), TypeError, "x: expected a floating-point"),
    (dict(x=torch.randn(2, 1, 40, 70, dtype=torch.float64)), TypeError, "x: dtype torch.float64 is not supported"),
    (dict(x=torch.randn(2, 1, 20, 70)), ValueError, "x: image 20×70 is smaller than one 33×33 block"),
    (dict(phi=torch.randn(10, 1000)), ValueError, r"phi: expected a 2-D matrix \(m, 1089\)"),
    (dict(phi=torch.randn(1089)), ValueError, "phi: expected a 2-D matrix"),
    (dict(phi=torch.randint(0, 2, (10, 1089))), TypeError, "phi: expected a floating-point"),
    (dict(y=torch.randn(2, 1, 2, 2, 10)), ValueError, "y: expected the measurement shape"),
    (dict(y=torch.randn(2, 1, 2, 3, 11)), ValueError, "y: expected the measurement shape"),
    (dict(y=torch.randn(2, 1, 2, 3, 10).bfloat16()), TypeError, "y: dtype torch.bfloat16 does not match"),
    (dict(phi=torch.randn(10, 1089, device="meta")), ValueError, "phi: on device meta"),
    (dict(rho=torch.tensor(1)), TypeError, "rho: expected a floating-point"),
    (dict(rho=torch.ones(2)), ValueError, "rho: expected a scalar"),
    (dict(rho=torch.tensor(0.5, device="meta")), ValueError, "rho: on device meta"),
    (dict(rho=True), TypeError, "rho: expected a Python float"),
    (dict(rho=float("nan")), ValueError, "rho: expected a finite number"),
    (dict(phi=torch.randn(10, 1089, requires_grad=True)), ValueError, "phi: gradients with respect to phi"),
])
def test_cs_bad_inputs(change, exc, match):
    args = _cs_args()
    args.update(change)
    with pytest.raises(exc, match=match):
        gd_step_cs(args["x"], args["y"], args["phi"], args["rho"])


@pytest.mark.parametrize("kw,match", [
    (dict(algorithm="fast"), "algorithm: expected one of"),
    (dict(input_precision="bf16x3"), "input_precision: expected one of"),
])
def test_cs_bad_options(kw, match):
    args = _cs_args()
    with pytest.raises(ValueError, match=match):
        gd_step_cs(args["x"], args["y"], args["phi"], 0.5, **kw)


def _cassi_args():
    return dict(x=torch.randn(1, 28, 6, 8), y=torch.randn(1, 6, 8 + 54), mask=torch.rand(6, 8), rho=0.5)


@pytest.mark.parametrize("change,kw,exc,match", [
    (dict(x=torch.randn(1, 27, 6, 8)), dict(num_bands=28), ValueError, "x: expected 28 bands, got 27"),
    (dict(x=torch.randn(1, 27, 6, 8)), {}, ValueError, r"y: expected the measurement shape \(1, 6, 60\)"),
    (dict(y=torch.randn(1, 6, 60)), {}, ValueError, "y: expected the measurement shape"),
    (dict(y=torch.randint(0, 2, (1, 6, 62))), {}, TypeError, "y: expected a floating-point"),
    (dict(mask=torch.rand(6, 9)), {}, ValueError, r"mask: expected shape \(6, 8\)"),
    (dict(mask=torch.randint(0, 2, (6, 8))), {}, TypeError, "mask: expected a floating-point or bool"),
    (dict(mask=torch.rand(6, 8, device="meta")), {}, ValueError, "mask: on device meta"),
    ({}, dict(step=-1), ValueError, "step: expected an int"),
    ({}, dict(step=3), ValueError, "y: expected the measurement shape"),
])
def test_cassi_bad_inputs(change, kw, exc, match):
    args = _cassi_args()
    args.update(change)
    with pytest.raises(exc, match=match):
        gd_step_cassi(args["x"], args["y"], args["mask"], args["rho"], **kw)


def _sr_args():
    return dict(x=torch.randn(1, 3, 8, 12), y=torch.randn(1, 3, 4, 6), kernel=torch.rand(5, 5), rho=0.5, scale=2)


@pytest.mark.parametrize("change,exc,match", [
    (dict(scale=0), ValueError, "scale: expected an int"),
    (dict(scale=2.0), ValueError, "scale: expected an int"),
    (dict(kernel=torch.rand(4, 5)), ValueError, "kernel: expected a 2-D blur kernel with odd sizes"),
    (dict(kernel=torch.rand(5)), ValueError, "kernel: expected a 2-D blur kernel"),
    (dict(x=torch.randn(1, 3, 9, 12)), ValueError, "x: image 9×12 is not a multiple of the scale 2"),
    (dict(x=torch.randn(1, 3, 2, 12), y=torch.randn(1, 3, 1, 6)), ValueError, "x: image 2×12 is too small"),
    (dict(y=torch.randn(1, 3, 4, 5)), ValueError, "y: expected the measurement shape"),
    (dict(y=torch.randn(1, 2, 4, 6)), ValueError, "y: expected the measurement shape"),
    (dict(kernel=torch.rand(5, 5, device="meta")), ValueError, "kernel: on device meta"),
    (dict(x=torch.randn(1, 3, 8, 12).half()), TypeError, "y: dtype torch.float32 does not match"),
])
def test_sr_bad_inputs(change, exc, match):
    args = _sr_args()
    args.update(change)
    with pytest.raises(exc, match=match):
        gd_step_sr(args["x"], args["y"], args["kernel"], args["rho"], scale=args["scale"])


def _bicubic_args():
    return dict(x=torch.randn(1, 3, 8, 12), y=torch.randn(1, 3, 4, 6), rho=0.5, scale=2)


@pytest.mark.parametrize("change,exc,match", [
    (dict(scale=5), ValueError, r"scale: bicubic SR supports the integer scales \(2, 3, 4\), got 5"),
    (dict(scale=2.0), ValueError, "scale: bicubic SR supports"),
    (dict(x=torch.randn(1, 3, 9, 12)), ValueError, "x: image 9×12 is not a multiple of the scale 2"),
    (dict(x=torch.randn(1, 3, 6, 12), y=torch.randn(1, 3, 3, 6)), ValueError,
     r"x: image 6×12 is smaller than the ×1/2 bicubic kernel's support \(8×8\)"),
    (dict(y=torch.randn(1, 3, 4, 5)), ValueError, "y: expected the measurement shape"),
    (dict(y=torch.randn(1, 3, 4, 6, device="meta")), ValueError, "y: on device meta"),
    (dict(x=torch.randn(1, 3, 8, 12).half()), TypeError, "y: dtype torch.float32 does not match"),
    (dict(x=torch.randn(1, 3, 8, 12, dtype=torch.float64)), TypeError, "x: dtype torch.float64 is not supported"),
    (dict(rho=torch.ones(2)), ValueError, "rho: expected a scalar"),
])
def test_bicubic_bad_inputs(change, exc, match):
    args = _bicubic_args()
    args.update(change)
    with pytest.raises(exc, match=match):
        gd_step_bicubic(args["x"], args["y"], args["rho"], scale=args["scale"])


def test_backward_without_saved_residual_is_refused():
    """Calling the op directly with save_residual=False cannot give dρ; the error says so (gd_step_cs sets it)."""
    x = torch.randn(1, 1, 33, 33, device=DEVICE)
    y = torch.randn(1, 1, 1, 1, 20, device=DEVICE)
    rho = torch.tensor(0.5, device=DEVICE, requires_grad=True)
    z, _ = torch.ops.lorun_fast.gd_step_cs(x, y, _random_phi(20, 2).float().to(DEVICE), rho, 33, "two_gemm",
                                           "ieee", False)
    with pytest.raises(RuntimeError, match="save_residual=False"):
        z.sum().backward()


# --------------------------------------------------------------------------------------------------------------------
# GPU only: realistic shapes, tuned configs, TF32 and bf16 (too slow for the interpreter)
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("algorithm", ["two_gemm", "one_gemm"])
def test_gpu_cs_realistic(algorithm):
    op = _gaussian_cs(0.25, 3)
    case = make_case(op, (4, 1, 256, 256), seed=71)
    for mode in ("ieee", "tf32x3", "tf32"):
        check_against_reference(op, cs_fn(op, algorithm=algorithm, mode=mode), case, mode)
    check_half(op, cs_fn(op, algorithm=algorithm), case, torch.bfloat16)
    # Odd sizes and a channel axis on the compiled kernels too.
    check_against_reference(op, cs_fn(op, algorithm=algorithm), make_case(op, (3, 2, 70, 101), seed=72))


@pytest.mark.gpu
@gpu_only
def test_gpu_cs_large_m_two_gemm_override():
    op = BlockCS(_random_phi(1000, 8))  # m close to n: r does not fit the usual tiles; the pruner's fallback
    check_against_reference(op, cs_fn(op, algorithm="two_gemm"), make_case(op, (2, 1, 99, 70), seed=73))


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("algorithm", ["two_gemm", "one_gemm"])
def test_gpu_cs_indexed_realistic(algorithm):
    """A 256² batch mixing 10%, 25% and 40% sampling, compiled kernels, every dot precision and bf16."""
    case = make_indexed_case(_indexed_phis(), torch.tensor([0, 1, 2, 2, 0, 1]), (6, 1, 256, 256), seed=77)
    ref = run_indexed(reference_indexed_fn(case), case, torch.float64, device="cpu")
    for mode in ("ieee", "tf32x3", "tf32"):
        check_indexed(case, run_indexed(indexed_fn(case, algorithm, mode), case, torch.float32), ref, mode)
    torch_same = run_indexed(reference_indexed_fn(case), case, torch.bfloat16, device="cpu")
    check_indexed(case, run_indexed(indexed_fn(case, algorithm), case, torch.bfloat16), ref, torch.bfloat16,
                  torch_same)


@pytest.mark.gpu
@gpu_only
def test_gpu_cassi_realistic():
    path = data_root() / "cassi" / "mask.mat"
    mask = (load_mat_array(path, "mask") if path.exists()
            else torch.rand(256, 256, generator=_gen(74), dtype=torch.float64))
    op = CASSI(mask, 28, 2)
    case = make_case(op, (2, 28, 256, 256), seed=74)
    check_against_reference(op, cassi_fn(op), case)
    check_half(op, cassi_fn(op), case, torch.bfloat16)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("scale,k", [(2, 3), (3, 5), (4, 7)])
def test_gpu_sr_realistic(scale, k):
    op = SuperResolution(gaussian_kernel(k, 1.6), scale)
    size = 256 - 256 % scale
    case = make_case(op, (2, 3, size, size), seed=75 + k)
    check_against_reference(op, sr_fn(op), case)
    check_half(op, sr_fn(op), case, torch.bfloat16)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_gpu_bicubic_realistic(scale):
    op = BicubicSR(scale)
    size = 256 - 256 % scale
    case = make_case(op, (2, 3, size, size), seed=80 + scale)
    check_against_reference(op, bicubic_fn(op), case)
    check_half(op, bicubic_fn(op), case, torch.bfloat16)
    check_against_reference(op, bicubic_fn(op), make_case(op, (1, 1, 20 * scale, 33 * scale), seed=84 + scale))


@pytest.mark.gpu
@gpu_only
def test_gpu_rho_gradient_deterministic():
    op = CASSI(torch.rand(128, 128, generator=_gen(76), dtype=torch.float64), 28, 2)
    case = make_case(op, (4, 28, 128, 128), seed=76)
    runs = [run(cassi_fn(op), case, torch.float32) for _ in range(3)]
    for other in runs[1:]:
        for name in runs[0]:
            assert torch.equal(runs[0][name], other[name]), name
