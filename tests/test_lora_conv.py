"""Fused LoRA convolution kernel (lorun_fast.kernels.lora_conv) against a float64 PyTorch reference.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors, on small shapes.
"""
import os

import torch

# Triton decides between compiling and interpreting when a kernel is *decorated*, i.e. when
# lorun_fast.kernels.lora_conv is first imported, so the variable must be set before that import (importing triton
# itself earlier is harmless). Without CUDA the interpreter is the only way to run the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lorun_fast.kernels import lora_conv as lc  # noqa: E402
from lorun_fast.kernels.lora_conv import FusedLoRAConv2dFunction, fused_lora_conv2d  # noqa: E402
from lorun_fast.kernels.settings import CONV_KERNELS, use_conv_kernel  # noqa: E402
from lorun_fast.reference.lora_conv import LoRAConv2d  # noqa: E402
from lorun_fast.testing import assert_close_to_reference  # noqa: E402

INTERPRET = lc._INTERPRET
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"

pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET,
    reason="lorun_fast.kernels.lora_conv was imported before TRITON_INTERPRET=1 was set and there is no CUDA device "
           "(tests/conftest.py should set TRITON_INTERPRET=1 when CUDA is unavailable)")
gpu_only = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA device and compiled (not interpreted) "
                                                                "Triton kernels")

# Tolerances: lorun_fast.testing (float32 modes against float64, 16-bit dtypes against PyTorch's own error).

GRAD_NAMES = ("x", "weight", "lora_a", "lora_b", "bias", "residual")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element the kernels skip shows up as NaN."""
    monkeypatch.setattr(lc, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True, params=CONV_KERNELS)
def conv_kernel(request):
    """Every test runs both designs of the kernel: v1 (merge per tile, one tap per dW program, ReLU mask applied
    by torch) and v2 (merge once, all taps per dW program, mask applied inside the kernels)."""
    with use_conv_kernel(request.param):
        yield request.param


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------

def _normal(seed):
    """A draw of seeded float64 normals on DEVICE, scaled: ``rnd(*shape, scale=1.0)``."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)

    return rnd


def make_case(n, ci, co, k, r, h, w, bias=True, residual=False, seed=0):
    """Fresh float64 inputs scaled so that the output and the LoRA term are both O(1)."""
    rnd, fan_in = _normal(seed), ci * k * k
    return {
        "x": rnd(n, ci, h, w),
        "weight": rnd(co, ci, k, k, scale=fan_in ** -0.5),
        "lora_a": rnd(r, ci, k, k, scale=fan_in ** -0.5),
        "lora_b": rnd(co, r, scale=r ** -0.5),
        "bias": rnd(co) if bias else None,
        "residual": rnd(n, co, h, w) if residual else None,
        "grad": rnd(n, co, h, w),
    }


