"""The reference LoRA convolution (lorun_fast.reference.lora_conv): the merge identity, peft conventions,
the rank rule, per-stage adapters and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorun_fast.reference import LoRAConv2d, check_stage, lora_rank, merged_conv

# float64 comparisons of algebraically equal expressions (sums of a few hundred products of O(1) terms)
TOL = {"float64": dict(rtol=1e-12, atol=1e-12)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("single_thread")


def _randomise_b(layer: LoRAConv2d, gen: torch.Generator) -> None:
    """Give every adapter a random, non-zero B (at init B = 0 and the identity would be trivial)."""
    with torch.no_grad():
        for k in range(layer.num_stages):
            b = layer.lora_B[str(k)].weight
            b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))


def _randomise_all(layer: LoRAConv2d, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


# name -> (factory of the base layer, input spatial size)
BASES = {
    "k1": (lambda: nn.Conv2d(6, 5, 1, bias=False), (7, 9)),
    "k2s2": (lambda: nn.Conv2d(6, 5, 2, stride=2, bias=False), (8, 10)),
    "k3p1": (lambda: nn.Conv2d(6, 5, 3, padding=1, bias=False), (7, 9)),
    "k3p1_bias": (lambda: nn.Conv2d(6, 5, 3, padding=1, bias=True), (7, 9)),
    "convT2s2": (lambda: nn.ConvTranspose2d(6, 5, 2, stride=2, bias=False), (5, 6)),
}


def _explicit_merged(layer: LoRAConv2d, stage: int) -> torch.Tensor:
    """W + s·B·A built by hand from the parameters, independently of delta_weight."""
    w = layer.base_layer.weight.detach()
    a = layer.lora_A[str(stage)].weight.detach()
    b = layer.lora_B[str(stage)].weight.detach()[:, :, 0, 0]  # (Co, r)
    s = layer.alpha / layer.rank
    merged = w.clone()
    if layer.transposed:  # W: (Ci, Co, kh, kw), A: (Ci, r, kh, kw)
        for i in range(w.shape[0]):
            merged[i] += s * torch.tensordot(b, a[i], dims=([1], [0]))
    else:  # W: (Co, Ci, kh, kw), A: (r, Ci, kh, kw)
        for o in range(w.shape[0]):
            for j in range(layer.rank):
                merged[o] += s * b[o, j] * a[j]
    return merged


# ----------------------------------------------------------------------------------------------------------------
# The identity conv(x, W) + s·conv1x1(conv(x, A), B) = conv(x, W + s·B·A)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 3, 5])  # 5: the full rank of a 6→5 update
@pytest.mark.parametrize("base_name", sorted(BASES))
def test_lora_identity_float64(base_name, rank):
    gen = _gen(1000 + 10 * rank + sorted(BASES).index(base_name))
    factory, (h, w) = BASES[base_name]
    base = factory().double()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    layer = LoRAConv2d(base, num_stages=3, rank=rank, alpha=2.5)
    _randomise_b(layer, gen)
    x = torch.randn(2, 6, h, w, generator=gen, dtype=torch.float64)
    for stage in range(3):
        assert layer.lora_B[str(stage)].weight.abs().min() > 0
        out = layer(x, stage)
        # the unfused three-convolution form, written out with F.* here
        a, b = layer.lora_A[str(stage)], layer.lora_B[str(stage)]
        assert a.weight.shape[:2] == ((6, rank) if layer.transposed else (rank, 6))
        unfused = base(x) + (2.5 / rank) * F.conv2d(a(x), b.weight)
        torch.testing.assert_close(out, unfused, **TOL["float64"])
        # merged_conv (the kernels' identity) and a hand-built merged weight through F.conv2d / conv_transpose2d
        torch.testing.assert_close(out, merged_conv(layer, x, stage), **TOL["float64"])
        wk = _explicit_merged(layer, stage)
        torch.testing.assert_close(layer.merged_weight(stage), wk, **TOL["float64"])
        if layer.transposed:
            direct = F.conv_transpose2d(x, wk, base.bias, base.stride, base.padding, base.output_padding)
        else:
            direct = F.conv2d(x, wk, base.bias, base.stride, base.padding)
        assert direct.shape == out.shape
        torch.testing.assert_close(out, direct, **TOL["float64"])
        # and the update is not negligible: the test would catch a dropped adapter
        assert (out - base(x)).abs().max() > 1e-3


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
def test_merged_conv_honours_padding_mode(padding_mode):
    gen = _gen(7)
    base = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode, bias=True).double()
    layer = LoRAConv2d(base, 2, rank=2)
    _randomise_all(layer, gen)
    x = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64)
    for stage in range(2):
        torch.testing.assert_close(merged_conv(layer, x, stage), layer(x, stage), **TOL["float64"])


# ----------------------------------------------------------------------------------------------------------------
# peft conventions: names, initialisation, scaling, the rank rule
# ----------------------------------------------------------------------------------------------------------------
def test_peft_parameter_names():
    layer = LoRAConv2d(nn.Conv2d(4, 6, 3, padding=1, bias=False), num_stages=3, rank=2)
    names = {name for name, _ in layer.named_parameters()}
    expected = {"base_layer.weight"} | {f"lora_{ab}.{k}.weight" for ab in "AB" for k in range(3)}
    assert names == expected
    withbias = LoRAConv2d(nn.Conv2d(4, 6, 3, padding=1, bias=True), num_stages=1, rank=2)
    assert "base_layer.bias" in dict(withbias.named_parameters())
    assert not any("lora" in n and n.endswith("bias") for n, _ in withbias.named_parameters())


@pytest.mark.parametrize("transposed", [False, True])
def test_init_b_zero_a_nonzero_and_stage_equals_base(transposed):
    torch.manual_seed(3)
    base = (nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False) if transposed
            else nn.Conv2d(8, 4, 3, padding=1, bias=False))
    layer = LoRAConv2d(base, num_stages=4, rank=3)
    x = torch.randn(2, 8, 5, 6, generator=_gen(4))
    for k in range(4):
        a, b = layer.lora_A[str(k)].weight, layer.lora_B[str(k)].weight
        assert torch.count_nonzero(b) == 0
        assert torch.count_nonzero(a) == a.numel()
        # kaiming-uniform(a=√5): U(−1/√fan_in, 1/√fan_in) with fan_in = size(1)·kh·kw
        bound = 1 / math.sqrt(a.shape[1] * a.shape[2] * a.shape[3])
        assert a.abs().max() <= bound
        assert a.abs().max() > 0.5 * bound
        assert torch.count_nonzero(layer.delta_weight(k)) == 0
        assert torch.equal(layer(x, k), base(x))
    # adapters of different stages are drawn independently
    assert not torch.equal(layer.lora_A["0"].weight, layer.lora_A["1"].weight)


def test_scaling_and_alpha_default():
    base = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    layer = LoRAConv2d(base, 2, rank=4)
    assert layer.alpha == 4 and layer.scaling == 1.0
    layer = LoRAConv2d(base, 2, rank=4, alpha=8)
    assert layer.alpha == 8 and layer.scaling == 2.0
    layer = LoRAConv2d(base, 2, rank=3, alpha=1)
    assert layer.scaling == pytest.approx(1 / 3, rel=1e-15)
    layer = LoRAConv2d(base, 2)  # γ rule: ceil(16·10/100) = 2, alpha = rank
    assert layer.rank == 2 and layer.alpha == 2 and layer.scaling == 1.0


@pytest.mark.parametrize("cin, cout, gamma, expected", [
    (32, 32, 10, 4), (30, 64, 10, 3), (64, 30, 10, 3), (1, 32, 10, 1), (64, 64, 10, 7), (3, 3, 10, 1),
    (32, 32, 100, 32), (17, 40, 100, 17), (40, 17, 100, 17), (64, 128, 25, 16), (64, 128, 12.5, 8),
    (10, 10, 0.001, 1),
])
def test_lora_rank_rule(cin, cout, gamma, expected):
    assert lora_rank(cin, cout, gamma) == expected


def test_lora_rank_default_gamma_and_layer_uses_it():
    assert lora_rank(64, 64) == 7
    assert LoRAConv2d(nn.Conv2d(30, 64, 3, bias=False), 1).rank == 3
    assert LoRAConv2d(nn.Conv2d(64, 64, 3, bias=False), 1, gamma=100).rank == 64
    assert LoRAConv2d(nn.ConvTranspose2d(64, 32, 2, stride=2, bias=False), 1).rank == 4


def test_explicit_rank_overrides_rule():
    layer = LoRAConv2d(nn.Conv2d(8, 6, 3, bias=False), 2, rank=5, gamma=100)
    assert layer.rank == 5
    assert layer.lora_A["1"].weight.shape == (5, 8, 3, 3)
    assert layer.lora_B["1"].weight.shape == (6, 5, 1, 1)
    layer = LoRAConv2d(nn.Conv2d(8, 6, 3, bias=False), 2, rank=6)  # the most an 8→6 update can use
    assert layer.rank == 6
    with pytest.raises(ValueError, match="rank: 20 is above 6"):
        LoRAConv2d(nn.Conv2d(8, 6, 3, bias=False), 2, rank=20)


# ----------------------------------------------------------------------------------------------------------------
# delta / merged weights and per-stage adapters
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transposed", [False, True])
def test_delta_and_merged_weight_shapes_and_values(transposed):
    gen = _gen(11)
    base = (nn.ConvTranspose2d(6, 4, 2, stride=2, bias=False) if transposed
            else nn.Conv2d(6, 4, 3, padding=1, bias=False)).double()
    layer = LoRAConv2d(base, 3, rank=2, alpha=3)
    _randomise_all(layer, gen)
    for k in range(3):
        delta, merged = layer.delta_weight(k), layer.merged_weight(k)
        assert delta.shape == base.weight.shape and merged.shape == base.weight.shape
        assert delta.dtype == torch.float64
        torch.testing.assert_close(merged, base.weight + delta, rtol=0, atol=0)
        torch.testing.assert_close(merged, _explicit_merged(layer, k), **TOL["float64"])
        # rank ≤ 2 as a matrix (Co × Ci·kh·kw, or Ci×Co per tap for the transposed layout)
        mat = delta.transpose(0, 1) if transposed else delta
        assert torch.linalg.matrix_rank(mat.flatten(1)) <= 2


def test_each_stage_uses_its_own_adapter():
    gen = _gen(12)
    layer = LoRAConv2d(nn.Conv2d(5, 5, 3, padding=1, bias=False).double(), 4, rank=2)
    _randomise_b(layer, gen)
    x = torch.randn(1, 5, 6, 6, generator=gen, dtype=torch.float64)
    outs = [layer(x, k) for k in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(outs[i], outs[j])
    # changing stage 2's adapter changes stage 2 only
    with torch.no_grad():
        layer.lora_B["2"].weight.mul_(2)
    for k in range(4):
        assert torch.equal(layer(x, k), outs[k]) == (k != 2)


def test_active_stage_used_when_stage_is_none():
    gen = _gen(13)
    layer = LoRAConv2d(nn.Conv2d(3, 4, 3, padding=1, bias=False).double(), 3, rank=2)
    _randomise_b(layer, gen)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    assert layer.active_stage == 0
    assert torch.equal(layer(x), layer(x, 0))
    layer.active_stage = 2
    assert torch.equal(layer(x), layer(x, 2))
    assert torch.equal(layer(x, 1), layer(x, stage=1))  # an explicit stage wins over active_stage
    layer.active_stage = 3
    with pytest.raises(IndexError, match="stage"):
        layer(x)


def test_check_stage_accepts_int_tensors():
    assert check_stage(2, 3) == 2
    assert check_stage(torch.tensor(1), 3) == 1
    with pytest.raises(TypeError, match="stage"):
        check_stage(torch.tensor(1.0), 3)


def test_freeze_base_and_gradients():
    gen = _gen(14)
    layer = LoRAConv2d(nn.Conv2d(3, 4, 3, padding=1, bias=True), 2, rank=2)
    layer.freeze_base()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {f"lora_{ab}.{k}.weight" for ab in "AB" for k in range(2)}
    x = torch.randn(1, 3, 5, 5, generator=gen)
    layer(x, 1).square().sum().backward()
    assert layer.lora_B["1"].weight.grad.abs().sum() > 0
    assert torch.count_nonzero(layer.lora_A["1"].weight.grad) == 0  # B = 0 ⇒ dL/dA = 0
    assert layer.lora_B["0"].weight.grad is None
    assert layer.base_layer.weight.grad is None


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
def _layer(num_stages: int = 3) -> LoRAConv2d:
    return LoRAConv2d(nn.Conv2d(4, 4, 3, padding=1, bias=False), num_stages, rank=2)


@pytest.mark.parametrize("stage", [-1, 3, 100])
def test_stage_out_of_range(stage):
    layer = _layer(3)
    x = torch.zeros(1, 4, 5, 5)
    with pytest.raises(IndexError, match=r"stage.*\[0, 3\)"):
        layer(x, stage)
    with pytest.raises(IndexError, match="stage"):
        layer.delta_weight(stage)
    with pytest.raises(IndexError, match="stage"):
        layer.merged_weight(stage)
    with pytest.raises(IndexError, match="stage"):
        merged_conv(layer, x, stage)


@pytest.mark.parametrize("stage", [1.0, True, False, "1", None])
def test_stage_wrong_type(stage):
    layer = _layer(3)
    x = torch.zeros(1, 4, 5, 5)
    if stage is not None:  # stage=None in forward means active_stage
        with pytest.raises(TypeError, match="stage"):
            layer(x, stage)
    with pytest.raises(TypeError, match="stage"):
        layer.delta_weight(stage)


@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (1, 5, 5, 5), (4, 5, 5), (1, 1, 4, 5, 5)])
def test_wrong_input_shape(shape):
    with pytest.raises(ValueError, match=r"x: expected \(N, 4, H, W\)"):
        _layer()(torch.zeros(shape), 0)


def test_groups_base_rejected():
    with pytest.raises(ValueError, match="base_layer.*groups"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), 2, rank=1)
    with pytest.raises(ValueError, match="base_layer.*groups"):
        LoRAConv2d(nn.ConvTranspose2d(4, 4, 2, stride=2, groups=4), 2, rank=1)


@pytest.mark.parametrize("base", [nn.Linear(4, 4), nn.Conv1d(4, 4, 3), nn.ReLU(), None])
def test_non_conv_base_rejected(base):
    with pytest.raises(TypeError, match="base_layer"):
        LoRAConv2d(base, 2, rank=1)


@pytest.mark.parametrize("rank", [0, -2, 1.5, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        LoRAConv2d(nn.Conv2d(4, 4, 3), 2, rank=rank)


@pytest.mark.parametrize("gamma", [0, -10, 0.0, 101])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        lora_rank(32, 32, gamma)
    with pytest.raises(ValueError, match="gamma"):
        LoRAConv2d(nn.Conv2d(32, 32, 3), 2, gamma=gamma)


@pytest.mark.parametrize("num_stages", [0, -1, 2.0, True])
def test_bad_num_stages(num_stages):
    with pytest.raises(ValueError, match="num_stages"):
        LoRAConv2d(nn.Conv2d(4, 4, 3), num_stages, rank=1)
