"""The Triton kernels compiled for sm_90 on a CPU (``bench/compile_report.py --quick``): every config an autotuner
keeps must compile, fit in shared memory, and, at the precisions the layers use by default, run without register
spills. ptxas ships inside the triton wheel, so this needs no GPU; it takes about two minutes on two cores with an
empty Triton cache (seconds with a warm one).

The report runs in a subprocess: compiling needs real ``@triton.jit`` functions, while this pytest process imports
the kernels under ``TRITON_INTERPRET=1`` when there is no CUDA device (tests/conftest.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "bench" / "compile_report.py"
UNAVAILABLE = 2  # the tool's exit status when this triton cannot compile for CUDA here

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(TOOL), "--quick", "--out", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode == UNAVAILABLE:
        pytest.skip(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "CUDA backend unavailable")
    assert proc.returncode == 0, f"compile report failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    files = list(out.glob("compile_report_triton-*_quick.json"))
    assert len(files) == 1, f"expected one JSON report in {out}, found {files}"
    data = json.loads(files[0].read_text())
    assert data["rows"], "the report compiled nothing"
    return data


def _rows(report, **match):
    return [r for r in report["rows"] if all(r[k] == v for k, v in match.items())]


def _label(r):
    return f"{r['target']} {r['kernel']} [{r['case']}] {r['config']}"


def test_every_kernel_is_compiled(report):
    compiled = {r["kernel"] for r in report["rows"]}
    missing = set(report["meta"]["kernels"]) - compiled
    assert not missing, f"kernels no case launches: {sorted(missing)}"


def test_every_kept_config_compiles(report):
    failed = [f"{_label(r)}: {r['error']}" for r in report["rows"] if not r["ok"]]
    assert not failed, "configs that do not compile:\n" + "\n".join(failed)


def test_no_kept_config_exceeds_shared_memory(report):
    over = [f"{_label(r)}: {r['shared']:,} B > {r['smem_limit']:,} B" for r in report["rows"] if r["smem_over"]]
    assert not over, "configs over the opt-in shared-memory limit:\n" + "\n".join(over)


def test_no_spills_at_the_default_precisions(report):
    """What the tuner can pick at the benchmark shapes in tf32 / bf16 (and the fp32 row kernels, which have no
    dots) compiles without any spill."""
    gated = [r for r in report["rows"] if r["bench_shape"] and r["default_precision"] and r["ok"]]
    assert gated
    spilling = [f"{_label(r)}: {r['regs']} registers, {r['spill_stores']} B spill stores"
                for r in gated if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "configs that spill:\n" + "\n".join(spilling)


def test_no_register_pressure_spills_in_the_ieee_conv(report):
    """The conv's ieee (FMA) forward has its own config list so that its tiles fit in registers (the tf32 tiles
    spilled up to 91 KB there). ptxas may still spill a few bytes far under 255 registers because of an allocator
    option a triton release passes it; ``spill_stores_plain`` (ptxas with no options) tells those apart."""
    rows = [r for r in _rows(report, family="conv", precision="ieee") if r["ok"]]
    assert rows
    spilling = [f"{_label(r)}: {r['regs']} registers, {r['spill_stores']} B ({r['spill_stores_plain']} B plain)"
                for r in rows if r["spill_stores"] and r["spill_stores_plain"] != 0]
    assert not spilling, "ieee configs that spill under register pressure:\n" + "\n".join(spilling)


def test_shared_memory_models_match_the_compiler(report):
    """Pruners that model shared memory (the CS update kernel: it grows with the split of the first GEMM) must
    count exactly what Triton allocates on sm_90, or more where they document an upper bound."""
    modelled = [r for r in report["rows"] if r.get("smem_model") is not None and r["ok"]]
    assert modelled
    wrong = []
    for r in modelled:
        exact = r["constexprs"].get("WRITE_Z", True) and r["arch"] == 90
        if (r["smem_model"] != r["shared"]) if exact else (r["smem_model"] < r["shared"]):
            wrong.append(f"{_label(r)}: model {r['smem_model']:,} B, compiled {r['shared']:,} B")
    assert not wrong, "shared-memory model off:\n" + "\n".join(wrong)


def test_dots_use_tensor_cores_except_ieee(report):
    conv = _rows(report, family="conv")
    assert conv
    for r in conv:
        if r["ok"] and r["kernel"] == "_lora_conv_fwd_kernel":
            if r["precision"] == "ieee":
                assert r["mma"] == "none", _label(r)
                # The ieee list, not the tf32 one: FMA tiles with BLOCK_K = 16.
                assert r["config_kwargs"]["BLOCK_K"] == 16, _label(r)
            else:
                assert r["mma"] in ("wgmma", "mma.sync"), _label(r)


def test_cs_small_batch_has_enough_programs(report):
    """256² at batch 1 is 64 blocks, which one program per 16–64 blocks and ≤ 4 pixel slices spread over at most
    16 programs: the first GEMM's pixel reduction is split so that every kept tile gives at least 4× that, and the
    small tiles more than two programs per SM of an H100 (132 SMs)."""
    small = [r for r in _rows(report, kernel="_cs_residual_kernel") if " N1 " in r["case"]]
    assert small
    assert min(r["ctas"] for r in small) >= 64, [(_label(r), r["ctas"]) for r in small]
    assert max(r["ctas"] for r in small) >= 264, [(_label(r), r["ctas"]) for r in small]
