"""Adaptive rank: per-stage ranks in every layer implementation, and ``compress`` (truncated SVD per adapter)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorun_fast import FusedLoRunConv
from lorun_fast.checkpoints import load_lorun, read_header, save_adapters, save_base
from lorun_fast.cli import main
from lorun_fast.compress import choose_ranks, compress_file, lora_parameters, spectra
from lorun_fast.models import ModelConfig, build_dun, lorun_from, to_fast, to_reference
from lorun_fast.reference import BlockCS, LoRAConv2d, lora_layers
from lorun_fast.testing import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("single_thread")

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randomise(layer_or_model, generator, scale=0.3):
    with torch.no_grad():
        for name, p in layer_or_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)


# ----------------------------------------------------------------------------------------------------------------
# Per-stage ranks
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transposed", [False, True])
def test_reference_layer_takes_one_rank_per_stage(transposed):
    generator = torch.Generator().manual_seed(0)
    base = (nn.ConvTranspose2d(6, 5, 2, stride=2) if transposed else nn.Conv2d(6, 5, 3, padding=1)).double()
    layer = LoRAConv2d(base, 3, rank=[1, 4, 2])
    _randomise(layer, generator)
    assert layer.ranks == (1, 4, 2) and layer.rank == 4 and layer.scaling == 1.0
    assert "ranks=[1, 4, 2]" in repr(layer)
    rank_axis = 1 if transposed else 0
    assert [layer.lora_A[str(k)].weight.shape[rank_axis] for k in range(3)] == [1, 4, 2]
    assert [layer.lora_B[str(k)].weight.shape[1] for k in range(3)] == [1, 4, 2]
    x = torch.randn(2, 6, 5, 7, generator=generator, dtype=torch.float64)
    conv = F.conv_transpose2d if transposed else F.conv2d
    extra = {"stride": 2} if transposed else {"padding": 1}
    for k in range(3):
        want = conv(x, layer.merged_weight(k), base.bias, **extra)
        torch.testing.assert_close(layer(x, k), want, rtol=1e-12, atol=1e-12)


def test_per_stage_ranks_are_checked():
    conv = nn.Conv2d(2, 8, 1)
    with pytest.raises(ValueError, match=r"rank: expected one rank per stage \(3\), got 2: \[1, 2\]"):
        LoRAConv2d(conv, 3, rank=[1, 2])
    with pytest.raises(ValueError, match="rank: 3 is above 2"):
        LoRAConv2d(conv, 2, rank=[1, 3])
    with pytest.raises(ValueError, match="rank: expected a positive int, got 0"):
        LoRAConv2d(conv, 2, rank=[0, 1])
    with pytest.raises(ValueError, match=r"ranks\['head'\]: expected 2 positive ints"):
        ModelConfig(num_stages=2, ranks={"head": [1]})
    with pytest.raises(ValueError, match="ranks: only the 'lorun' strategy"):
        ModelConfig(strategy="shared", num_stages=2, ranks={"head": [1, 1]})
    operator = BlockCS.gaussian(0.25, seed=0)
    with pytest.raises(ValueError, match=r"ranks: \['nope'\] are not adapted layers"):
        build_dun(operator, ModelConfig(num_stages=2, backbone_kwargs={"channels": 2, "num_blocks": 1},
                                        ranks={"nope": [1, 1]}))


@pytest.mark.parametrize("backend", ["merged", "reference", "triton"])
def test_fused_layer_with_per_stage_ranks_matches_reference(backend):
    generator = torch.Generator().manual_seed(1)
    reference = LoRAConv2d(nn.Conv2d(5, 7, 3, padding=1, bias=True).double(), 3, rank=[2, 5, 1])
    _randomise(reference, generator)
    fast = FusedLoRunConv.from_lora(reference, backend=backend, input_precision="ieee")
    assert fast.ranks == (2, 5, 1)
    assert to_reference_layer_equal(fast, reference)
    device, dtype = (TRITON_DEVICE, torch.float32) if backend == "triton" else ("cpu", torch.float64)
    fast = fast.to(device, dtype)
    x = torch.randn(2, 5, 9, 6, generator=generator, dtype=torch.float64)
    for k in range(3):
        xk = x.to(device, dtype).clone().requires_grad_()
        y = fast(xk, k, relu=True)
        want_x = x.detach().clone().requires_grad_()
        want = F.relu(reference(want_x, k))
        mode = "ieee" if backend == "triton" else torch.float64
        assert_close_to_reference(f"y stage {k}", y.detach().cpu(), want.detach(), mode)
        y.sum().backward()
        want.sum().backward()
        assert_close_to_reference(f"dx stage {k}", xk.grad.cpu(), want_x.grad, mode)
        a_grad = fast.lora_A[str(k)].weight.grad
        assert a_grad is not None and a_grad.shape[0] == (2, 5, 1)[k]
        assert_close_to_reference(f"dA stage {k}", a_grad.cpu(), reference.lora_A[str(k)].weight.grad, mode)
        with torch.no_grad():
            assert_close_to_reference(f"y stage {k}, inference", fast(x.to(device, dtype), k, relu=True).cpu(),
                                      want.detach(), mode)


def to_reference_layer_equal(fast, reference) -> bool:
    back = fast.to_reference()
    return back.ranks == reference.ranks and all(torch.equal(back.state_dict()[k], v)
                                                 for k, v in reference.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# compress
# ----------------------------------------------------------------------------------------------------------------
TINY = {"channels": 4, "num_blocks": 1}


@pytest.fixture
def adapter_files(tmp_path):
    """A trained-looking lorun DUN (random adapters, γ = 50: ranks up to 16) saved as base + adapter set."""
    operator = BlockCS.gaussian(0.25, seed=0)
    shared = build_dun(operator, ModelConfig(strategy="shared", num_stages=3, backbone_kwargs=TINY))
    torch.manual_seed(3)
    model = lorun_from(shared, gamma=50, alpha=8.0)
    _randomise(model, torch.Generator().manual_seed(4), scale=0.2)
    save_base(model, tmp_path / "base.safetensors")
    save_adapters(model, tmp_path / "adapters.safetensors", name="cs25")
    return operator, model, tmp_path


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _outputs(model, operator):
    y = operator.A(torch.rand(2, 1, 33, 66, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        return model(y, (33, 66))


def test_compress_at_full_energy_keeps_the_model(adapter_files):
    operator, model, folder = adapter_files
    summary = compress_file(folder / "adapters.safetensors", folder / "full.safetensors", energy=1.0)
    assert summary["lora_parameters_after"] <= summary["lora_parameters_before"]
    loaded = load_lorun(folder / "base.safetensors", folder / "full.safetensors", operator)
    assert loaded.config.ranks == summary["ranks"] and loaded.config.alpha is None
    for name, layer in zip(loaded.lora_names, lora_layers(loaded)):
        assert list(layer.ranks) == summary["ranks"][name]
        assert layer.scaling == 1.0
    assert _rel(_outputs(loaded, operator), _outputs(model, operator)) < 1e-5  # float32 factors, refactored
    # the fast siblings keep the ranks
    fast = to_fast(loaded, backend="merged")
    assert [m.ranks for m in lora_layers(fast)] == [m.ranks for m in lora_layers(loaded)]
    assert [m.ranks for m in lora_layers(to_reference(fast))] == [m.ranks for m in lora_layers(loaded)]
    assert _rel(_outputs(fast, operator), _outputs(loaded, operator)) < 1e-5


def test_energy_rank_is_the_smallest_that_keeps_it(adapter_files):
    _, model, folder = adapter_files
    metadata, tensors = read_header(folder / "adapters.safetensors")
    items = spectra(tensors, model.config)
    assert len(items) == len(model.lora_names) * 3
    for energy in (0.5, 0.9, 0.99):
        ranks = choose_ranks(items, energy=energy)
        for s in items:
            r = ranks[(s.layer, s.stage)]
            assert s.energy_kept(r) >= energy - 1e-12
            assert r == 1 or s.energy_kept(r - 1) < energy


def test_compressed_update_is_the_truncated_svd(adapter_files):
    """Eckart–Young: the compressed ΔW' of every adapter is its best rank-r' approximation, whose error is the
    dropped singular values; checked against the reference layer's own delta_weight."""
    operator, model, folder = adapter_files
    summary = compress_file(folder / "adapters.safetensors", folder / "e90.safetensors", energy=0.9)
    loaded = load_lorun(folder / "base.safetensors", folder / "e90.safetensors", operator)
    total = 0.0
    with torch.no_grad():
        for source, small in zip(lora_layers(model), lora_layers(loaded)):
            for k in range(3):
                delta = source.delta_weight(k).double()
                matrix = delta.transpose(0, 1) if source.transposed else delta
                sigma = torch.linalg.svdvals(matrix.reshape(matrix.shape[0], -1))
                r = small.ranks[k]
                error = float((small.delta_weight(k).double() - delta).square().sum())
                assert math.isclose(error, float(sigma[r:].square().sum()), rel_tol=1e-4, abs_tol=1e-9)
                total += error
    assert math.isclose(math.sqrt(total), summary["frobenius_error"], rel_tol=1e-4, abs_tol=1e-7)


