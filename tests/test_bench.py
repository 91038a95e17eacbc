"""CPU tests of the benchmark helpers (bench/harness.py) and the single-layer benchmark (bench/lora_conv.py).

Speed is never asserted here (docs/design.md, §7.3): only that the measurements are well-formed, that every provider runs,
that the numerics gate works and that the scripts still run.
"""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # bench/ is not a package: its scripts `import harness`

import lora_conv  # noqa: E402
import harness  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------------------------------------------------

def test_quantiles_interpolate_like_numpy():
    assert harness.quantiles([4.0, 1.0, 3.0, 2.0, 5.0], (0.5, 0.2, 0.8)) == pytest.approx([3.0, 1.8, 4.2])
    assert harness.quantiles([7.0], (0.5, 0.2, 0.8)) == [7.0, 7.0, 7.0]
    with pytest.raises(ValueError):
        harness.quantiles([], (0.5,))


def test_time_fn_cpu_returns_ordered_percentiles():
    x = torch.randn(64, 64)
    out = harness.time_fn(lambda: x @ x, CPU, warmup_ms=1, rep_ms=5, min_reps=7)
    assert set(out) == {"p50_ms", "p20_ms", "p80_ms", "n"}
    assert out["n"] >= 7
    assert 0 < out["p20_ms"] <= out["p50_ms"] <= out["p80_ms"]
    assert all(math.isfinite(out[k]) for k in ("p20_ms", "p50_ms", "p80_ms"))


def test_interleaved_runs_every_provider_alternately():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    out = harness.interleaved(fns, rounds=3, device=CPU, warmup_ms=0, rep_ms=0, min_reps=2)
    assert set(out) == {"a", "b", "c"}
    for name, res in out.items():
        assert len(res["rounds_p50_ms"]) == 3
        assert res["n"] == 3 * 2
        assert res["p20_ms"] <= res["p50_ms"] <= res["p80_ms"]
        assert res["round_spread"] >= 0
    # Round-robin: every provider ran in every round, so no provider's calls form one block.
    for name in fns:
        idx = [i for i, c in enumerate(calls) if c == name]
        assert idx[-1] - idx[0] > len(idx), f"{name} was not interleaved: {calls}"
    with pytest.raises(ValueError):
        harness.interleaved(fns, rounds=0, device=CPU)


def test_saved_activation_bytes_counts_each_storage_once():
    x = torch.randn(1000, requires_grad=True)

    def f():
        y = x * x          # saves x twice (both operands): one storage
        return (y.sin()).sum()  # saves y
    assert harness.saved_activation_bytes(f) == 2 * 1000 * 4
    with torch.no_grad():
        assert harness.saved_activation_bytes(f) == 0


def test_peak_memory_cpu_is_saved_bytes_or_none():
    x = torch.randn(256, requires_grad=True)
    mem = harness.peak_memory(lambda: (x.exp() * 2).sum().backward(), CPU)
    assert mem["measure"] == "cpu-saved-for-backward"
    assert mem["bytes"] == 256 * 4  # exp saves its output
    assert mem["device_used_bytes"] is None

    def no_grad():
        with torch.no_grad():
            x.exp()
    assert harness.peak_memory(no_grad, CPU)["bytes"] is None


def test_datasheet_lookup_by_gpu_name():
    h100 = harness.gpu_spec("NVIDIA H100 80GB HBM3")
    assert (h100["hbm_Bps"], h100["tf32"], h100["bf16"], h100["fp32"]) == (3.35e12, 494e12, 989e12, 67e12)
    assert harness.gpu_spec("NVIDIA H100 PCIe")["hbm_Bps"] == 2.0e12
    h200 = harness.gpu_spec("NVIDIA H200")
    assert (h200["hbm_Bps"], h200["tf32"], h200["bf16"], h200["fp16"]) == (4.8e12, 494e12, 989e12, 989e12)
    assert harness.gpu_spec("NVIDIA A100-SXM4-80GB")["hbm_Bps"] == pytest.approx(2.04e12, rel=1e-2)
    assert harness.gpu_spec("NVIDIA A100-SXM4-40GB")["hbm_Bps"] == 1.555e12
    for unknown in ("NVIDIA GH200 480GB", "NVIDIA H100 NVL", "Tesla T4", "", None):
        assert harness.gpu_spec(unknown) is None
    assert harness.peak_flops(CPU, torch.bfloat16) is None
    assert harness.hbm_bandwidth(CPU) is None
    assert harness.precision_key(torch.float32) == "tf32"
    assert harness.precision_key(torch.float32, tf32=False) == "fp32"
    assert harness.precision_key("bfloat16") == "bf16"


