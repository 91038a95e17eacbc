"""The reference backbones and DUN (lorun_fast.reference.backbones / dun): shapes, block locality of ISTA-Net+,
the three strategies, LoRun's exact start from the shared DUN, freezing, targets, gradients and bad input."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorun_fast.reference import (CASSI, DUN, BlockCS, ISTANetPlusPhase, LoRAConv2d, RankClampWarning, ResUNet,
                                  SuperResolution, find_convolutions, gaussian_kernel, lora_layers)

TOL = {
    "float64": dict(rtol=1e-10, atol=1e-10),  # two float64 evaluations of one network (different op order)
    "float32": dict(rtol=1e-5, atol=1e-5),
}
K = 3  # stages


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("single_thread")


@functools.lru_cache(maxsize=None)
def _cs_operator() -> BlockCS:
    return BlockCS.gaussian(0.25, seed=0)


def _tiny_resunet(in_channels: int = 1, **kwargs) -> ResUNet:
    return ResUNet(in_channels, channels=4, num_blocks=1, **kwargs)


def _cs_measurement(dtype=torch.float32, seed: int = 0, batch: int = 2) -> torch.Tensor:
    x = torch.rand(batch, 1, 33, 66, generator=_gen(seed), dtype=torch.float64)
    return _cs_operator().A(x).to(dtype)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomise_lora_b(model: DUN, gen: torch.Generator, stages=None, names=None, scale: float = 0.1) -> None:
    with torch.no_grad():
        for name in model.lora_names:
            if names is not None and name not in names:
                continue
            layer = model.denoisers[0].get_submodule(name)
            for k in (range(model.num_stages) if stages is None else stages):
                b = layer.lora_B[str(k)].weight
                b.copy_(scale * torch.randn(b.shape, generator=gen, dtype=torch.float64).to(b.dtype))


# ----------------------------------------------------------------------------------------------------------------
# ResUNet
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(17, 23), (33, 33), (8, 16), (1, 1)])
def test_resunet_output_shape(size):
    torch.manual_seed(0)
    net = _tiny_resunet(2).double()
    x = torch.rand(2, 2, *size, generator=_gen(1), dtype=torch.float64)
    out = net(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    assert torch.isfinite(out).all()


def test_resunet_widths():
    c = 3
    net = ResUNet(2, channels=c, num_blocks=2)
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters()}
    assert shapes["head.weight"] == (c, 2, 3, 3)
    assert shapes["down1.0.conv1.weight"] == (c, c, 3, 3)
    assert shapes["down1.2.weight"] == (2 * c, c, 2, 2)  # two ResBlocks, then the stride-2 conv
    assert shapes["down2.2.weight"] == (4 * c, 2 * c, 2, 2)
    assert shapes["down3.2.weight"] == (8 * c, 4 * c, 2, 2)
    assert shapes["body.1.conv2.weight"] == (8 * c, 8 * c, 3, 3)
    assert shapes["up3.0.weight"] == (8 * c, 4 * c, 2, 2)  # ConvTranspose2d: (Ci, Co, kh, kw)
    assert shapes["up2.0.weight"] == (4 * c, 2 * c, 2, 2)
    assert shapes["up1.0.weight"] == (2 * c, c, 2, 2)
    assert shapes["up1.2.conv1.weight"] == (c, c, 3, 3)
    assert shapes["tail.weight"] == (2, c, 3, 3)
    assert isinstance(net.up3[0], nn.ConvTranspose2d) and net.up3[0].stride == (2, 2)
    assert net.down2[-1].stride == (2, 2)
    assert not any(name.endswith("bias") for name in shapes)
    assert len(find_convolutions(net)) == 1 + 3 * (2 * 2 + 1) + 2 * 2 + 3 * (1 + 2 * 2) + 1


def test_resunet_residual_on_off():
    torch.manual_seed(1)
    res = _tiny_resunet(1, residual=True).double()
    plain = _tiny_resunet(1, residual=False).double()
    plain.load_state_dict(res.state_dict())
    x = torch.rand(1, 1, 17, 23, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close(res(x), x + plain(x), rtol=0, atol=0)
    assert not torch.allclose(plain(x), res(x))
    other = ResUNet(1, out_channels=3, channels=4, num_blocks=0, residual=False)
    assert other(torch.rand(1, 1, 9, 10)).shape == (1, 3, 9, 10)


def test_resunet_bad_input():
    net = _tiny_resunet(1)
    with pytest.raises(ValueError, match=r"x: expected \(N, 1, H, W\)"):
        net(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"x: expected"):
        net(torch.rand(16, 16))
    with pytest.raises(ValueError, match="out_channels"):
        ResUNet(1, out_channels=2, residual=True)
    with pytest.raises(ValueError, match="channels"):
        ResUNet(1, channels=0)


# ----------------------------------------------------------------------------------------------------------------
# ISTA-Net+ phase
# ----------------------------------------------------------------------------------------------------------------
def _phase_by_hand(phase: ISTANetPlusPhase, block: torch.Tensor) -> torch.Tensor:
    """The ISTA-Net+ phase on one (N, 1, 33, 33) block, written with F.conv2d (zero padding 1)."""
    def conv(t, layer):
        return F.conv2d(t, layer.weight, padding=1)

    x_d = conv(block, phase.conv_D)
    x_f = conv(F.relu(conv(x_d, phase.conv1_forward)), phase.conv2_forward)
    x_s = torch.mul(torch.sign(x_f), F.relu(torch.abs(x_f) - phase.soft_thr))
    x_b = conv(F.relu(conv(x_s, phase.conv1_backward)), phase.conv2_backward)
    return block + conv(x_b, phase.conv_G)


def test_ista_phase_is_blockwise():
    torch.manual_seed(2)
    phase = ISTANetPlusPhase(channels=4, soft_thr=0.05).double()
    r = torch.randn(2, 1, 66, 99, generator=_gen(3), dtype=torch.float64)
    out = phase(r)
    assert out.shape == r.shape
    for i in range(2):
        for j in range(3):
            block = r[:, :, 33 * i:33 * (i + 1), 33 * j:33 * (j + 1)]
            sl = (slice(None), slice(None), slice(33 * i, 33 * (i + 1)), slice(33 * j, 33 * (j + 1)))
            torch.testing.assert_close(out[sl], phase(block), **TOL["float64"])
            torch.testing.assert_close(out[sl], _phase_by_hand(phase, block), **TOL["float64"])
    # no information crosses block borders: changing block (0, 0) leaves the other blocks unchanged
    r2 = r.clone()
    r2[:, :, :33, :33] += torch.randn(2, 1, 33, 33, generator=_gen(4), dtype=torch.float64)
    out2 = phase(r2)
    assert not torch.allclose(out2[..., :33, :33], out[..., :33, :33])
    assert torch.equal(out2[..., 33:, :], out[..., 33:, :])
    assert torch.equal(out2[..., :33, 33:], out[..., :33, 33:])
    # whereas one whole-image convolution would see across the border
    whole = F.conv2d(r2, phase.conv_D.weight, padding=1) - F.conv2d(r, phase.conv_D.weight, padding=1)
    assert whole[..., 33, :33].abs().max() > 0


def test_ista_phase_soft_threshold():
    torch.manual_seed(5)
    phase = ISTANetPlusPhase(channels=4).double()
    r = torch.randn(1, 1, 33, 66, generator=_gen(6), dtype=torch.float64)
    assert phase.soft_thr.item() == pytest.approx(0.01)
    with torch.no_grad():
        phase.soft_thr.fill_(1e9)  # every coefficient is shrunk to 0: the phase is the identity (no bias)
    assert torch.equal(phase(r), r)
    with torch.no_grad():
        phase.soft_thr.fill_(0.0)  # no shrinkage: x_s = x_f
    x_f = phase.conv2_forward(F.relu(phase.conv1_forward(phase.conv_D(r[..., :33]))))
    expected = r[..., :33] + phase.conv_G(phase.conv2_backward(F.relu(phase.conv1_backward(x_f))))
    torch.testing.assert_close(phase(r)[..., :33], expected, **TOL["float64"])
    # intermediate threshold: the shrinkage sign(v)·max(|v| − θ, 0), checked on the hand-written phase
    with torch.no_grad():
        phase.soft_thr.fill_(0.3)
    torch.testing.assert_close(phase(r)[..., 33:], _phase_by_hand(phase, r[..., 33:]), **TOL["float64"])
    v = torch.tensor([-1.0, -0.3, -0.1, 0.0, 0.2, 0.5], dtype=torch.float64)
    torch.testing.assert_close(torch.sign(v) * F.relu(v.abs() - 0.3),
                               torch.tensor([-0.7, 0.0, 0.0, 0.0, 0.0, 0.2], dtype=torch.float64), **TOL["float64"])
    # the threshold is a trainable parameter
    phase(r).sum().backward()
    assert phase.soft_thr.grad is not None


@pytest.mark.parametrize("size", [(33, 34), (32, 33), (50, 66)])
def test_ista_phase_rejects_non_multiple_of_33(size):
    phase = ISTANetPlusPhase(channels=2)
    with pytest.raises(ValueError, match=r"not a whole number of 33×33 blocks"):
        phase(torch.rand(1, 1, *size))


def test_ista_phase_rejects_channels():
    with pytest.raises(ValueError, match=r"r: expected \(N, 1, H, W\)"):
        ISTANetPlusPhase(channels=2)(torch.rand(1, 2, 33, 33))


# ----------------------------------------------------------------------------------------------------------------
# DUN strategies
# ----------------------------------------------------------------------------------------------------------------
def _adapter_params(layer: LoRAConv2d, stage: int) -> int:
    return layer.lora_A[str(stage)].weight.numel() + layer.lora_B[str(stage)].weight.numel()


@pytest.mark.parametrize("strategy", ["block", "shared", "lorun"])
def test_strategies_build_and_run(strategy):
    torch.manual_seed(10)
    base = _tiny_resunet(1)
    denoiser_params = _n_params(base)
    model = DUN(_cs_operator(), base, K, strategy)
    y = _cs_measurement()
    out = model(y, (33, 66))
    assert out.shape == (2, 1, 33, 66) and torch.isfinite(out).all()
    assert model(y).shape == (2, 1, 33, 66)  # default size: whole blocks
    assert model.rho.shape == (K,) and torch.equal(model.rho.detach(), torch.ones(K))  # default_step of Φ
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(counts["per_stage"]) == K
    if strategy == "block":
        assert len(model.denoisers) == K
        assert counts["per_stage"] == [denoiser_params + 1] * K
        assert counts["shared"] == 0
        assert counts["total"] == K * denoiser_params + K == counts["trainable"]
    elif strategy == "shared":
        assert len(model.denoisers) == 1
        assert counts["per_stage"] == [1] * K
        assert counts["shared"] == denoiser_params
        assert counts["total"] == denoiser_params + K == counts["trainable"]
    else:
        layers = [model.denoisers[0].get_submodule(n) for n in model.lora_names]
        assert len(layers) == len(find_convolutions(_tiny_resunet(1))) == 22
        adapters = [sum(_adapter_params(layer, k) for layer in layers) for k in range(K)]
        assert adapters[0] > 0 and len(set(adapters)) == 1
        assert counts["per_stage"] == [a + 1 for a in adapters]
        assert counts["shared"] == denoiser_params
        assert counts["total"] == denoiser_params + sum(adapters) + K
        assert counts["trainable"] == sum(adapters) + K
    assert counts["total"] == counts["shared"] + sum(counts["per_stage"])


def test_block_denoisers_are_independent():
    torch.manual_seed(11)
    base = _tiny_resunet(1)
    model = DUN(_cs_operator(), base, K, "block")
    assert model.denoisers[0] is base
    for i in range(K):
        assert model.denoiser(i) is model.denoisers[i]
        for j in range(i + 1, K):
            assert model.denoisers[i] is not model.denoisers[j]
            for (name, p), q in zip(model.denoisers[i].named_parameters(), model.denoisers[j].parameters()):
                assert p.data_ptr() != q.data_ptr()
                assert not torch.equal(p, q), name
    # stage outputs differ because the denoisers differ, and training one does not touch another
    z = torch.rand(1, 1, 33, 66, generator=_gen(12))
    outs = [model.denoiser(k)(z) for k in range(K)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    with torch.no_grad():
        model.denoisers[1].head.weight.add_(1.0)
    assert torch.equal(model.denoiser(0)(z), outs[0]) and torch.equal(model.denoiser(2)(z), outs[2])
    # a list of K denoisers is used as given
    nets = [_tiny_resunet(1) for _ in range(K)]
    listed = DUN(_cs_operator(), nets, K, "block")
    assert all(listed.denoisers[k] is nets[k] for k in range(K))


def test_block_ista_net_plus_runs():
    torch.manual_seed(12)
    model = DUN(_cs_operator(), ISTANetPlusPhase(channels=4), K, "block")
    out = model(_cs_measurement(), (33, 66))
    assert out.shape == (2, 1, 33, 66) and torch.isfinite(out).all()
    assert not torch.equal(model.denoisers[0].conv_D.weight, model.denoisers[1].conv_D.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lorun_from_shared_is_exact_with_zero_b(dtype):
    torch.manual_seed(13)
    shared = DUN(_cs_operator(), _tiny_resunet(1), K, "shared").to(dtype)
    with torch.no_grad():  # trained-looking step sizes that float32 cannot represent exactly
        shared.rho.copy_(torch.tensor([0.8123456789012345, 1.1, 0.9377777777777777], dtype=torch.float64))
    y = _cs_measurement(dtype)
    expected = shared(y, (33, 66))
    model = DUN.lorun_from(shared)
    assert model.strategy == "lorun" and model.num_stages == K
    assert model.rho.dtype == dtype and torch.equal(model.rho, shared.rho)
    assert model.denoisers[0] is not shared.denoisers[0]
    for layer in lora_layers(model):
        assert layer.base_layer.weight.dtype == dtype
        for k in range(K):
            assert torch.count_nonzero(layer.lora_B[str(k)].weight) == 0
    out = model(y, (33, 66))
    assert out.dtype == dtype
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(model(y, (33, 66), return_all=True),
                                                  shared(y, (33, 66), return_all=True)))
    # the shared model is untouched, and randomising some B moves the LoRun output away from it
    _randomise_lora_b(model, _gen(14), stages=[1], names=model.lora_names[:3])
    out2 = model(y, (33, 66))
    assert not torch.allclose(out2, expected)
    assert torch.equal(shared(y, (33, 66)), expected)


def test_lorun_from_rejects_other_strategies():
    torch.manual_seed(15)
    with pytest.raises(ValueError, match="shared"):
        DUN.lorun_from(DUN(_cs_operator(), _tiny_resunet(1), K, "block"))


def _merged_copy(model: DUN, stage: int) -> nn.Module:
    """A plain copy of the LoRun denoiser with every adapted conv replaced by its stage-``stage`` merged conv."""
    net = copy.deepcopy(model.denoisers[0])
    for name in model.lora_names:
        layer = net.get_submodule(name)
        conv = copy.deepcopy(layer.base_layer)
        with torch.no_grad():
            conv.weight.copy_(layer.merged_weight(stage))
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, conv)
    assert not lora_layers(net)
    return net


def test_lorun_stages_use_their_own_adapters():
    torch.manual_seed(16)
    model = DUN(_cs_operator(), _tiny_resunet(1), K, "lorun").double()
    with torch.no_grad():
        model.rho.copy_(torch.tensor([0.9, 1.2, 0.7], dtype=torch.float64))
    _randomise_lora_b(model, _gen(17))
    y = _cs_measurement(torch.float64)
    outs = model(y, (33, 66), return_all=True)
    assert len(outs) == K
    x = model.operator.init(y, (33, 66))
    for k in range(K):
        z = x - model.rho[k] * model.operator.A_adjoint(model.operator.A(x) - y, (33, 66))
        x = _merged_copy(model, k)(z)
        torch.testing.assert_close(outs[k], x, **TOL["float64"])
    # stage denoisers differ from each other once B ≠ 0
    z = torch.rand(1, 1, 33, 66, generator=_gen(18), dtype=torch.float64)
    d = [model.denoiser(k)(z) for k in range(K)]
    assert not torch.allclose(d[0], d[1]) and not torch.allclose(d[1], d[2])


def test_lorun_freeze_base():
    torch.manual_seed(19)
    model = DUN(_cs_operator(), _tiny_resunet(1), K, "lorun")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "rho" in trainable
    assert all(n == "rho" or ".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(".lora_" in n for n in trainable) == 2 * K * len(model.lora_names)
    unfrozen = DUN(_cs_operator(), _tiny_resunet(1), K, "lorun", freeze_base=False)
    assert all(p.requires_grad for p in unfrozen.parameters())
    unfrozen.freeze_base()
    assert {n for n, p in unfrozen.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_lorun_targets():
    torch.manual_seed(20)
    with pytest.warns(RankClampWarning, match=r"tail \(4→1 3×3: rank 1\)"):
        model = DUN(_cs_operator(), _tiny_resunet(1), K, "lorun", targets=("head", "tail"), rank=2)
    assert model.lora_names == ["head", "tail"]
    net = model.denoisers[0]
    assert isinstance(net.head, LoRAConv2d) and isinstance(net.tail, LoRAConv2d)
    assert len(lora_layers(model)) == 2
    assert not isinstance(net.down1[1], LoRAConv2d) and isinstance(net.down1[1], nn.Conv2d)
    assert isinstance(net.up1[0], nn.ConvTranspose2d)
    counts = model.parameter_counts()
    # head 1→4 at rank 2; tail 4→1 clamped to rank 1 (its update cannot have more)
    assert counts["per_stage"] == [1 + 2 * (1 * 9) + 4 * 2 + 1 * (4 * 9) + 1 * 1] * K
    # a glob over the down-sampling convolutions only, and the transposed ones
    m2 = DUN(_cs_operator(), _tiny_resunet(1), K, "lorun", targets="down*.1", rank=1)
    assert m2.lora_names == ["down1.1", "down2.1", "down3.1"]
    m3 = DUN(_cs_operator(), _tiny_resunet(1), K, "lorun", targets=("up?.0",), rank=1)
    assert m3.lora_names == ["up3.0", "up2.0", "up1.0"]
    assert all(layer.transposed for layer in lora_layers(m3))
    out = m3(_cs_measurement(), (33, 66))
    assert out.shape == (2, 1, 33, 66)
    with pytest.raises(ValueError, match="targets"):
        DUN(_cs_operator(), _tiny_resunet(1), K, "lorun", targets=("nothing_matches*",))
    # lorun_from keeps the shared model's (default) targets unless given others
    shared = DUN(_cs_operator(), _tiny_resunet(1), K, "shared")
    assert DUN.lorun_from(shared, targets=("tail",)).lora_names == ["tail"]


def test_lorun_rank_rule_and_explicit_rank():
    torch.manual_seed(21)
    model = DUN(_cs_operator(), _tiny_resunet(1), K, "lorun", gamma=50)
    for name in model.lora_names:
        layer = model.denoisers[0].get_submodule(name)
        assert layer.rank == -(-min(layer.in_channels, layer.out_channels) // 2)
    with pytest.warns(RankClampWarning, match="tail"):
        model = DUN(_cs_operator(), _tiny_resunet(1), K, "lorun", rank=3, alpha=6)
    ranks = {name: layer.rank for name, layer in zip(model.lora_names, lora_layers(model))}
    assert ranks.pop("tail") == 1 and set(ranks.values()) == {3}
    assert {layer.scaling for layer in lora_layers(model)} == {2.0, 6.0}


def test_return_all():
    torch.manual_seed(22)
    model = DUN(_cs_operator(), _tiny_resunet(1), K, "shared")
    y = _cs_measurement()
    outs = model(y, (33, 66), return_all=True)
    assert isinstance(outs, list) and len(outs) == K
    assert all(o.shape == (2, 1, 33, 66) for o in outs)
    assert torch.equal(outs[-1], model(y, (33, 66)))
    assert not torch.allclose(outs[0], outs[1])


def test_gradients_reach_rho_and_adapters():
    torch.manual_seed(23)
    model = DUN(_cs_operator(), _tiny_resunet(1), K, "lorun")
    y = _cs_measurement()
    target = torch.rand(2, 1, 33, 66, generator=_gen(24))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    loss = F.mse_loss(model(y, (33, 66)), target)
    loss.backward()
    assert model.rho.grad is not None and torch.count_nonzero(model.rho.grad) == K
    for layer in lora_layers(model):
        assert layer.base_layer.weight.grad is None
        for k in range(K):
            assert layer.lora_B[str(k)].weight.grad is not None
            assert layer.lora_B[str(k)].weight.grad.abs().sum() > 0
            # with B = 0 the gradient of A is exactly zero
            assert torch.count_nonzero(layer.lora_A[str(k)].weight.grad) == 0
    optimizer.step()
    optimizer.zero_grad()
    loss2 = F.mse_loss(model(y, (33, 66)), target)
    loss2.backward()
    for layer in lora_layers(model):
        for k in range(K):
            assert layer.lora_B[str(k)].weight.abs().sum() > 0
            assert layer.lora_A[str(k)].weight.grad.abs().sum() > 0
    assert model.rho.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Other operators
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["shared", "lorun"])
def test_cassi_dun_float64(strategy):
    torch.manual_seed(25)
    bands = 28
    mask = torch.rand(16, 24, generator=_gen(26), dtype=torch.float64)
    op = CASSI(mask, bands, 2)
    model = DUN(op, _tiny_resunet(bands), 2, strategy).double()
    assert model.rho.dtype == torch.float64
    assert model.rho[0].item() == pytest.approx(op.default_step())
    x = torch.rand(2, bands, 16, 24, generator=_gen(27), dtype=torch.float64)
    y = op.A(x)
    assert y.shape == (2, 16, 24 + 2 * 27)
    out = model(y)
    assert out.shape == x.shape and out.dtype == torch.float64 and torch.isfinite(out).all()


@pytest.mark.parametrize("strategy", ["block", "lorun"])
def test_sr_dun(strategy):
    torch.manual_seed(28)
    op = SuperResolution(gaussian_kernel(5, 1.0), 2)
    model = DUN(op, _tiny_resunet(1), 2, strategy)
    x = torch.rand(2, 1, 24, 32, generator=_gen(29))
    y = op.A(x)
    assert y.shape == (2, 1, 12, 16)
    out = model(y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert model(y, (24, 32), return_all=True)[-1].shape == x.shape


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["Block", "lora", "", None])
def test_unknown_strategy(strategy):
    with pytest.raises(ValueError, match="strategy"):
        DUN(_cs_operator(), _tiny_resunet(1), K, strategy)


@pytest.mark.parametrize("num_stages", [0, -1, 2.0, True])
def test_bad_num_stages(num_stages):
    with pytest.raises(ValueError, match="num_stages"):
        DUN(_cs_operator(), _tiny_resunet(1), num_stages, "shared")


@pytest.mark.parametrize("strategy", ["shared", "lorun"])
def test_denoiser_list_needs_block(strategy):
    with pytest.raises(ValueError, match="denoiser"):
        DUN(_cs_operator(), [_tiny_resunet(1) for _ in range(K)], K, strategy)
    with pytest.raises(ValueError, match="denoiser"):
        DUN(_cs_operator(), [_tiny_resunet(1) for _ in range(K - 1)], K, "block")


@pytest.mark.parametrize("strategy", ["block", "shared", "lorun"])
def test_denoiser_stage_out_of_range(strategy):
    model = DUN(_cs_operator(), _tiny_resunet(1), K, strategy)
    for stage in (-1, K):
        with pytest.raises(IndexError, match="stage"):
            model.denoiser(stage)
    with pytest.raises(TypeError, match="stage"):
        model.denoiser(1.0)
    assert model.denoiser(K - 1) is model.denoisers[-1]


@pytest.mark.parametrize("strategy", ["block", "lorun"])
def test_stage_checkpointing_gives_the_same_gradients(strategy):
    operator = BlockCS.gaussian(0.25, seed=3)
    model = DUN(operator, ResUNet(1, channels=4, num_blocks=1), 3, strategy).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    y = operator.A(torch.rand(1, 1, 33, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    grads = []
    for flag in (False, True):
        model.zero_grad(set_to_none=True)
        model.checkpoint_stages = flag
        model(y, (33, 40)).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-12, atol=1e-14)