def test_budget_is_spent_greedily_and_never_exceeded(adapter_files):
    _, model, folder = adapter_files
    _, tensors = read_header(folder / "adapters.safetensors")
    items = spectra(tensors, model.config)
    floor = lora_parameters(items, {(s.layer, s.stage): 1 for s in items})
    full = lora_parameters(items, {(s.layer, s.stage): len(s.sigma) for s in items})
    for budget in (floor, floor + 1, (floor + full) // 3, full, full * 2):
        ranks = choose_ranks(items, budget=budget)
        spent = lora_parameters(items, ranks)
        assert spent <= budget
        # nothing left out would still fit
        for s in items:
            r = ranks[(s.layer, s.stage)]
            assert r == len(s.sigma) or spent + s.cost_per_rank > budget
    # more budget never keeps less energy
    a = choose_ranks(items, budget=(floor + full) // 3)
    b = choose_ranks(items, budget=(floor + full) // 2)
    kept = [sum(float(s.sigma[:r[(s.layer, s.stage)]].square().sum()) for s in items) for r in (a, b)]
    assert kept[1] >= kept[0]
    with pytest.raises(ValueError, match=f"budget: {floor - 1:,} parameters is below the {floor:,}"):
        choose_ranks(items, budget=floor - 1)


def _quarter_budget(folder, model) -> int:
    """A budget a quarter of the way from rank 1 everywhere to the source's ranks."""
    _, tensors = read_header(folder / "adapters.safetensors")
    items = spectra(tensors, model.config)
    floor = lora_parameters(items, {(s.layer, s.stage): 1 for s in items})
    full = lora_parameters(items, {(s.layer, s.stage): len(s.sigma) for s in items})
    return floor + (full - floor) // 4


def test_compressed_adapters_run_on_the_fused_kernel(adapter_files):
    operator, model, folder = adapter_files
    compress_file(folder / "adapters.safetensors", folder / "b.safetensors", budget=_quarter_budget(folder, model))
    loaded = load_lorun(folder / "base.safetensors", folder / "b.safetensors", operator)
    assert any(len(set(layer.ranks)) > 1 for layer in lora_layers(loaded)), "expected differing per-stage ranks"
    fast = to_fast(loaded, backend="triton", input_precision="ieee").to(TRITON_DEVICE, torch.float32)
    y = operator.A(torch.rand(1, 1, 33, 33, generator=torch.Generator().manual_seed(6)))
    with torch.no_grad():
        want = loaded.double()(y.double(), (33, 33))
        got = fast(y.to(TRITON_DEVICE), (33, 33))
    assert_close_to_reference("DUN output", got.cpu(), want, "ieee")


def test_compress_cli(adapter_files, capsys):
    operator, model, folder = adapter_files
    out = folder / "c.safetensors"
    assert main(["compress", "--adapters", str(folder / "adapters.safetensors"), "--out", str(out),
                 "--energy", "0.95", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["min_energy_kept"] >= 0.95 and out.is_file()
    metadata, _ = read_header(out)
    source, _ = read_header(folder / "adapters.safetensors")
    assert metadata["lorun_fast.base_sha256"] == source["lorun_fast.base_sha256"]
    assert metadata["lorun_fast.adapter_name"] == "cs25"
    before = out.read_bytes()
    assert main(["compress", "--adapters", str(folder / "adapters.safetensors"), "--out", str(out),
                 "--energy", "0.5"]) == 2
    assert "already exists; compress never overwrites" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["compress", "--adapters", str(folder / "base.safetensors"), "--out", str(folder / "d.safetensors"),
                 "--energy", "0.5"]) == 2
    assert "is a 'base' file, not an adapter set" in capsys.readouterr().err
    assert main(["compress", "--adapters", str(folder / "missing.safetensors"), "--out",
                 str(folder / "d.safetensors"), "--budget", "10"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["compress", "--adapters", str(folder / "adapters.safetensors"), "--out",
                 str(folder / "d.safetensors"), "--budget", "10"]) == 2
    assert "budget: 10 parameters is below" in capsys.readouterr().err
    assert not (folder / "d.safetensors").exists()
    with pytest.raises(SystemExit):
        main(["compress", "--adapters", str(folder / "adapters.safetensors"), "--out", str(folder / "e.safetensors"),
              "--energy", "1.5"])
    with pytest.raises(SystemExit):
        main(["compress", "--adapters", str(folder / "adapters.safetensors"), "--out", str(folder / "e.safetensors"),
              "--energy", "0.5", "--budget", "100"])
    assert main(["compress", "--adapters", str(folder / "adapters.safetensors"), "--out",
                 str(folder / "e.safetensors"), "--budget", str(_quarter_budget(folder, model))]) == 0
    text = capsys.readouterr().out
    assert "LoRA parameters" in text and "ranks per stage" in text