def test_cuda_timing_path_with_a_stand_in_do_bench(monkeypatch):
    """The CUDA branch of time_fn without a GPU: do_bench's 'all' mode, and the quantiles fallback of older triton."""
    import triton.testing

    seen = []

    def all_mode(fn, warmup, rep, return_mode="mean", quantiles=None):
        fn()
        seen.append((warmup, rep, return_mode, quantiles))
        return [3.0, 1.0, 2.0, 5.0, 4.0]
    monkeypatch.setattr(triton.testing, "do_bench", all_mode)
    out = harness.time_fn(lambda: None, torch.device("cuda", 0), warmup_ms=7, rep_ms=11)
    assert out == {"p50_ms": 3.0, "p20_ms": pytest.approx(1.8), "p80_ms": pytest.approx(4.2), "n": 5}
    assert seen == [(7, 11, "all", None)]

    def no_all_mode(fn, warmup, rep, return_mode="mean", quantiles=None):
        assert return_mode in ("min", "max", "mean", "median")
        return [2.0, 1.0, 3.0] if quantiles == [0.5, 0.2, 0.8] else 2.0
    monkeypatch.setattr(triton.testing, "do_bench", no_all_mode)
    out = harness.time_fn(lambda: None, torch.device("cuda", 0))
    assert out == {"p50_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0, "n": None}
    both = harness.interleaved({"a": lambda: None, "b": lambda: None}, rounds=2, device=torch.device("cuda", 0))
    assert both["a"]["n"] is None and both["b"]["p50_ms"] == 2.0


def test_peak_flops_by_gpu_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    assert harness.peak_flops(gpu, torch.float32) == 494e12
    assert harness.peak_flops(gpu, torch.float32, tf32=False) == 67e12
    assert harness.peak_flops(gpu, torch.bfloat16) == 989e12
    assert harness.peak_flops(gpu, "fp16") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert harness.peak_flops(gpu, torch.bfloat16) is None


def test_tf32_mode_sets_and_restores():
    before = harness.tf32_settings()
    with harness.tf32_mode(True):
        inside = harness.tf32_settings()
        assert inside["tf32_cudnn"] is True and inside["tf32_matmul"] is True
    with harness.tf32_mode(False):
        assert harness.tf32_settings()["tf32_cudnn"] is False
    after = harness.tf32_settings()
    # the legacy flags come back; torch's per-backend strings may read 'ieee' where they read 'none' (same meaning)
    for key in ("tf32_matmul", "tf32_cudnn", "float32_matmul_precision"):
        assert after[key] == before[key]


def test_machine_info_cpu():
    info = harness.machine_info(CPU)
    for key in ("date", "git_commit", "python", "torch", "triton", "device", "cpu", "threads"):
        assert key in info
    assert info["device"] == "cpu" and info["git_commit"]
    json.dumps(info)  # JSON-able


# --------------------------------------------------------------------------------------------------------------------
# lora_conv
# --------------------------------------------------------------------------------------------------------------------

def test_byte_and_flop_counts_match_the_notes():
    # C=32, 256², batch 16, rank 4 (the NOTES.md shape): activations 16·256²·32 = 33,554,432 elements.
    act = 16 * 256 * 256 * 32
    w, a, b = 32 * 32 * 9, 4 * 32 * 9, 32 * 4
    assert lora_conv.minimal_bytes("fused-triton", "forward", 16, 32, 32, 256, 256, 4, 4) == 4 * (2 * act + w + a + b)
    assert lora_conv.minimal_bytes("fused-triton", "forward+backward", 16, 32, 32, 256, 256, 4, 2) \
        == 2 * (5 * act + 2 * w + 3 * a + 3 * b)
    assert lora_conv.minimal_bytes("conv", "forward+backward", 16, 32, 32, 256, 256, 4, 4) == 4 * (5 * act + 3 * w)
    conv = 2 * 16 * 256 * 256 * 32 * 32 * 9
    assert conv == 19_327_352_832
    assert lora_conv.flop_count("conv", "forward+backward", 16, 32, 32, 256, 256, 4) == 3 * conv
    assert lora_conv.flop_count("merged-cudnn", "forward", 16, 32, 32, 256, 256, 4) == conv + 2 * w * 4
    fa, fb = 2 * 16 * 256 * 256 * 4 * 32 * 9, 2 * 16 * 256 * 256 * 32 * 4
    assert lora_conv.flop_count("peft-unfused", "forward+backward", 16, 32, 32, 256, 256, 4) \
        == 2 * conv + 3 * (fa + fb)


def _quick_rows(**kw):
    return lora_conv.run(CPU, quick=True, rounds=2, warmup_ms=0, rep_ms=2, **kw)


def test_lora_conv_cpu_quick_rows():
    rows = _quick_rows()
    assert len(rows) == len(lora_conv.PROVIDERS) * len(lora_conv.PASSES)
    assert {(r["provider"], r["pass"]) for r in rows} == {(p, q) for p in lora_conv.PROVIDERS
                                                          for q in lora_conv.PASSES}
    for r in rows:
        assert r["layout"] == "channels_last" and r["device"] == "cpu"
        assert r["rank"] == 2 and r["bytes_min"] > 0 and r["flops"] > 0
        if r["provider"] in lora_conv.CUDA_ONLY:
            assert r["status"] == "skipped: needs CUDA"
            assert r["p50_ms"] is None and r["rel_err"] is None
            continue
        assert r["status"] == "ok", r
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and math.isfinite(r["p80_ms"])
        assert r["rel_err"] is not None and r["rel_err"] < 1e-5  # fp32 IEEE vs float64
        assert set(r["rel_errs"]) == ({"y"} if r["pass"] == "forward" else
                                      {"y", "dx", "dW"} if r["provider"] == "conv" else {"y", "dx", "dA", "dB"})
        assert r["gbps"] > 0 and r["tflops"] > 0
        assert r["frac_hbm_measured"] is None and r["floor_ms"] is None  # no ceilings on a CPU
        if r["pass"] == "forward+backward":
            assert r["peak_mem_measure"] == "cpu-saved-for-backward" and r["peak_mem_bytes"] > 0
        assert r["t_over_merged"] is not None and r["t_over_unfused"] is not None
        if r["provider"] == "conv":
            assert r["t_over_conv"] == pytest.approx(1.0)
    table = lora_conv.format_table(rows)
    assert "skipped: needs CUDA" in table and "peft-unfused" in table
    json.dumps(rows)


def test_lora_conv_wrong_provider_is_not_timed(monkeypatch):
    real = lora_conv.merged_conv
    monkeypatch.setattr(lora_conv, "merged_conv", lambda layer, x, stage: real(layer, x, stage) * 1.01)
    rows = _quick_rows(providers=["conv", "merged-cudnn"])
    bad = [r for r in rows if r["provider"] == "merged-cudnn"]
    assert all(r["status"].startswith("failed numerics") and r["p50_ms"] is None for r in bad)
    assert all(r["rel_err"] > 1e-3 for r in bad)
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "conv")