def reference(x, weight, lora_a, lora_b, bias, residual, scaling, relu, out_scale):
    """The documented semantics, in plain PyTorch: out_scale·act(conv(x, W + s·B·A) + bias) + residual."""
    merged = weight + scaling * (lora_b.reshape(lora_b.shape[0], -1) @ lora_a.flatten(1)).view_as(weight)
    y = F.conv2d(x, merged, bias, padding=weight.shape[-1] // 2)
    if relu:
        y = torch.relu(y)
    y = y * out_scale
    if residual is not None:
        y = y + residual
    return y


def to_layout(t, layout):
    if t is None or layout == "nchw":
        return t
    return t.contiguous(memory_format=torch.channels_last)


def run(fn, case, dtype, scaling, relu, out_scale, x_layout="nchw", res_layout=None, **kw):
    """Forward + backward through ``fn``; returns (y, {name: grad}) in float64."""
    leaves = {}
    for name in GRAD_NAMES:
        t = case[name]
        if t is None:
            leaves[name] = None
            continue
        t = t.detach().to(dtype)
        if name == "x":
            t = to_layout(t, x_layout)
        elif name == "residual":
            t = to_layout(t, res_layout or x_layout)
        leaves[name] = t.requires_grad_()
    y = fn(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"], leaves["bias"], leaves["residual"],
           scaling, relu, out_scale, **kw)
    y.backward(case["grad"].to(dtype))
    grads = {k: v.grad.double() for k, v in leaves.items() if v is not None}
    return y.detach().double(), grads


def kernel_fn(x, weight, lora_a, lora_b, bias, residual, scaling, relu, out_scale, input_precision="ieee"):
    return fused_lora_conv2d(x, weight, lora_a, lora_b, scaling, bias, padding=weight.shape[-1] // 2, relu=relu,
                             residual=residual, out_scale=out_scale, input_precision=input_precision)


def assert_close_fp32(name, got, want, mode):
    assert_close_to_reference(name, got, want, mode)


# --------------------------------------------------------------------------------------------------------------------
# float32 against float64
# --------------------------------------------------------------------------------------------------------------------

#      n  ci  co  k   r   h   w  bias  relu   res    x layout  res layout out_scale
CASES = [
    (2, 24, 16, 3, 4, 17, 23, True, True, True, "cl", "cl", 0.5),
    (1, 3, 1, 3, 1, 8, 8, False, False, False, "nchw", None, 1.0),
    (3, 16, 24, 1, 16, 8, 8, True, True, False, "cl", None, 1.0),
    (1, 32, 3, 3, 16, 17, 23, False, False, True, "nchw", "nchw", -0.7),
    (2, 1, 32, 3, 1, 8, 8, True, True, False, "nchw", None, 2.0),
    (1, 24, 32, 1, 4, 17, 23, True, False, True, "cl", "cl", 1.0),
    (2, 16, 16, 3, 4, 8, 8, True, True, True, "cl", "nchw", -1.0),   # relu + residual: the saved-mask path
    (1, 32, 32, 3, 16, 8, 8, False, True, False, "cl", None, -1.5),  # relu, no residual, negative out_scale
    (3, 3, 16, 1, 1, 17, 23, True, False, False, "nchw", None, 1.0),
    (1, 1, 3, 3, 4, 17, 23, True, True, True, "nchw", "cl", 1.0),    # rank > Ci
]


@pytest.mark.parametrize("n,ci,co,k,r,h,w,bias,relu,res,x_layout,res_layout,out_scale", CASES)
def test_float32_matches_float64_reference(n, ci, co, k, r, h, w, bias, relu, res, x_layout, res_layout, out_scale):
    case = make_case(n, ci, co, k, r, h, w, bias=bias, residual=res, seed=n * 1000 + ci * 10 + co)
    scaling = 0.75
    y, grads = run(kernel_fn, case, torch.float32, scaling, relu, out_scale, x_layout, res_layout)
    y_ref, grads_ref = run(reference, case, torch.float64, scaling, relu, out_scale)
    assert_close_fp32("y", y, y_ref, "ieee")
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert_close_fp32(f"d{name}", grads[name], grads_ref[name], "ieee")


def test_output_layout_follows_input():
    case = make_case(2, 16, 24, 3, 4, 8, 8)
    for layout, fmt in (("cl", torch.channels_last), ("nchw", torch.contiguous_format)):
        x = to_layout(case["x"].float(), layout).requires_grad_()
        y = kernel_fn(x, case["weight"].float(), case["lora_a"].float(), case["lora_b"].float(), None, None, 1.0,
                      False, 1.0)
        assert y.is_contiguous(memory_format=fmt)
        y.backward(case["grad"].float())
        assert x.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("mode", ["tf32", "tf32x3"])
def test_float32_input_precisions(mode):
    case = make_case(2, 24, 16, 3, 4, 8, 8, residual=True, seed=7)
    y, grads = run(kernel_fn, case, torch.float32, 0.5, False, 1.0, "cl", input_precision=mode)
    y_ref, grads_ref = run(reference, case, torch.float64, 0.5, False, 1.0)
    assert_close_fp32("y", y, y_ref, mode)
    for name in grads_ref:
        assert_close_fp32(f"d{name}", grads[name], grads_ref[name], mode)


def test_strided_views_and_expanded_gradient():
    """Inputs that are neither NCHW- nor channels_last-contiguous, and a stride-0 grad_y from ``.sum()``."""
    case = make_case(2, 16, 16, 3, 4, 9, 11, residual=True, seed=3)
    wide = torch.zeros(2, 32, 9, 22, device=DEVICE)
    wide[:, ::2, :, ::2] = case["x"].float()
    x = wide[:, ::2, :, ::2].requires_grad_()  # strides (6336, 396, 22, 2)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    res = case["residual"].float().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # column-major
    w, a, b = (case[k].float().requires_grad_() for k in ("weight", "lora_a", "lora_b"))
    y = fused_lora_conv2d(x, w, a, b, 0.5, None, padding=1, residual=res, input_precision="ieee")
    y.sum().backward()
    ref = [case[k].clone().requires_grad_() for k in ("x", "weight", "lora_a", "lora_b", "residual")]
    y_ref = reference(ref[0], ref[1], ref[2], ref[3], None, ref[4], 0.5, False, 1.0)
    y_ref.sum().backward()
    assert_close_fp32("y", y.double(), y_ref.detach(), "ieee")
    for name, got, want in zip(("x", "weight", "lora_a", "lora_b", "residual"), (x, w, a, b, res), ref):
        assert_close_fp32(f"d{name}", got.grad.double(), want.grad, "ieee")


def test_matches_reference_module_with_peft_shapes():
    """Against ``reference.LoRAConv2d`` (peft names; B as a (Co, r, 1, 1) conv weight) in float64."""
    torch.manual_seed(11)
    base = nn.Conv2d(5, 7, 3, padding=1, bias=True, dtype=torch.float64)
    layer = LoRAConv2d(base, num_stages=2, rank=3, alpha=6.0).to(DEVICE)
    with torch.no_grad():
        layer.lora_B["1"].weight.normal_()  # peft initialises B to zero: make the adapter matter
    x64 = torch.randn(2, 5, 9, 13, dtype=torch.float64, device=DEVICE)
    y_ref = layer(x64, stage=1)
    params = [base.weight, layer.lora_A["1"].weight, layer.lora_B["1"].weight, base.bias]
    g = torch.randn_like(y_ref)
    ref_grads = torch.autograd.grad(y_ref, params, g)
    leaves = [p.detach().float().requires_grad_() for p in params]
    y = fused_lora_conv2d(x64.float(), leaves[0], leaves[1], leaves[2], layer.scaling, leaves[3], padding=1,
                          input_precision="ieee")
    y.backward(g.float())
    assert_close_fp32("y", y.double(), y_ref.detach(), "ieee")
    for name, leaf, want in zip(("weight", "lora_a", "lora_b", "bias"), leaves, ref_grads):
        assert leaf.grad.shape == want.shape
        assert_close_fp32(f"d{name}", leaf.grad.double(), want, "ieee")


def test_frozen_base_only_adapters_get_gradients():
    case = make_case(2, 16, 24, 3, 4, 8, 8, seed=5)
    x, w, bias = case["x"].float(), case["weight"].float(), case["bias"].float()
    a, b = case["lora_a"].float().requires_grad_(), case["lora_b"].float().requires_grad_()
    y = fused_lora_conv2d(x, w, a, b, 0.5, bias, padding=1, relu=True, input_precision="ieee")
    y.backward(case["grad"].float())
    ra, rb = case["lora_a"].clone().requires_grad_(), case["lora_b"].clone().requires_grad_()
    reference(case["x"], case["weight"], ra, rb, case["bias"], None, 0.5, True, 1.0).backward(case["grad"])
    assert x.grad is None and w.grad is None and bias.grad is None
    assert_close_fp32("dlora_a", a.grad.double(), ra.grad, "ieee")
    assert_close_fp32("dlora_b", b.grad.double(), rb.grad, "ieee")


def test_relu_with_zero_out_scale_gives_zero_gradients():
    case = make_case(1, 16, 16, 3, 4, 8, 8, residual=True, seed=9)
    for res in (None, case["residual"].float().requires_grad_()):
        x = case["x"].float().requires_grad_()
        a = case["lora_a"].float().requires_grad_()
        y = fused_lora_conv2d(x, case["weight"].float(), a, case["lora_b"].float(), 1.0, padding=1, relu=True,
                              residual=res, out_scale=0.0, input_precision="ieee")
        y.backward(case["grad"].float())
        assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(a.grad, torch.zeros_like(a))
        if res is not None:
            assert torch.equal(res.grad, case["grad"].float())


def test_empty_batch():
    case = make_case(1, 16, 8, 3, 4, 8, 8)
    x = case["x"].float()[:0].requires_grad_()
    a = case["lora_a"].float().requires_grad_()
    y = fused_lora_conv2d(x, case["weight"].float(), a, case["lora_b"].float(), 1.0, padding=1)
    assert y.shape == (0, 8, 8, 8)
    y.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


# --------------------------------------------------------------------------------------------------------------------
# 16-bit dtypes: judged against PyTorch's own error at the same precision
# --------------------------------------------------------------------------------------------------------------------

def _assert_mixed(name, got, torch_same, want, dtype):
    assert_close_to_reference(name, got, want, dtype, torch_same=torch_same)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,ci,co,k,r,h,w,relu,res,layout", [
    (2, 24, 16, 3, 4, 17, 23, False, True, "cl"),
    (1, 16, 32, 1, 16, 8, 8, True, False, "nchw"),
])
def test_half_precision_against_torch_error(dtype, n, ci, co, k, r, h, w, relu, res, layout):
    case = make_case(n, ci, co, k, r, h, w, residual=res, seed=21 + ci)
    y, grads = run(kernel_fn, case, dtype, 0.5, relu, 0.8, layout)
    y_t, grads_t = run(reference, case, dtype, 0.5, relu, 0.8, layout)
    y_ref, grads_ref = run(reference, case, torch.float64, 0.5, relu, 0.8)
    _assert_mixed("y", y, y_t, y_ref, dtype)
    if relu:
        # Rounding flips the ReLU mask where pre ≈ 0, differently for the kernel, torch and the reference, and a
        # flipped element moves a gradient by O(|grad|): compare gradients only without ReLU.
        return
    for name in grads_ref:
        _assert_mixed(f"d{name}", grads[name], grads_t[name], grads_ref[name], dtype)


