"""bench/run.py, the benchmark report, on a CPU at tiny sizes: same outputs, schema, files, bad arguments."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402
import run  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = run.Size(height=33, width=33, channels=4, num_blocks=1, batches=(1, 2), rounds=1, rep_ms=1, min_reps=1)


def test_every_provider_computes_the_same_function():
    operator, channels = run.make_task("cs", TINY)
    models = run.build_models(operator.double(), channels, 3, TINY, "cpu", torch.float64)
    assert set(models) == set(run.PROVIDERS)
    x, y = run._inputs(operator.double(), channels, 2, TINY, "cpu", torch.float64)
    with torch.no_grad():
        out = {name: m(y, (33, 33)) for name, m in models.items()}
    torch.testing.assert_close(out["block"], out["shared"], rtol=1e-12, atol=1e-12)
    for name in ("lorun-merged", "lorun-fused"):
        torch.testing.assert_close(out[name], out["lorun-reference"], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out["lorun-reference"], out["shared"])  # the adapters really act


def test_report_json_plots_and_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "REDUCED", TINY)
    assert run.main(["--stages", "2", "--checkpointing", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    report.validate(results)
    for name in ("report.md", "memory_vs_stages.png", "throughput.png", "roofline.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = results["rows"]
    providers = {r["provider"] for r in rows if r["section"] == "model"}
    assert {"block", "shared", "lorun-reference", "lorun-merged", "lorun-fused", "block+ckpt"} <= providers
    assert any(r["provider"] == "lorun-fused" and r["status"] == "skipped: needs CUDA" for r in rows)
    sweep = [r for r in rows if r["section"] == "sweep" and r["metric"] == "params_total"]
    assert sorted({r["shape"]["stages"] for r in sweep}) == [1, 2]
    kernels = [r for r in rows if r["section"] == "kernel"]
    assert any(r["provider"] == "lora-conv/fused-triton" and r["status"].startswith("skipped") for r in kernels)
    assert results["machine"]["git_commit"] and results["config"]["reduced"] is True
    printed = capsys.readouterr().out
    assert "DUN providers" in printed and "Stage sweep" in printed and "reduced sizes" in printed


def test_schema_rejects_bad_rows():
    good = report.assemble({}, {}, [], [report.row("model", "block", "params_total", 10, "count", {"batch": 1})])
    report.validate(good)
    for change in ({"unit": "parsecs"}, {"section": "other"}, {"value": float("nan")}, {"value": None},
                   {"shape": []}):
        bad = json.loads(json.dumps(good))
        bad["rows"][0].update(change)
        with pytest.raises(ValueError, match="rows\\[0\\]"):
            report.validate(bad)


@pytest.mark.parametrize("args, message", [
    (["--stages", "0"], "--stages"),
    (["--task", "deblur"], "--task"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "float8"], "--dtype"),
])
def test_bad_arguments(args, message):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and message in proc.stderr


def test_out_holding_the_users_files_is_refused_before_the_benchmark(tmp_path):
    (tmp_path / "results.json").write_text('{"mine": true}')
    (tmp_path / "report.md").write_text("my notes")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "report.md, results.json" in proc.stderr and "DUN providers" not in proc.stdout
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--out", str(a_file)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