def test_lora_conv_shape_failure_becomes_error_rows(monkeypatch):
    measured = _quick_rows(providers=["conv"])[0]

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (stand-in)")
    monkeypatch.setattr(lora_conv, "make_problem", broken)
    rows = _quick_rows()
    assert len(rows) == len(lora_conv.PROVIDERS) * len(lora_conv.PASSES)
    assert all(r["status"] == "error: RuntimeError: CUDA out of memory (stand-in)" for r in rows)
    assert set(rows[0]) == set(measured)  # same columns as a measured row
    lora_conv.format_table(rows)


def test_lora_conv_fused_provider_through_the_interpreter(monkeypatch):
    """The fused-triton wiring of both designs (argument order, grads of A and B, numerics gate) on a tiny shape,
    interpreted."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("exercises the CPU interpreter path only")
    monkeypatch.setattr(lora_conv, "CUDA_ONLY", ())
    rows = lora_conv.run(CPU, quick=True, hw=[8], rounds=1, warmup_ms=0, rep_ms=0,
                          providers=["merged-cudnn", "fused-triton", "fused-triton-v1"])
    fused = [r for r in rows if r["provider"].startswith("fused-triton")]
    assert len(fused) == 4  # both designs, both passes
    for r in fused:
        assert r["status"] == "ok", r
        assert r["rel_err"] < 1e-5 and r["p50_ms"] > 0


def test_lora_conv_main_writes_report(tmp_path, capsys):
    assert lora_conv.main(["--quick", "--device", "cpu", "--rounds", "1", "--rep-ms", "1",
                            "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "skipped: needs CUDA" in printed and "merged-cudnn" in printed
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["rows"] and report["machine"]["device"] == "cpu"
    assert (tmp_path / "report.md").read_text().startswith("# lorun_fast")


# --------------------------------------------------------------------------------------------------------------------
# gd_step
# --------------------------------------------------------------------------------------------------------------------

import gd_step  # noqa: E402
from lorun_fast.reference import BlockCS  # noqa: E402


def test_gd_step_counts_match_the_notes():
    # Batch 16, 256², float32 (the NOTES.md "GD step" shape): CS 8×8 blocks of 33² per image, m = 272.
    cs = gd_step.element_counts("cs", 16, 256)
    assert cs == {"x": 16 * 256 * 256, "y": 16 * 64 * 272, "a": 272 * 1089}
    assert gd_step.minimal_bytes("forward", cs, 4) == 4 * (2 * 1_048_576 + 278_528 + 296_208) == 10_687_552
    # forward+backward: the residual route (r written and read back) is cheaper than re-reading x and y.
    assert gd_step.minimal_bytes("forward+backward", cs, 4) == 4 * (4 * 1_048_576 + 4 * 278_528 + 2 * 296_208)
    assert gd_step.minimal_bytes("forward+backward", {"x": 10, "y": 20, "a": 1}, 2) == 2 * (5 * 10 + 3 * 20 + 2)
    assert gd_step.flop_count("cs", "fused-two-gemm", "forward", 16, 256) == 4 * 1024 * 1089 * 272 + 1024 * 272 \
        + 2 * 1_048_576
    assert gd_step.flop_count("cs", "fused-one-gemm", "forward", 16, 256) == 2 * 1024 * 1089 * 1361 + 2 * 1_048_576
    gram = 2 * 1089 ** 2 * 272
    ista = gram + 2 * 1024 * 1089 * 272 + 2 * 1024 * 1089 ** 2 + 4 * 1024 * 1089
    assert gd_step.flop_count("cs", "ista-mm", "forward", 16, 256) == ista
    assert gd_step.flop_count("cs", "ista-mm", "forward+backward", 16, 256) == 2 * ista - gram
    cassi = gd_step.element_counts("cassi", 16, 256)
    assert cassi == {"x": 16 * 28 * 65536, "y": 16 * 256 * 310, "a": 65536}
    assert gd_step.minimal_bytes("forward", cassi, 4) == 240_222_208
    assert gd_step.flop_count("cassi", "fused", "forward", 16, 256) == 5 * 16 * 28 * 65536 + 16 * 256 * 310
    sr = gd_step.element_counts("sr", 16, 256)
    assert sr == {"x": 16 * 3 * 65536, "y": 16 * 3 * 128 * 128, "a": 49}
    assert gd_step.minimal_bytes("forward", sr, 4) == 4 * (2 * 3_145_728 + 786_432 + 49)
    assert gd_step.flop_count("sr", "fused", "forward", 16, 256) == 98 * 786_432 + 786_432 + 34 * 3_145_728
    assert gd_step.flop_count("sr", "eager", "forward+backward", 16, 256) \
        == 2 * (196 * 3_145_728 + 786_432 + 2 * 3_145_728)
    # Bicubic ×2: 8 HR taps per LR output and axis (4·s, the antialiased kernel's support), each HR pixel in the
    # support of 4 LR outputs per axis; dense products sum over whole axes instead.
    assert gd_step.bicubic_taps(256, 2) == (8, 4) and gd_step.bicubic_taps(256, 4) == (16, 4)
    assert gd_step.element_counts("bicubic", 16, 256) == {"x": 3_145_728, "y": 786_432, "a": 0}
    assert gd_step.flop_count("bicubic", "fused", "forward", 16, 256) \
        == (2 * 8 + 2) * 8 * 786_432 + 786_432 + (2 * 4 + 2) * 4 * 3_145_728 + 2 * 3_145_728
    assert gd_step.flop_count("bicubic", "eager", "forward", 16, 256) \
        == 48 * (2 * 128 * 256 * 256 + 2 * 128 * 256 * 128 + 2 * 256 * 128 * 128 + 2 * 256 * 128 * 256) \
        + 786_432 + 2 * 3_145_728


def test_ista_mm_equals_the_reference_step_float64():
    """ISTA-Net's x − ρ·x ΦᵀΦ + ρ·yΦ on unfolded blocks is the reference gd_step, padding and gradients included."""
    op = BlockCS.gaussian(0.25, seed=3).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 40, 50, generator=gen, dtype=torch.float64, requires_grad=True)
    y = op.A(torch.rand(2, 1, 40, 50, generator=gen, dtype=torch.float64)).requires_grad_()
    rho = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 1, 40, 50, generator=gen, dtype=torch.float64)
    want = op.gd_step(x, y, rho)
    got = gd_step.ista_mm_step(op, x, y, rho)
    assert got.shape == want.shape == (2, 1, 40, 50)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (x, y, rho), g), torch.autograd.grad(want, (x, y, rho), g)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def _gd_quick_rows(**kw):
    return gd_step.run(CPU, quick=True, rounds=1, warmup_ms=0, rep_ms=1, **kw)