def test_v2_backward_never_writes_the_masked_gradient(conv_kernel, monkeypatch):
    """v2 applies out_scale and the ReLU mask inside the dx and dW kernels (and forms dbias there): the torch pass
    that v1 uses to write ∂L/∂pre must not run when dW is computed; the gradients still match the reference."""
    if conv_kernel == "v1":
        pytest.skip("v1 forms ∂L/∂pre with torch by design")

    def forbidden(*args, **kwargs):
        raise AssertionError("the masked gradient was formed outside the kernels")

    monkeypatch.setattr(lc, "_relu_grad_input", forbidden)
    for relu, res, out_scale in ((True, False, 0.8), (True, True, -0.6), (False, False, 1.5)):
        case = make_case(2, 16, 24, 3, 4, 9, 11, bias=True, residual=res, seed=31)
        y, grads = run(kernel_fn, case, torch.float32, 0.5, relu, out_scale, "cl")
        y_ref, grads_ref = run(reference, case, torch.float64, 0.5, relu, out_scale)
        assert_close_fp32("y", y, y_ref, "ieee")
        for name in grads_ref:
            assert_close_fp32(f"d{name}", grads[name], grads_ref[name], "ieee")


def test_backward_runs_the_design_of_its_forward(conv_kernel, monkeypatch):
    """The design is read when the forward runs and remembered: a backward after the switch changed still runs the
    forward's (so a benchmark can time v1 and v2 training steps side by side in one process)."""
    other = "v1" if conv_kernel == "v2" else "v2"
    case = make_case(1, 8, 8, 3, 2, 6, 7, seed=33)
    leaves = [case[k].float().requires_grad_() for k in ("x", "weight", "lora_a", "lora_b")]
    y = fused_lora_conv2d(*leaves, 0.5, None, padding=1, relu=True, input_precision="ieee")
    calls = []
    original = lc._lora_conv2d_backward_v2
    monkeypatch.setattr(lc, "_lora_conv2d_backward_v2", lambda *a: calls.append(1) or original(*a))
    with use_conv_kernel(other):
        y.backward(case["grad"].float())
    assert bool(calls) == (conv_kernel == "v2")
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


