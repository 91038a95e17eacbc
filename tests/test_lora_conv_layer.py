"""FusedLoRunConv against the reference LoRA convolution, on every backend; the fast LoRun model conversion."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorun_fast import FusedLoRunConv, ModelConfig, build_dun, to_fast, to_reference
from lorun_fast.reference import BlockCS, LoRAConv2d
from lorun_fast.testing import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("single_thread")

# The Triton backend runs compiled on a GPU and in the interpreter (float32 CPU tensors) elsewhere.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



def _check(name, got, ref, backend):
    """lorun_fast.testing's rule: ieee float32 for the Triton backend (the interpreter; tf32 on a GPU is judged in
    the GPU tests), float64 for the others. The reference runs in float64."""
    assert_close_to_reference(name, got.cpu(), ref, "ieee" if backend == "triton" else torch.float64)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _randomise_adapters(layer, generator):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)


def _pair(cin, cout, k, rank, num_stages, seed, bias=False, backend="merged"):
    """A reference layer in float64 and its fast sibling with the same parameters."""
    generator = torch.Generator().manual_seed(seed)
    base = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias).double()
    reference = LoRAConv2d(base, num_stages, rank=rank)
    _randomise_adapters(reference, generator)
    fast = FusedLoRunConv.from_lora(reference, backend=backend, input_precision="ieee")
    return reference, fast, generator


CASES = [  # (cin, cout, k, rank, batch, H, W)
    (1, 16, 3, 1, 1, 17, 23),
    (3, 24, 3, 4, 2, 17, 23),
    (16, 16, 3, 16, 3, 9, 11),
    (24, 32, 1, 3, 2, 17, 23),
    (32, 3, 3, 3, 1, 8, 8),
]


@pytest.mark.parametrize("backend", ["reference", "merged", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_forward_and_gradients_match_reference(backend, case):
    cin, cout, k, rank, batch, h, w = case
    num_stages = 3
    reference, fast, generator = _pair(cin, cout, k, rank, num_stages, seed=sum(case), backend=backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    fast = fast.to(device, dtype)
    for stage in range(num_stages):
        x = torch.randn(batch, cin, h, w, generator=generator, dtype=torch.float64)
        grad = torch.randn(batch, cout, h, w, generator=generator, dtype=torch.float64)
        x_ref = x.clone().requires_grad_()
        y_ref = reference(x_ref, stage)
        y_ref.backward(grad)
        x_fast = x.to(device, dtype).requires_grad_()
        y_fast = fast(x_fast, stage)
        y_fast.backward(grad.to(device, dtype))
        assert fast.resolve_backend(x_fast) == backend
        _check(f"forward, stage {stage}", y_fast, y_ref, backend)
        _check(f"dx, stage {stage}", x_fast.grad, x_ref.grad, backend)
        for name in (f"lora_A.{stage}.weight", f"lora_B.{stage}.weight", "base_layer.weight"):
            g_fast = fast.get_parameter(name).grad.cpu()
            g_ref = reference.get_parameter(name).grad
            _check(f"d{name}, stage {stage}", g_fast, g_ref, backend)
        for other in set(range(num_stages)) - {stage}:  # other stages' adapters get no gradient
            assert fast.get_parameter(f"lora_B.{other}.weight").grad is None
        reference.zero_grad(set_to_none=True)
        fast.zero_grad(set_to_none=True)


@pytest.mark.parametrize("backend", ["merged", "triton"])
def test_fused_epilogue_matches_unfused(backend):
    reference, fast, generator = _pair(8, 8, 3, 2, 2, seed=5, bias=True, backend=backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    fast = fast.to(device, dtype)
    x = torch.randn(2, 8, 10, 13, generator=generator, dtype=torch.float64)
    residual = torch.randn(2, 8, 10, 13, generator=generator, dtype=torch.float64)
    expected = 0.5 * F.relu(reference(x, 1)) + residual
    got = fast(x.to(device, dtype), 1, relu=True, residual=residual.to(device, dtype), out_scale=0.5)
    _check("y", got, expected, backend)


def test_triton_outputs_are_fully_written(monkeypatch):
    from lorun_fast.kernels import lora_conv

    monkeypatch.setattr(lora_conv, "POISON_OUTPUTS", True)
    _, fast, generator = _pair(5, 7, 3, 2, 2, seed=9, backend="triton")
    x = torch.randn(3, 5, 13, 7, generator=generator).to(TRITON_DEVICE).requires_grad_()
    y = fast.to(TRITON_DEVICE, torch.float32)(x, 1)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(fast.lora_A["1"].weight.grad).all()


def test_merged_backend_gradcheck():
    _, fast, generator = _pair(3, 4, 3, 2, 2, seed=3, bias=True)
    x = torch.randn(1, 3, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    a = fast.lora_A["1"].weight.detach().clone().requires_grad_()
    b = fast.lora_B["1"].weight.detach().clone().requires_grad_()
    bias = fast.bias.detach().clone().requires_grad_()

    def stage_one(x, a, b, bias):
        params = {"lora_A.1.weight": a, "lora_B.1.weight": b, "base_layer.bias": bias}
        return torch.func.functional_call(fast, params, (x, 1))

    assert torch.autograd.gradcheck(stage_one, (x, a, b, bias))


@pytest.mark.parametrize("backend", ["merged", "triton"])
def test_torch_compile_fullgraph(backend):
    _, fast, generator = _pair(4, 6, 3, 2, 2, seed=11, backend=backend)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    fast = fast.to(device, torch.float32)
    x = torch.randn(2, 4, 9, 10, generator=generator).to(device).requires_grad_()
    expected = fast(x, 1)
    expected.sum().backward()
    grad_expected = x.grad.clone()
    x.grad = None
    compiled = torch.compile(lambda t: fast(t, 1), fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x.grad, grad_expected)


def test_drop_in_for_conv2d():
    layer = FusedLoRunConv(3, 16, 3, 1, 1, num_stages=4)
    assert layer.weight.shape == (16, 3, 3, 3) and layer.bias is None and layer.rank == 1
    assert layer.kernel_size == (3, 3) and layer.stride == (1, 1) and layer.padding == (1, 1)
    x = torch.randn(2, 3, 17, 23)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, padding=1))  # B = 0: exactly the base
    names = {n for n, _ in layer.named_parameters()}
    assert {"base_layer.weight", "lora_A.3.weight", "lora_B.0.weight"} <= names
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    wrapped = FusedLoRunConv.from_conv(conv, num_stages=2, gamma=50)
    assert wrapped.base_layer is conv and wrapped.rank == 4
    strided = FusedLoRunConv(8, 16, 2, stride=2, num_stages=2)
    assert not strided.triton_supported and strided.resolve_backend(torch.randn(1, 8, 4, 4)) == "merged"
    up = FusedLoRunConv.from_conv(nn.ConvTranspose2d(16, 8, 2, stride=2, bias=False), num_stages=2)
    assert up(torch.randn(1, 16, 4, 4), 1).shape == (1, 8, 8, 8)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"dilation": 2}, ValueError, "dilation"),
    ({"groups": 2}, ValueError, "groups"),
    ({"padding_mode": "reflect"}, ValueError, "padding_mode"),
    ({"backend": "cuda"}, ValueError, "backend"),
    ({"input_precision": "fp8"}, ValueError, "input_precision"),
    ({"rank": 0}, ValueError, "rank"),
    ({"kernel_size": 5, "padding": 2, "backend": "triton"}, ValueError, "backend"),
    ({"stride": 2, "backend": "triton"}, ValueError, "backend"),
])
def test_unsupported_arguments_raise_at_construction(kwargs, error, message):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 1, "num_stages": 2, **kwargs}
    with pytest.raises(error, match=message):
        FusedLoRunConv(**args)


@pytest.mark.parametrize("backend", ["merged", "triton"])
def test_bad_inputs(backend):
    layer = FusedLoRunConv(4, 4, 3, padding=1, num_stages=3, backend=backend)
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(IndexError, match="stage"):
        layer(x, 3)
    with pytest.raises(IndexError, match="stage"):
        layer(x, -1)
    with pytest.raises(TypeError, match="stage"):
        layer(x, 1.0)
    with pytest.raises(ValueError, match="x: expected \\(N, 4, H, W\\)"):
        layer(torch.randn(1, 5, 6, 6), 0)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(1, 4, 6, 6, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="meta"):
        layer(torch.randn(1, 4, 6, 6, device="meta"), 0)
    with pytest.raises(TypeError, match="dtype"):
        layer(x.double(), 0)


def _lorun_dun(seed=0):
    operator = BlockCS.gaussian(0.25, seed=seed)
    model = build_dun(operator, ModelConfig(num_stages=3, backbone_kwargs={"channels": 4, "num_blocks": 1}))
    _randomise_adapters(model, torch.Generator().manual_seed(seed))
    return model, operator


def test_fast_model_conversion_round_trip():
    model, operator = _lorun_dun()
    model = model.double()
    y = operator.A(torch.rand(2, 1, 40, 50, dtype=torch.float64))
    expected = model(y, (40, 50))
    fast = to_fast(model, backend="reference")
    assert torch.equal(fast(y, (40, 50)), expected)
    assert set(fast.state_dict()) == set(model.state_dict())
    assert torch.equal(to_reference(to_fast(model, backend="merged"))(y, (40, 50)), expected)
    assert _rel(to_fast(model, backend="merged")(y, (40, 50)), expected) < 1e-12
    layers = [m for m in fast.modules() if isinstance(m, FusedLoRunConv)]
    assert layers and len(layers) == len(fast._lora)


def test_fast_model_on_triton_matches_reference():
    """End to end: fused gradient steps and fused 3×3 convolutions (2×2 down/up layers merged)."""
    model, operator = _lorun_dun(seed=1)
    y = operator.A(torch.rand(1, 1, 40, 35))
    expected = model.double()(y.double(), (40, 35))
    fast = to_fast(model, backend="triton", input_precision="ieee").to(TRITON_DEVICE, torch.float32)
    assert type(fast.operator).__name__ == "FastBlockCS" and fast.operator.backend == "triton"
    backends = {m.backend for m in fast.modules() if isinstance(m, FusedLoRunConv)}
    assert backends == {"triton", "merged"}
    out = fast(y.to(TRITON_DEVICE), (40, 35))
    assert _rel(out.cpu(), expected) < 1e-4
    back = to_reference(fast)
    assert type(back.operator) is BlockCS and all(type(m) is not FusedLoRunConv for m in back.modules())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-3)])
def test_fast_lorun_model_on_cuda(dtype, atol):
    """The fast model on the GPU (Triton for 3×3 layers, cuDNN for the rest), judged against the float64 reference
    relative to the reference model's own error in the same dtype on the same GPU."""
    model, operator = _lorun_dun(seed=2)
    x = torch.rand(2, 1, 99, 70, generator=torch.Generator().manual_seed(0))
    y = operator.A(x)
    truth = model.double()(y.double(), (99, 70))
    torch_run = model.to("cuda", dtype)(y.to("cuda", dtype), (99, 70))
    fast = to_fast(model, backend="auto", input_precision="tf32").to("cuda", dtype)
    assert any(m.resolve_backend(y.to("cuda", dtype)) == "triton" for m in fast.modules()
               if isinstance(m, FusedLoRunConv) and m.triton_supported)
    fast_run = fast(y.to("cuda", dtype), (99, 70))
    assert torch.isfinite(fast_run).all()
    assert _rel(fast_run.cpu(), truth) <= 2 * _rel(torch_run.cpu(), truth) + atol