def test_gd_step_cpu_quick_rows():
    rows = _gd_quick_rows()
    expected = {(op, p, q) for op, names in gd_step.OP_PROVIDERS.items() for p in names for q in gd_step.PASSES}
    assert {(r["op"], r["provider"], r["pass"]) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        assert r["device"] == "cpu" and r["batch"] == 1 and r["precision"] == "fp32"
        assert r["height"] == r["width"] == (66 if r["op"] == "cs" else 64)
        assert r["bytes_min"] > 0 and r["flops"] > 0
        if r["provider"].startswith("fused"):
            assert r["status"] == "skipped: needs CUDA"
            assert r["p50_ms"] is None and r["rel_err"] is None and r["t_over_eager"] is None
            continue
        assert r["status"] == "ok", r
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and math.isfinite(r["p80_ms"])
        assert r["rel_err"] is not None and r["rel_err"] < 1e-4  # fp32 IEEE vs float64
        assert set(r["rel_errs"]) == ({"z"} if r["pass"] == "forward" else {"z", "dx", "dy", "drho"})
        assert r["gbps"] > 0 and r["tflops"] > 0 and r["t_over_eager"] > 0
        assert r["frac_hbm_measured"] is None and r["floor_ms"] is None  # no ceilings on a CPU
        if r["pass"] == "forward+backward":
            assert r["peak_mem_measure"] == "cpu-saved-for-backward" and r["peak_mem_bytes"] > 0
        if r["provider"] == "eager":
            assert r["t_over_eager"] == pytest.approx(1.0)
    assert {r["provider"] for r in rows if r["op"] == "cs"} == {"eager", "ista-mm", "fused-two-gemm",
                                                                "fused-one-gemm"}
    assert all(r["m"] == 272 and r["ratio"] == 0.25 for r in rows if r["op"] == "cs")
    assert all(r["bands"] == 28 for r in rows if r["op"] == "cassi")
    assert all(r["scale"] == 2 for r in rows if r["op"] == "sr")
    table = gd_step.format_table(rows)
    assert "skipped: needs CUDA" in table and "ista-mm" in table
    json.dumps(rows)


def test_gd_step_wrong_provider_is_not_timed(monkeypatch):
    real = gd_step.ista_mm_step
    monkeypatch.setattr(gd_step, "ista_mm_step", lambda op, x, y, rho: real(op, x, y, rho) * 1.01)
    rows = _gd_quick_rows(ops=["cs"], providers=["eager", "ista-mm"], passes=["forward"])
    assert [r["provider"] for r in rows] == ["eager", "ista-mm"]
    bad, good = rows[1], rows[0]
    assert bad["status"].startswith("failed numerics") and bad["p50_ms"] is None and bad["rel_err"] > 1e-3
    assert good["status"] == "ok" and good["p50_ms"] > 0


def test_gd_step_fused_providers_through_the_interpreter():
    """The fused providers' wiring (argument order, grads of x, y and ρ, numerics gate) on tiny shapes, interpreted.
    fused-one-gemm differs from fused-two-gemm only by its algorithm string, and its interpreted run costs seconds
    more, so it is left to tests/test_gd_step.py."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("exercises the CPU interpreter path only")
    for op, side, names in (("cs", 33, ("fused-two-gemm",)), ("cassi", 8, ("fused",)), ("sr", 8, ("fused",))):
        prob = gd_step.make_problem(op, side, 1, torch.float32, CPU)
        ref = gd_step.reference(prob)
        for name in names:
            checked = gd_step.check_numerics(gd_step.make_provider(name, prob, "fp32"), prob, ref)
            assert set(checked["forward+backward"]["errors"]) == {"z", "dx", "dy", "drho"}
            for pass_ in gd_step.PASSES:
                assert checked[pass_]["max"] < 1e-5, (op, name, pass_, checked[pass_])


def test_gd_step_main_writes_report(tmp_path, capsys):
    assert gd_step.main(["--quick", "--device", "cpu", "--ops", "sr", "--rounds", "1", "--rep-ms", "1",
                         "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "skipped: needs CUDA" in printed and "eager" in printed
    report = json.loads((tmp_path / "results.json").read_text())
    assert {r["op"] for r in report["rows"]} == {"sr"} and report["machine"]["device"] == "cpu"
    assert (tmp_path / "report.md").read_text().startswith("# lorun_fast")


# --------------------------------------------------------------------------------------------------------------------
# merged inference against block
# --------------------------------------------------------------------------------------------------------------------
import merged_inference  # noqa: E402


def test_paired_ratio_is_the_median_of_per_round_ratios_with_an_interval():
    times, base = [2.0, 3.3, 4.0, 5.0, 6.6], [1.0, 3.0, 2.0, 5.0, 6.0]  # ratios 2, 1.1, 2, 1, 1.1
    median, lo, hi = merged_inference.paired_ratio(times, base)
    assert median == pytest.approx(1.1) and lo <= median <= hi and 1.0 <= lo and hi <= 2.0
    assert merged_inference.paired_ratio([1.0] * 4, [1.0] * 4) == (1.0, 1.0, 1.0)


def test_merged_inference_rows_and_report(tmp_path, capsys):
    assert merged_inference.main(["--stages", "2", "--rounds", "3", "--batches", "1", "--device", "cpu",
                                  "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["provider"] for r in rows] == list(merged_inference.PROVIDERS)
    assert all(r["status"] == "ok" and r["rel_err"] <= 1e-5 and r["p50_ms"] > 0 for r in rows)
    by_name = {r["provider"]: r for r in rows}
    assert by_name["block"]["vs_block"] == 1.0 and by_name["block-copy"]["rel_err"] == 0.0
    assert {by_name[n]["verdict"] for n in ("lorun-merged", "lorun-merged-per-call")} <= {
        "within noise", "slower", "faster"}
    assert "vs block [95%]" in capsys.readouterr().out and "block-copy" in (tmp_path / "report.md").read_text()