# --------------------------------------------------------------------------------------------------------------------
# determinism, autograd.Function, custom op, torch.compile
# --------------------------------------------------------------------------------------------------------------------

def test_weight_gradient_is_deterministic(conv_kernel):
    case = make_case(2, 16, 24, 3, 4, 17, 23, seed=13)
    chunk_m, chunks = lc._dw_chunk(2 * 17 * 23, 24, 16, 9, tap_programs=conv_kernel == "v1")
    assert chunks > 1, "the case should split the pixel reduction into several chunks"
    runs = [run(kernel_fn, case, torch.float32, 0.5, True, 1.0, "cl")[1] for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), f"d{name} differs between two identical runs"


def test_tuning_keys_separate_precisions_and_epilogues():
    """A config timed for one dot precision or epilogue is not reused for another: they change the generated code
    (FMA vs MMA loops, extra loads and stores), and tf32-sized tiles spill in ieee."""
    fwd_keys = set(lc._lora_conv_fwd_kernel.keys)
    assert {"INPUT_PRECISION", "HAS_BIAS", "RELU", "HAS_RES", "WRITE_MASK", "HAS_LORA"} <= fwd_keys
    assert "INPUT_PRECISION" in set(lc._conv_dw_kernel.keys)
    assert {"INPUT_PRECISION", "IN_MASK", "SCALE_IN", "BIAS_GRAD"} <= set(lc._conv_dw_taps_kernel.keys)
    assert {"IN_MASK", "SCALE_IN"} <= fwd_keys
    # The pruner hands each precision its own list (one shared entry in the interpreter).
    named = {"Ci": 64, "Co": 64}
    for prec, own in lc._FWD_BY_PRECISION.items():
        kept = lc._prune_fwd(lc._FWD_CONFIGS, named, INPUT_PRECISION=prec)
        assert kept and all(any(c is o for o in own) for c in kept), prec


def test_autograd_function_matches_custom_op():
    case = make_case(2, 16, 16, 3, 4, 8, 8, residual=True, seed=17)

    def via_function(x, weight, lora_a, lora_b, bias, residual, scaling, relu, out_scale):
        y, mask = FusedLoRAConv2dFunction.apply(x, weight, lora_a, lora_b, bias, residual, scaling, relu, out_scale,
                                                "ieee")
        assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) <= {0, 1}
        return y

    y1, g1 = run(via_function, case, torch.float32, 0.5, True, 1.5, "cl")
    y2, g2 = run(kernel_fn, case, torch.float32, 0.5, True, 1.5, "cl")
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_opcheck_custom_ops(conv_kernel):
    case = make_case(1, 16, 16, 3, 4, 8, 8, residual=True, seed=19)
    x, w, a, b, bias, res = (case[k].float() for k in GRAD_NAMES)
    for requires_grad in (False, True):
        leaves = [t.clone().requires_grad_(requires_grad) for t in (x, w, a, b, bias)]
        torch.library.opcheck(torch.ops.lorun_fast.lora_conv2d.default,
                              (*leaves, res, 0.5, True, 1.0, "ieee"))
    torch.library.opcheck(torch.ops.lorun_fast.lora_conv2d_backward.default,
                          (case["grad"].float(), x, w, a, b, None, 0.5, False, True, 1.0, "ieee",
                           conv_kernel, True, True, True, True, True))


def _compile_check(backend):
    case = make_case(2, 8, 16, 3, 4, 8, 8, residual=True, seed=23)

    def loss_fn(x, w, a, b, bias, res):
        y = fused_lora_conv2d(x, w, a, b, 0.5, bias, padding=1, relu=True, residual=res, out_scale=0.5,
                              input_precision="ieee")
        return (y * y).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    leaves = [case[k].float() for k in GRAD_NAMES]
    eager_leaves = [t.clone().requires_grad_() for t in leaves]
    comp_leaves = [t.clone().requires_grad_() for t in leaves]
    loss_e = loss_fn(*eager_leaves)
    loss_c = compiled(*comp_leaves)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    for name, ge, gc in zip(GRAD_NAMES, eager_leaves, comp_leaves):
        torch.testing.assert_close(gc.grad, ge.grad, rtol=1e-6, atol=1e-7, msg=f"d{name}")