# ----------------------------------------------------------------------------------------------------------------
# The merged-weight cache (forwards that need no weight gradient)
# ----------------------------------------------------------------------------------------------------------------
def _count_merges(monkeypatch):
    calls = []
    original = LoRAConv2d.merged_weight

    def counting(self, stage):
        calls.append(stage)
        return original(self, stage)

    monkeypatch.setattr(LoRAConv2d, "merged_weight", counting)
    return calls


def test_merged_backend_caches_per_stage_and_follows_parameter_changes(monkeypatch):
    reference, fast, generator = _pair(8, 12, 3, 2, 3, seed=21, bias=True)
    calls = _count_merges(monkeypatch)
    x = torch.randn(2, 8, 9, 10, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        first = [fast(x, stage) for stage in range(3)]
        again = [fast(x, stage) for stage in range(3)]
    assert calls == [0, 1, 2], "the merge ran again for an unchanged stage"
    for stage in range(3):
        assert torch.equal(first[stage], again[stage])
        assert _rel(first[stage], reference(x, stage)) < 1e-12
    # An in-place update (what an optimizer step does) invalidates the stage it touches, and only that one.
    with torch.no_grad():
        fast.lora_B["1"].weight.add_(0.5)
        reference.lora_B["1"].weight.add_(0.5)
        updated = fast(x, 1)
        fast(x, 0)
    assert calls == [0, 1, 2, 1]
    assert _rel(updated, reference(x, 1)) < 1e-12 and not torch.equal(updated, first[1])
    # load_state_dict copies in place: a new version, a fresh merge.
    state = {k: v.clone() for k, v in fast.state_dict().items()}
    state["base_layer.weight"] += 0.1
    fast.load_state_dict(state)
    reference.load_state_dict(state)
    with torch.no_grad():
        assert _rel(fast(x, 2), reference(x, 2)) < 1e-12
    assert not any("cache" in key for key in fast.state_dict())


def test_no_cache_while_the_weights_train(monkeypatch):
    reference, fast, generator = _pair(4, 6, 3, 2, 2, seed=22)
    calls = _count_merges(monkeypatch)
    x = torch.randn(1, 4, 7, 7, generator=generator, dtype=torch.float64)
    for _ in range(2):
        fast(x, 1).sum().backward()
    assert calls == [1, 1], "a forward that trains the adapters must merge with autograd, every time"
    assert fast.lora_A["1"].weight.grad is not None
    # A frozen layer in a graph that needs only dx may use the cache: the gradient of x is unchanged.
    for p in fast.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_()
    fast(xg, 1).sum().backward()
    fast(xg, 1).sum().backward()
    assert calls == [1, 1, 1]
    xr = x.clone().requires_grad_()
    reference(xr, 1).sum().backward()
    assert _rel(xg.grad / 2, xr.grad) < 1e-12


def test_triton_inference_uses_the_cached_merge(monkeypatch):
    """Under no_grad the Triton path convolves with the cached merged weight (no LoRA prologue); the result equals
    the training path's and the reference."""
    from lorun_fast.kernels import lora_conv as lc

    reference, fast, generator = _pair(8, 16, 3, 2, 2, seed=23, bias=True, backend="triton")
    fast = fast.float().to(TRITON_DEVICE)
    x = torch.randn(1, 8, 9, 11, generator=generator).to(TRITON_DEVICE)
    merges = []
    original = lc.merge_weight
    monkeypatch.setattr(lc, "merge_weight", lambda *a: merges.append(1) or original(*a))
    with torch.no_grad():
        cached = [fast(x, 1, relu=True, out_scale=0.5) for _ in range(2)]
    assert len(merges) == 1
    trained = fast(x, 1, relu=True, out_scale=0.5)
    want = 0.5 * F.relu(reference(x.double().cpu(), 1))
    assert torch.equal(cached[0], cached[1])
    _check("y (cached merge)", cached[0], want, "triton")
    _check("y (training path)", trained.detach(), want, "triton")
    with pytest.raises(RuntimeError, match="fused_conv2d: has no backward"):
        lc.fused_conv2d(x.requires_grad_(), fast.weight.detach(), padding=1)


def test_cache_follows_dtype_changes_and_data_assignment():
    """``module.float()`` and ``param.data = ...`` keep the Parameter objects but change their storage: the cached
    merge must not survive either."""
    reference, fast, generator = _pair(4, 6, 3, 2, 2, seed=24)
    x = torch.randn(1, 4, 7, 7, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        _check("y in float64", fast(x, 1), reference(x, 1), "merged")
        fast.float()
        y = fast(x.float(), 1)
        assert y.dtype == torch.float32
        assert_close_to_reference("y after .float()", y, reference(x, 1), "ieee")
        fast.double()
        fast.lora_B["1"].weight.data = fast.lora_B["1"].weight.data + 0.5
        reference.lora_B["1"].weight.data = reference.lora_B["1"].weight.data + 0.5
        assert_close_to_reference("y after .data assignment", fast(x, 1), reference(x, 1), "ieee")


def test_cache_follows_replaced_parameters_modules_and_parametrizations():
    """The short inference path trusts a cache entry's tensors until a parameter or module is registered anywhere:
    load_state_dict(assign=True), a replaced adapter and a parametrization registered after caching must each
    give a fresh merge, and a parametrized weight is never cached."""
    from torch.nn.utils import parametrize

    reference, fast, generator = _pair(4, 6, 3, 2, 2, seed=26)
    x = torch.randn(1, 4, 7, 7, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        fast(x, 1)  # cached
        state = {k: v + 0.25 for k, v in fast.state_dict().items()}
        fast.load_state_dict(state, assign=True)
        reference.load_state_dict(state)
        _check("after load_state_dict(assign=True)", fast(x, 1), reference(x, 1), "merged")
        new_b = nn.Conv2d(2, 6, 1, bias=False).double()
        nn.init.normal_(new_b.weight)
        fast.lora_B["1"] = new_b
        reference.lora_B["1"] = copy.deepcopy(new_b)
        _check("after replacing lora_B['1']", fast(x, 1), reference(x, 1), "merged")

        class Double(nn.Module):
            def forward(self, weight):
                return 2 * weight

        parametrize.register_parametrization(fast.base_layer, "weight", Double())
        parametrize.register_parametrization(reference.base_layer, "weight", Double())
        _check("after a parametrization", fast(x, 1), reference(x, 1), "merged")
        fast.base_layer.parametrizations.weight.original.mul_(-1)  # an in-place change behind the parametrization
        reference.base_layer.parametrizations.weight.original.mul_(-1)
        _check("after changing the parametrized original", fast(x, 1), reference(x, 1), "merged")
    assert not any(key[0] == 1 for key in fast._merged_cache), "a parametrized weight was cached"


def test_inference_fast_path_covers_transposed_layers():
    generator = torch.Generator().manual_seed(27)
    base = nn.ConvTranspose2d(6, 4, 2, stride=2, bias=True).double()
    reference = LoRAConv2d(base, 2, rank=2)
    _randomise_adapters(reference, generator)
    fast = FusedLoRunConv.from_lora(reference, backend="merged")
    x = torch.randn(2, 6, 5, 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        for stage in range(2):
            first, again = fast(x, stage, relu=True), fast(x, stage, relu=True)
            assert torch.equal(first, again)
            _check(f"transposed stage {stage}", first, F.relu(reference(x, stage)), "merged")
        with pytest.raises(ValueError, match=r"x: expected \(N, 6, H, W\)"):
            fast(x[0], 1)


def test_inference_fast_path_matches_and_refuses_like_the_full_path():
    """Without gradients a merged layer takes a short path (cached weight, one F.conv2d); it gives the reference's
    result, epilogue included, and anything unusual falls through to the full path and its messages."""
    reference, fast, generator = _pair(6, 6, 3, 2, 3, seed=25, bias=True)
    x = torch.randn(2, 6, 9, 8, generator=generator, dtype=torch.float64)
    residual = torch.randn(2, 6, 9, 8, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        for stage in range(3):
            _check(f"stage {stage}", fast(x, stage, relu=True, residual=residual, out_scale=0.5),
                   0.5 * F.relu(reference(x, stage)) + residual, "merged")
        with pytest.raises(ValueError, match=r"x: expected \(N, 6, H, W\)"):
            fast(x[:, :5], 1)
        with pytest.raises(ValueError, match="residual: expected the output's shape"):
            fast(x, 1, residual=residual[:, :, :8])
        with pytest.raises(TypeError, match="x: dtype torch.float32 does not match"):
            fast(x.float(), 1)
        with pytest.raises(IndexError, match="stage: expected an int in"):
            fast(x, 3)
        with pytest.raises(ValueError, match="out_scale: expected a finite number"):
            fast(x, 1, out_scale=float("inf"))


def _mutations():
    """In-place and storage changes a user or an optimizer makes between two inferences, each to one tensor the
    merged weights depend on: (name, apply to a model)."""
    def layer(m):
        return m.denoisers[0].down1[0].conv1

    def edit_b(m):
        layer(m).lora_B["2"].weight.add_(0.25)

    def edit_a(m):
        layer(m).lora_A["0"].weight.mul_(-1.5)

    def edit_w(m):
        layer(m).base_layer.weight.add_(0.1)

    def assign_data(m):
        w = layer(m).lora_B["1"].weight
        w.data = w.data + 0.5

    def replace_adapter(m):
        new = nn.Conv2d(*layer(m).lora_B["1"].weight.shape[1::-1], 1, bias=False).to(torch.float64)
        nn.init.normal_(new.weight, std=0.3, generator=torch.Generator().manual_seed(5))
        layer(m).lora_B["1"] = new

    return [("lora_B add_", edit_b), ("lora_A mul_", edit_a), ("base weight add_", edit_w),
            ("lora_B .data assignment", assign_data), ("replaced lora_B module", replace_adapter)]


@pytest.mark.parametrize("mutation", range(5), ids=[name for name, _ in _mutations()])
def test_dun_inference_checks_caches_once_per_forward_and_sees_every_change(mutation):
    """A fast DUN's forward without gradients checks its layers' cached merged weights once, when it begins
    (``check_merged_caches``): each layer call then uses them unchecked, and the permission ends with the forward.
    A change to any tensor a merged weight depends on, made between two forwards, must show in the second."""
    model, operator = _lorun_dun(seed=3)
    model = model.double()
    fast = to_fast(model, backend="merged")
    layers = fast._fused_layers
    y = operator.A(torch.rand(2, 1, 40, 50, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    seen = []
    with torch.no_grad():
        fast(y, (40, 50))  # forms and caches every stage's merged weight
        handles = [layer.register_forward_pre_hook(lambda m, args: seen.append(m._checked_weights))
                   for layer in layers]
        first = fast(y, (40, 50))
        for handle in handles:
            handle.remove()
        assert len(seen) == len(layers) * fast.num_stages
        assert all(c is not None and all(w is not None for w in c) for c in seen), \
            "a forward after the first did not use the weights checked when it began"
        assert all(layer._checked_weights is None for layer in layers), "the checks outlived the forward"
        _check("DUN forward, checked once", first, model(y, (40, 50)), "merged")

        name, mutate = _mutations()[mutation]
        mutate(fast)
        mutate(model)
        second = fast(y, (40, 50))
        assert not torch.equal(second, first), f"after {name}: the old merged weight was used"
        _check(f"DUN forward after {name}", second, model(y, (40, 50)), "merged")


def test_dun_inference_checks_end_with_an_exception_and_are_not_copied():
    """The permission to skip checks lives exactly as long as the forward: an exception inside it ends it, and a
    copy made inside it (a hook deep-copying the model) does not carry it."""
    model, operator = _lorun_dun(seed=6)
    fast = to_fast(model.double(), backend="merged")
    layers = fast._fused_layers
    y = operator.A(torch.rand(1, 1, 40, 34, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    copies = []
    with torch.no_grad():
        fast(y, (40, 34))
        handle = layers[3].register_forward_pre_hook(lambda m, args: copies.append(copy.deepcopy(m)))
        fast(y, (40, 34))
        handle.remove()
        assert copies and copies[0]._checked_weights is None
        assert layers[3]._checked_weights is None

        def fail(module, args):
            assert module._checked_weights is not None
            raise RuntimeError("stop")

        handle = layers[5].register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="stop"):
            fast(y, (40, 34))
        handle.remove()
        assert all(layer._checked_weights is None for layer in layers)
    # With gradients nothing is checked ahead: the weights train.
    fast(y, (40, 34)).sum().backward()
    assert all(layer._checked_weights is None for layer in layers)


def test_inference_epilogue_in_place_leaves_inputs_and_parametrized_bias_alone():
    """The short path applies ReLU, scale and residual in place on the convolution's own output: x and the
    residual must come back untouched, and a parametrized bias (computed at each access) must still be used."""
    from torch.nn.utils import parametrize

    reference, fast, generator = _pair(6, 6, 3, 2, 2, seed=28, bias=True)
    x = torch.randn(2, 6, 7, 9, generator=generator, dtype=torch.float64)
    residual = torch.randn(2, 6, 7, 9, generator=generator, dtype=torch.float64)
    x0, residual0 = x.clone(), residual.clone()
    with torch.no_grad():
        for _ in range(2):  # the first call caches, the second takes the short path
            got = fast(x, 1, relu=True, residual=residual, out_scale=0.5)
        assert torch.equal(x, x0) and torch.equal(residual, residual0)
        assert got.data_ptr() not in (x.data_ptr(), residual.data_ptr())
        _check("relu, scale, residual", got, 0.5 * F.relu(reference(x, 1)) + residual, "merged")

        class Shift(nn.Module):
            def forward(self, bias):
                return bias + 3.0

        parametrize.register_parametrization(fast.base_layer, "bias", Shift())
        parametrize.register_parametrization(reference.base_layer, "bias", Shift())
        for _ in range(2):
            got = fast(x, 1)
        _check("parametrized bias", got, reference(x, 1), "merged")