def test_torch_compile_fullgraph_aot_eager():
    # The custom op is opaque to the compiler: Dynamo/AOTAutograd trace it through register_fake and
    # register_autograd; its body (the Triton launch, interpreted on CPU) runs eagerly.
    _compile_check("aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="Inductor on CPU needs a C++ compiler")
def test_torch_compile_fullgraph_inductor():
    _compile_check("inductor")


# --------------------------------------------------------------------------------------------------------------------
# input validation (no kernel launches)
# --------------------------------------------------------------------------------------------------------------------

def _valid_args():
    x = torch.randn(2, 4, 5, 5)
    return dict(x=x, weight=torch.randn(6, 4, 3, 3), lora_a=torch.randn(2, 4, 3, 3), lora_b=torch.randn(6, 2),
                scaling=1.0, bias=torch.randn(6), padding=1, residual=None, relu=False, out_scale=1.0,
                input_precision="tf32")


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=torch.randn(4, 5, 5)), ValueError, "x: expected a 4-D"),
    (dict(x=torch.randn(2, 3, 5, 5)), ValueError, "x: expected 4 channels"),
    (dict(x=torch.randint(0, 3, (2, 4, 5, 5))), TypeError, "x: expected a floating-point"),
    (dict(x=torch.randn(2, 4, 5, 5, dtype=torch.float64)), TypeError, "x: dtype torch.float64 is not supported"),
    (dict(weight=torch.randn(6, 4, 5, 5), lora_a=torch.randn(2, 4, 5, 5), padding=2), ValueError,
     "weight: kernel must be 1×1 or 3×3"),
    (dict(weight=torch.randn(6, 4, 3, 1)), ValueError, "weight: kernel must be"),
    (dict(weight=torch.randn(6, 4, 3)), ValueError, "weight: expected a 4-D"),
    (dict(lora_a=torch.randn(2, 4, 1, 1)), ValueError, "lora_a: expected shape"),
    (dict(lora_b=torch.randn(6, 3)), ValueError, "lora_b: rank 3 does not match lora_a's rank 2"),
    (dict(lora_b=torch.randn(5, 2)), ValueError, "lora_b: expected 6 output channels"),
    (dict(lora_b=torch.randn(6, 2, 3, 3)), ValueError, "lora_b: expected shape"),
    (dict(bias=torch.randn(5)), ValueError, "bias: expected shape"),
    (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, "bias: dtype torch.float16 does not match"),
    (dict(lora_b=torch.randn(6, 2).bfloat16()), TypeError, "lora_b: dtype"),
    (dict(residual=torch.randn(2, 6, 4, 5)), ValueError, "residual: expected the output's shape"),
    (dict(residual=torch.randn(2, 6, 5, 5, device="meta")), ValueError, "residual: on device meta"),
    (dict(padding=0), ValueError, "padding: only 'same' padding"),
    (dict(padding="valid"), ValueError, "padding: expected"),
    (dict(padding=(1, 0)), ValueError, "padding: expected"),
    (dict(input_precision="bf16x3"), ValueError, "input_precision: expected one of"),
    (dict(scaling=torch.tensor(1.0)), TypeError, "scaling: expected a Python float"),
    (dict(out_scale=float("nan")), ValueError, "out_scale: expected a finite number"),
    (dict(weight=[[1.0]]), TypeError, "weight: expected a torch.Tensor"),
])
def test_bad_inputs_raise_naming_the_argument(change, exc, match):
    args = _valid_args()
    args.update(change)
    x, w, a, b, s = (args.pop(k) for k in ("x", "weight", "lora_a", "lora_b", "scaling"))
    bias = args.pop("bias")
    with pytest.raises(exc, match=match):
        fused_lora_conv2d(x, w, a, b, s, bias, **args)


def test_valid_padding_spellings_are_accepted():
    args = _valid_args()
    for padding in (1, (1, 1), "same"):
        lc._check_inputs(args["x"], args["weight"], args["lora_a"], args["lora_b"], 1.0, None, padding, None, 1.0,
                         "ieee")
    lc._check_inputs(args["x"], torch.randn(6, 4, 1, 1), torch.randn(2, 4, 1, 1), torch.randn(6, 2, 1, 1), 1.0, None,
                     0, None, 1.0, "ieee")


# --------------------------------------------------------------------------------------------------------------------
# per-sample adapter index (fused_lora_conv2d_indexed): always the v2 kernels
# --------------------------------------------------------------------------------------------------------------------

RANKS = (1, 4, 2)
# Adapter 1 is never used; 0 and 2 repeat, interleaved.
INDEX = (2, 0, 2, 2, 0)


@pytest.fixture
def indexed_once(conv_kernel):
    """The indexed function ignores the v1/v2 switch: run its tests once (test_indexed_always_runs_v2 covers the
    v1 setting)."""
    if conv_kernel == "v1":
        pytest.skip("fused_lora_conv2d_indexed always runs v2: the v2 run covers it")


def make_indexed_case(n, ci, co, k, ranks, h, w, bias=True, residual=False, seed=0):
    """Fresh float64 inputs with U = len(ranks) adapters, B_u as peft's (Co, r_u, 1, 1)."""
    rnd, fan_in = _normal(seed), ci * k * k
    return {
        "x": rnd(n, ci, h, w),
        "weight": rnd(co, ci, k, k, scale=fan_in ** -0.5),
        "lora_a": [rnd(r, ci, k, k, scale=fan_in ** -0.5) for r in ranks],
        "lora_b": [rnd(co, r, 1, 1, scale=r ** -0.5) for r in ranks],
        "bias": rnd(co) if bias else None,
        "residual": rnd(n, co, h, w) if residual else None,
        "grad": rnd(n, co, h, w),
    }


def indexed_reference(x, weight, lora_a, lora_b, index, bias, residual, scaling, relu, out_scale):
    """Sample by sample: F.conv2d with that sample's merged weight, then the epilogue of ``reference``."""
    ys = [reference(x[n:n + 1], weight, lora_a[u], lora_b[u], bias, None, scaling, relu, out_scale)
          for n, u in enumerate(index.tolist())]
    y = torch.cat(ys)
    return y if residual is None else y + residual


def indexed_kernel_fn(x, weight, lora_a, lora_b, index, bias, residual, scaling, relu, out_scale,
                      input_precision="ieee"):
    return lc.fused_lora_conv2d_indexed(x, weight, lora_a, lora_b, scaling, index, bias,
                                        padding=weight.shape[-1] // 2, relu=relu, residual=residual,
                                        out_scale=out_scale, input_precision=input_precision)


def run_indexed(fn, case, index, dtype, scaling, relu, out_scale, layout="nchw", **kw):
    """Forward + backward through ``fn``; returns (y, {name: grad or None}) in float64, names ``lora_a[u]`` etc."""
    def leaf(t, lay="nchw"):
        return None if t is None else to_layout(t.detach().to(dtype), lay).requires_grad_()

    x, weight, bias = leaf(case["x"], layout), leaf(case["weight"]), leaf(case["bias"])
    residual = leaf(case["residual"], layout)
    lora_a, lora_b = [leaf(a) for a in case["lora_a"]], [leaf(b) for b in case["lora_b"]]
    y = fn(x, weight, lora_a, lora_b, index, bias, residual, scaling, relu, out_scale, **kw)
    y.backward(case["grad"].to(dtype))
    named = {"x": x, "weight": weight, "bias": bias, "residual": residual}
    named.update({f"lora_a[{u}]": a for u, a in enumerate(lora_a)})
    named.update({f"lora_b[{u}]": b for u, b in enumerate(lora_b)})
    grads = {k: (None if v.grad is None else v.grad.double()) for k, v in named.items() if v is not None}
    return y.detach().double(), grads


def _check_indexed_grads(grads, grads_ref, index, compare):
    """Every kernel gradient exists; an unused adapter's (None in the reference) is exactly zero."""
    used = set(index.tolist())
    for name, want in grads_ref.items():
        got = grads[name]
        assert got is not None, f"d{name} is missing"
        if want is None:
            assert int(name[-2]) not in used and torch.equal(got, torch.zeros_like(got)), name
        else:
            compare(f"d{name}", got, want, name)


#      n  ci  co  k   h  w  bias  relu   res    layout  out_scale
INDEXED_CASES = [
    (5, 5, 7, 3, 9, 6, True, True, True, "cl", 0.5),       # relu + residual: the saved-mask path
    (5, 5, 7, 3, 9, 6, False, False, False, "nchw", 1.0),  # bare convolution
    (5, 5, 7, 3, 9, 6, True, True, False, "nchw", -1.5),   # relu, no residual (mask from y), negative out_scale
    (5, 6, 3, 1, 7, 5, True, False, True, "cl", 2.0),      # 1×1
]


@pytest.mark.parametrize("n,ci,co,k,h,w,bias,relu,res,layout,out_scale", INDEXED_CASES)
def test_indexed_float32_matches_float64_reference(indexed_once, n, ci, co, k, h, w, bias, relu, res, layout,
                                                    out_scale):
    case = make_indexed_case(n, ci, co, k, RANKS, h, w, bias=bias, residual=res, seed=41 + k + 3 * relu)
    index = torch.tensor(INDEX, device=DEVICE)
    y, grads = run_indexed(indexed_kernel_fn, case, index, torch.float32, 0.75, relu, out_scale, layout)
    y_ref, grads_ref = run_indexed(indexed_reference, case, index, torch.float64, 0.75, relu, out_scale)
    assert_close_fp32("y", y, y_ref, "ieee")
    assert set(grads) == set(grads_ref)
    _check_indexed_grads(grads, grads_ref, index, lambda name, got, want, _: assert_close_fp32(name, got, want, "ieee"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_indexed_half_precision_against_torch_error(indexed_once, dtype):
    case = make_indexed_case(5, 5, 7, 3, RANKS, 9, 6, residual=True, seed=43)
    index = torch.tensor(INDEX, device=DEVICE)
    y, grads = run_indexed(indexed_kernel_fn, case, index, dtype, 0.5, False, 0.8, "cl")
    y_t, grads_t = run_indexed(indexed_reference, case, index, dtype, 0.5, False, 0.8, "cl")
    y_ref, grads_ref = run_indexed(indexed_reference, case, index, torch.float64, 0.5, False, 0.8)
    _assert_mixed("y", y, y_t, y_ref, dtype)
    _check_indexed_grads(grads, grads_ref, index,
                         lambda name, got, want, key: _assert_mixed(name, got, grads_t[key], want, dtype))


def test_indexed_all_zero_index_equals_fused_lora_conv2d(indexed_once):
    """With every sample on adapter 0 the indexed op computes exactly what fused_lora_conv2d (v2) computes with
    adapter 0: the same merged weight, kernels and reduction order; the other adapters get zero gradients."""
    case = make_indexed_case(3, 5, 7, 3, RANKS, 9, 6, residual=True, seed=47)
    index = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    y, grads = run_indexed(indexed_kernel_fn, case, index, torch.float32, 0.5, True, 0.7, "cl")

    def single(x, weight, lora_a, lora_b, index, bias, residual, scaling, relu, out_scale):
        return fused_lora_conv2d(x, weight, lora_a[0], lora_b[0], scaling, bias, padding=1, relu=relu,
                                 residual=residual, out_scale=out_scale, input_precision="ieee")

    y1, grads1 = run_indexed(single, case, index, torch.float32, 0.5, True, 0.7, "cl")
    assert torch.equal(y, y1)
    for name, want in grads1.items():
        if want is None:
            assert torch.equal(grads[name], torch.zeros_like(grads[name])), name
        else:
            assert torch.equal(grads[name], want), name


def test_indexed_always_runs_v2(conv_kernel, monkeypatch):
    """Under either setting of the switch (v1 included) the indexed function launches only the v2 kernels."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a v1 launcher ran")

    monkeypatch.setattr(lc, "_launch_conv", forbidden)
    monkeypatch.setattr(lc, "conv_weight_grad", forbidden)
    case = make_indexed_case(3, 4, 5, 3, (2, 1), 5, 6, seed=49)
    index = torch.tensor([1, 0, 1], device=DEVICE)
    y, grads = run_indexed(indexed_kernel_fn, case, index, torch.float32, 0.5, True, 1.0)
    y_ref, grads_ref = run_indexed(indexed_reference, case, index, torch.float64, 0.5, True, 1.0)
    assert_close_fp32("y", y, y_ref, "ieee")
    _check_indexed_grads(grads, grads_ref, index, lambda name, got, want, _: assert_close_fp32(name, got, want, "ieee"))


def test_indexed_gradients_only_where_required(indexed_once):
    """A frozen base and a subset of trainable adapters: only those get gradients, and they match the reference."""
    case = make_indexed_case(4, 4, 5, 3, RANKS, 5, 6, seed=51)
    index = torch.tensor([2, 1, 1, 2], device=DEVICE)
    x, w, bias = case["x"].float(), case["weight"].float(), case["bias"].float()
    a = [t.float().requires_grad_(u == 1) for u, t in enumerate(case["lora_a"])]
    b = [t.float().requires_grad_(u == 2) for u, t in enumerate(case["lora_b"])]
    y = lc.fused_lora_conv2d_indexed(x, w, a, b, 0.5, index, bias, padding=1, relu=True, input_precision="ieee")
    y.backward(case["grad"].float())
    ra = [t.clone().requires_grad_(u == 1) for u, t in enumerate(case["lora_a"])]
    rb = [t.clone().requires_grad_(u == 2) for u, t in enumerate(case["lora_b"])]
    indexed_reference(case["x"], case["weight"], ra, rb, index, case["bias"], None, 0.5, True, 1.0).backward(
        case["grad"])
    assert [t.grad is None for t in a] == [True, False, True]
    assert [t.grad is None for t in b] == [True, True, False]
    assert_close_fp32("dlora_a[1]", a[1].grad.double(), ra[1].grad, "ieee")
    assert_close_fp32("dlora_b[2]", b[2].grad.double(), rb[2].grad, "ieee")


def test_indexed_empty_batch(indexed_once):
    case = make_indexed_case(1, 4, 5, 3, RANKS, 5, 6)
    x = case["x"].float()[:0].requires_grad_()
    a = [t.float().requires_grad_() for t in case["lora_a"]]
    y = lc.fused_lora_conv2d_indexed(x, case["weight"].float(), a, [t.float() for t in case["lora_b"]], 1.0,
                                     torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert y.shape == (0, 5, 5, 6)
    y.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in a)


def test_opcheck_indexed_custom_ops(indexed_once):
    case = make_indexed_case(3, 4, 5, 3, (1, 3), 5, 6, residual=True, seed=53)
    index = torch.tensor([1, 0, 1], device=DEVICE)
    x, w, bias, res = (case[k].float() for k in ("x", "weight", "bias", "residual"))
    for requires_grad in (False, True):
        x_, w_, bias_ = (t.clone().requires_grad_(requires_grad) for t in (x, w, bias))
        a = [t.float().requires_grad_(requires_grad) for t in case["lora_a"]]
        b = [t.float().requires_grad_(requires_grad) for t in case["lora_b"]]
        torch.library.opcheck(torch.ops.lorun_fast.lora_conv2d_indexed.default,
                              (x_, w_, a, b, index, bias_, res, 0.5, True, 1.0, "ieee"))
    a, b = [t.float() for t in case["lora_a"]], [t.float() for t in case["lora_b"]]
    grad = case["grad"].float()
    torch.library.opcheck(torch.ops.lorun_fast.lora_conv2d_indexed_backward.default,
                          (grad, x, w, a, b, index, None, 0.5, False, True, 1.0, "ieee", True, True, True, True, True))
    relu_mask = (torch.randn(grad.shape, generator=torch.Generator().manual_seed(0)) > 0).to(torch.uint8)
    torch.library.opcheck(torch.ops.lorun_fast.lora_conv2d_indexed_backward.default,
                          (grad, x, w, a, b, index, relu_mask.to(DEVICE), 0.5, True, False, -0.5, "ieee", True,
                           False, True, False, True))


def test_indexed_torch_compile_fullgraph_aot_eager(indexed_once):
    case = make_indexed_case(3, 4, 5, 3, (1, 3), 5, 6, residual=True, seed=55)
    index = torch.tensor([1, 0, 1], device=DEVICE)

    def loss_fn(x, w, bias, res, a0, a1, b0, b1):
        y = lc.fused_lora_conv2d_indexed(x, w, [a0, a1], [b0, b1], 0.5, index, bias, padding=1, relu=True,
                                         residual=res, out_scale=0.5, input_precision="ieee")
        return (y * y).mean()

    leaves = [case[k].float() for k in ("x", "weight", "bias", "residual")]
    leaves += [t.float() for t in case["lora_a"]] + [t.float() for t in case["lora_b"]]
    eager = [t.clone().requires_grad_() for t in leaves]
    comp = [t.clone().requires_grad_() for t in leaves]
    loss_e = loss_fn(*eager)
    loss_c = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*comp)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    for i, (ge, gc) in enumerate(zip(eager, comp)):
        torch.testing.assert_close(gc.grad, ge.grad, rtol=1e-6, atol=1e-7, msg=f"leaf {i}")


def _valid_indexed_args():
    return dict(x=torch.randn(3, 4, 5, 5), weight=torch.randn(6, 4, 3, 3),
                lora_a=[torch.randn(2, 4, 3, 3), torch.randn(1, 4, 3, 3), torch.randn(2, 4, 3, 3)],
                lora_b=[torch.randn(6, 2, 1, 1), torch.randn(6, 1, 1, 1), torch.randn(6, 2)], scaling=1.0,
                index=torch.tensor([0, 2, 0]), bias=torch.randn(6), padding=1, residual=None, relu=False,
                out_scale=1.0, input_precision="tf32")


@pytest.mark.parametrize("change,exc,match", [
    (dict(index=torch.tensor([0, 2, 0], dtype=torch.int32)), TypeError,
     r"index: expected dtype torch.int64, got torch.int32"),
    (dict(index=[0, 2, 0]), TypeError, "index: expected a torch.Tensor"),
    (dict(index=torch.tensor([0, 2])), ValueError, r"index: expected a 1-D tensor of length 3 .* got shape \(2,\)"),
    (dict(index=torch.zeros(3, 1, dtype=torch.int64)), ValueError, r"index: expected a 1-D tensor of length 3"),
    (dict(index=torch.zeros(3, dtype=torch.int64, device="meta")), ValueError, "index: on device meta"),
    (dict(index=torch.tensor([0, 3, 0])), ValueError, r"index: values must lie in \[0, 3\) for 3 adapters, got "
                                                     r"values from 0 to 3"),
    (dict(index=torch.tensor([0, -1, 0])), ValueError, r"index: values must lie in \[0, 3\).*from -1 to 0"),
    (dict(lora_b=[torch.randn(6, 2, 1, 1), torch.randn(6, 1, 1, 1)]), ValueError,
     r"lora_b: expected one B per A \(3 adapters in lora_a\), got 2"),
    (dict(lora_a=torch.randn(2, 4, 3, 3)), TypeError, "lora_a: expected a list or tuple of U tensors"),
    (dict(lora_a=[], lora_b=[]), ValueError, "lora_a: expected at least one adapter"),
    (dict(lora_a=[torch.randn(2, 4, 3, 3), torch.randn(1, 4, 1, 1), torch.randn(2, 4, 3, 3)]), ValueError,
     r"lora_a\[1\]: expected shape \(r, 4, 3, 3\)"),
    (dict(lora_b=[torch.randn(6, 2, 1, 1), torch.randn(6, 1, 1, 1), torch.randn(6, 3)]), ValueError,
     r"lora_b\[2\]: rank 3 does not match lora_a\[2\]'s rank 2"),
    (dict(lora_b=[torch.randn(5, 2, 1, 1), torch.randn(6, 1, 1, 1), torch.randn(6, 2)]), ValueError,
     r"lora_b\[0\]: expected 6 output channels"),
    (dict(lora_b=[torch.randn(6, 2, 1, 1), torch.randn(6, 1, 3, 3), torch.randn(6, 2)]), ValueError,
     r"lora_b\[1\]: expected shape \(6, r\) or \(6, r, 1, 1\)"),
    (dict(lora_a=[torch.randn(2, 4, 3, 3).double(), torch.randn(1, 4, 3, 3), torch.randn(2, 4, 3, 3)]), TypeError,
     r"lora_a\[0\]: dtype torch.float64 does not match"),
    (dict(lora_b=[torch.randn(6, 2, 1, 1), "B", torch.randn(6, 2)]), TypeError,
     r"lora_b\[1\]: expected a torch.Tensor"),
    (dict(weight=torch.randn(6, 4, 5, 5)), ValueError, "weight: kernel must be 1×1 or 3×3"),
    (dict(x=torch.randn(3, 5, 5, 5)), ValueError, "x: expected 4 channels"),
    (dict(padding=0), ValueError, "padding: only 'same' padding"),
    (dict(residual=torch.randn(3, 6, 5, 4)), ValueError, "residual: expected the output's shape"),
])
def test_indexed_bad_inputs_raise_naming_the_argument(indexed_once, change, exc, match):
    args = _valid_indexed_args()
    args.update(change)
    x, w, a, b, s, index = (args.pop(k) for k in ("x", "weight", "lora_a", "lora_b", "scaling", "index"))
    bias = args.pop("bias")
    with pytest.raises(exc, match=match):
        lc.fused_lora_conv2d_indexed(x, w, a, b, s, index, bias, **args)


# --------------------------------------------------------------------------------------------------------------------
# GPU only: realistic shapes, tuned configs, TF32 and bf16
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_gpu_large_shapes(k, layout):
    case = make_case(4, 64, 64, k, 8, 48, 56, residual=True, seed=31)
    y_ref, grads_ref = run(reference, case, torch.float64, 0.5, False, 1.0)
    for mode in ("ieee", "tf32x3", "tf32"):
        y, grads = run(kernel_fn, case, torch.float32, 0.5, False, 1.0, layout, input_precision=mode)
        assert_close_fp32(f"y[{mode}]", y, y_ref, mode)
        for name in grads_ref:
            assert_close_fp32(f"d{name}[{mode}]", grads[name], grads_ref[name], mode)
    for dtype in (torch.bfloat16, torch.float16):
        y, grads = run(kernel_fn, case, dtype, 0.5, False, 1.0, layout)
        y_t, grads_t = run(reference, case, dtype, 0.5, False, 1.0, layout)
        _assert_mixed(f"y[{dtype}]", y, y_t, y_ref, dtype)
        for name in grads_ref:
            _assert_mixed(f"d{name}[{dtype}]", grads[name], grads_t[name], grads_ref[name], dtype)


@pytest.mark.gpu
@gpu_only
def test_gpu_weight_gradient_deterministic_many_chunks():
    case = make_case(8, 32, 48, 3, 4, 64, 64, seed=37)
    runs = [run(kernel_fn, case, torch.bfloat16, 0.5, True, 1.0, "cl")[1] for _ in range(3)]
    for name in runs[0]:
        for other in runs[1:]:
            assert torch.equal(runs[0][name], other[name]), f"d{name} differs between identical runs"
