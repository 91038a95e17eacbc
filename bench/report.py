"""Rows, schema, tables and plots of the benchmark report (``bench/run.py``).

``results.json`` schema (version 1)::

    {
      "schema_version": 1,
      "machine": {...},            # harness.machine_info: date, git commit, versions, GPU, driver, TF32 settings
      "config":  {...},            # task, stages, dtype, device, reduced, size, compile, checkpointing, seconds
      "notes":   [str, ...],       # what was reduced, skipped or failed, in words
      "rows": [                    # one row per provider × metric × size
        {"section": "model" | "sweep" | "kernel",
         "provider": str,          # e.g. "block", "lorun-fused+compile", "lora-conv/fused-triton"
         "metric": str,            # e.g. "latency_train", "memory_train_peak", "params_total", "gbps"
         "value": float | int | null,
         "unit": "ms" | "img/s" | "bytes" | "count" | "GB/s" | "fraction" | "TFLOP/s" | "",
         "p20": float | null, "p80": float | null,   # timing rows: the spread around the median ("value")
         "shape": {str: int | str | null},           # batch, height, width, stages, channels, dtype, ...
         "status": "ok" | "skipped: <why>" | "failed ..." | "error: ...",
         "extra": {...}}           # free-form details (memory breakdown, measure, rel err, ...)
      ]
    }
"""
from __future__ import annotations

import json
import math
from pathlib import Path

SCHEMA_VERSION = 1
SECTIONS = ("model", "sweep", "kernel")
UNITS = ("ms", "img/s", "bytes", "count", "GB/s", "fraction", "TFLOP/s", "")
ROW_KEYS = {"section": str, "provider": str, "metric": str, "unit": str, "shape": dict, "status": str,
            "extra": dict}
KERNEL_SHAPE_KEYS = ("pass", "channels", "rank", "height", "width", "batch", "dtype", "precision", "ratio",
                     "algorithm", "bands", "scale", "m", "op")


def row(section: str, provider: str, metric: str, value, unit: str, shape: dict, *, p20=None, p80=None,
        status: str = "ok", extra: dict | None = None) -> dict:
    return {"section": section, "provider": provider, "metric": metric, "value": value, "unit": unit,
            "p20": p20, "p80": p80, "shape": dict(shape), "status": status, "extra": extra or {}}


def model_rows(name: str, model, batch: int, size, memory: dict, t_infer: dict | None, t_train: dict) -> list[dict]:
    shape = {"batch": batch, "height": size.height, "width": size.width, "stages": model.num_stages}
    counts = model.parameter_counts()
    rows = [row("model", name, "params_total", counts["total"], "count", shape),
            row("model", name, "params_trainable", counts["trainable"], "count", shape),
            row("model", name, "params_per_stage", max(counts["per_stage"]), "count", shape,
                extra={"per_stage": counts["per_stage"], "shared": counts["shared"]})]
    for kind, timing in (("inference", t_infer), ("train", t_train)):
        if timing is None:
            continue
        rows.append(row("model", name, f"latency_{kind}", timing["p50_ms"], "ms", shape, p20=timing["p20_ms"],
                        p80=timing["p80_ms"], extra={"round_spread": timing.get("round_spread")}))
        rows.append(row("model", name, f"throughput_{kind}", 1e3 * batch / timing["p50_ms"], "img/s", shape))
    measure = {"measure": memory["measure"]}
    if t_infer is not None:
        rows.append(row("model", name, "memory_inference_peak", memory["inference_peak"], "bytes", shape,
                        extra=measure, status="ok" if memory["inference_peak"] is not None
                        else "skipped: not measured on a CPU"))
    rows.append(row("model", name, "memory_train_peak", memory["train_peak"], "bytes", shape,
                    extra={**measure, **memory["breakdown"]}))
    if memory["device_used"] is not None:
        rows.append(row("model", name, "memory_device_used_nvml", memory["device_used"], "bytes", shape))
    return rows


def kernel_rows(label: str, raw_rows: list[dict]) -> list[dict]:
    """Report rows from a single-kernel benchmark's rows (``lora_conv.run`` / ``gd_step.run``)."""
    out = []
    for raw in raw_rows:
        shape = {k: raw[k] for k in KERNEL_SHAPE_KEYS if k in raw}
        provider = f"{label}/{raw['provider']}"
        status = raw.get("status", "ok")
        extra = {k: raw.get(k) for k in ("rel_err", "bytes_min", "flops", "floor_ms", "frac_floor", "gpu",
                                          "round_spread") if k in raw}
        out.append(row("kernel", provider, "time", raw.get("p50_ms"), "ms", shape, p20=raw.get("p20_ms"),
                       p80=raw.get("p80_ms"), status=status, extra=extra))
        for metric, unit in (("gbps", "GB/s"), ("frac_hbm_measured", "fraction"), ("frac_hbm_datasheet", "fraction"),
                             ("tflops", "TFLOP/s"), ("peak_mem_bytes", "bytes")):
            if raw.get(metric) is not None:
                out.append(row("kernel", provider, metric, raw[metric], unit, shape, status=status))
    return out


def assemble(machine: dict, config: dict, notes: list[str], rows: list[dict]) -> dict:
    return {"schema_version": SCHEMA_VERSION, "machine": machine, "config": config, "notes": notes, "rows": rows}


def validate(results: dict) -> None:
    """Raise ValueError naming the first thing that does not follow the schema above."""
    for key, kind in (("schema_version", int), ("machine", dict), ("config", dict), ("notes", list),
                      ("rows", list)):
        if not isinstance(results.get(key), kind):
            raise ValueError(f"results: {key!r} should be a {kind.__name__}, got {type(results.get(key)).__name__}")
    if results["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"results: schema_version {results['schema_version']} != {SCHEMA_VERSION}")
    for i, r in enumerate(results["rows"]):
        for key, kind in ROW_KEYS.items():
            if not isinstance(r.get(key), kind):
                raise ValueError(f"rows[{i}]: {key!r} should be a {kind.__name__}, got {r.get(key)!r}")
        if r["section"] not in SECTIONS:
            raise ValueError(f"rows[{i}]: section {r['section']!r} not in {SECTIONS}")
        if r["unit"] not in UNITS:
            raise ValueError(f"rows[{i}]: unit {r['unit']!r} not in {UNITS}")
        for key in ("value", "p20", "p80"):
            v = r.get(key, "missing")
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"rows[{i}]: {key!r} should be a finite number or null, got {v!r}")
        if r["status"] == "ok" and r["value"] is None:
            raise ValueError(f"rows[{i}]: status ok but no value ({r['provider']} {r['metric']})")


# --------------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------------

def _get(rows, provider, metric, **shape):
    for r in rows:
        if r["provider"] == provider and r["metric"] == metric and all(r["shape"].get(k) == v
                                                                       for k, v in shape.items()):
            return r
    return None


def _fmt_time(r) -> str:
    if r is None or r["value"] is None:
        return "-"
    return f"{r['value']:.1f} [{r['p20']:.1f}, {r['p80']:.1f}]"


def _mib(r) -> str:
    return "-" if r is None or r["value"] is None else f"{r['value'] / 2 ** 20:.1f}"


def model_table(results: dict) -> str:
    rows = [r for r in results["rows"] if r["section"] == "model"]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    batches = sorted({r["shape"]["batch"] for r in rows if r["shape"].get("batch") is not None})
    head = (f"{'provider':<24}{'batch':>6}{'params':>12}{'trainable':>12}{'infer ms p50 [p20, p80]':>26}"
            f"{'img/s':>9}{'train ms p50 [p20, p80]':>26}{'img/s':>9}{'train MiB':>11}{'vs block':>9}")
    lines = [head, "-" * len(head)]
    for provider in providers:
        skipped = _get(rows, provider, "skipped")
        if skipped is not None:
            lines.append(f"{provider:<24}{skipped['status']}")
            continue
        for batch in batches:
            params = _get(rows, provider, "params_total", batch=batch)
            if params is None:
                continue
            trainable = _get(rows, provider, "params_trainable", batch=batch)
            mem = _get(rows, provider, "memory_train_peak", batch=batch)
            block_mem = _get(rows, "block", "memory_train_peak", batch=batch)
            ratio = (f"{mem['value'] / block_mem['value']:.2f}" if mem and block_mem and mem["value"]
                     and block_mem["value"] else "-")
            ti, tt = _get(rows, provider, "throughput_inference", batch=batch), _get(rows, provider,
                                                                                      "throughput_train", batch=batch)
            lines.append(f"{provider:<24}{batch:>6}{params['value']:>12,}{trainable['value']:>12,}"
                         f"{_fmt_time(_get(rows, provider, 'latency_inference', batch=batch)):>26}"
                         f"{'-' if ti is None else format(ti['value'], '.1f'):>9}"
                         f"{_fmt_time(_get(rows, provider, 'latency_train', batch=batch)):>26}"
                         f"{'-' if tt is None else format(tt['value'], '.1f'):>9}{_mib(mem):>11}{ratio:>9}")
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    rows = [r for r in results["rows"] if r["section"] == "sweep"]
    if not rows:
        return "(no stage sweep)"
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    stages = sorted({r["shape"]["stages"] for r in rows})
    head = f"{'stages':>6}" + "".join(f"{p + ' params':>26}{p + ' MiB':>24}" for p in providers)
    lines = [head, "-" * len(head)]
    for k in stages:
        cells = []
        for p in providers:
            params, mem = _get(rows, p, "params_total", stages=k), _get(rows, p, "memory_train_peak", stages=k)
            cells.append(f"{params['value'] if params else '-':>26,}" if params else f"{'-':>26}")
            cells.append(f"{_mib(mem):>24}")
        lines.append(f"{k:>6}" + "".join(cells))
    return "\n".join(lines)


def kernel_table(results: dict) -> str:
    rows = [r for r in results["rows"] if r["section"] == "kernel" and r["metric"] == "time"]
    if not rows:
        return "(no kernel rows)"
    head = f"{'kernel/provider':<30}{'shape':<44}{'ms p50 [p20, p80]':>26}{'GB/s':>9}{'%HBM':>6}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        gbps = _get([x for x in results["rows"] if x["shape"] == r["shape"]], r["provider"], "gbps")
        frac = _get([x for x in results["rows"] if x["shape"] == r["shape"]], r["provider"], "frac_hbm_measured")
        times = "-" if r["value"] is None else f"{r['value']:.3f} [{r['p20']:.3f}, {r['p80']:.3f}]"
        lines.append(f"{r['provider']:<30}{shape[:43]:<44}{times:>26}"
                     f"{'-' if gbps is None else format(gbps['value'], '.1f'):>9}"
                     f"{'-' if frac is None else format(100 * frac['value'], '.0f'):>6}  {r['status']}")
    return "\n".join(lines)


def summary(results: dict) -> str:
    m, c = results["machine"], results["config"]
    device = m.get("gpu") or m.get("cpu") or c["device"]
    parts = [f"lorun_fast benchmark: task {c['task']}, {c['stages']} stages, {c['dtype']}, {device} "
             f"(torch {m.get('torch')}, triton {m.get('triton')}, commit {m.get('git_commit')}, {c['seconds']} s)"]
    parts += [f"note: {n}" for n in results["notes"]]
    parts += ["", "DUN providers", model_table(results), "", "Stage sweep (training memory)", sweep_table(results),
              "", "Kernels", kernel_table(results)]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# Files and plots
# --------------------------------------------------------------------------------------------------------------------

def _plot_sweep(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["section"] == "sweep"]
    fig, (ax_mem, ax_par) = plt.subplots(1, 2, figsize=(10, 4))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        for ax, metric, scale in ((ax_mem, "memory_train_peak", 2 ** 20), (ax_par, "params_total", 1e6)):
            pts = sorted((r["shape"]["stages"], r["value"] / scale) for r in rows
                         if r["provider"] == provider and r["metric"] == metric and r["value"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
    ax_mem.set(xlabel="stages", ylabel="training-step memory (MiB)", title="Memory vs stages")
    ax_par.set(xlabel="stages", ylabel="parameters (M)", title="Parameters vs stages")
    for ax in (ax_mem, ax_par):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_throughput(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["section"] == "model" and r["metric"].startswith("throughput")]
    batch = max((r["shape"]["batch"] for r in rows), default=None)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(providers)), 4))
    width = 0.4
    for i, metric in enumerate(("throughput_inference", "throughput_train")):
        values = [(_get(rows, p, metric, batch=batch) or {"value": 0})["value"] for p in providers]
        ax.bar([j + (i - 0.5) * width for j in range(len(providers))], values, width, label=metric.split("_")[1])
    ax.set_xticks(range(len(providers)), providers, rotation=20, ha="right")
    ax.set(ylabel="images / s", title=f"Throughput at batch {batch}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_roofline(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["section"] == "kernel" and r["metric"] == "frac_hbm_measured"]
    fig, ax = plt.subplots(figsize=(9, max(3, 0.3 * len(rows) + 1)))
    if rows:
        labels = [f"{r['provider']} {' '.join(str(v) for v in r['shape'].values())}" for r in rows]
        ax.barh(range(len(rows)), [100 * r["value"] for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=6)
        ax.set(xlabel="% of measured HBM bandwidth", title="Roofline fraction per kernel")
    else:
        ax.text(0.5, 0.5, "no roofline fractions: the kernel rows need a GPU", ha="center", va="center")
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: What :func:`write` puts in the report folder.
REPORT_FILES = ("results.json", "report.md", "memory_vs_stages.png", "throughput.png", "roofline.png")


def write(results: dict, out: Path) -> list[Path]:
    """results.json, report.md and three PNG plots in ``out`` (each written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from lorun_fast.io import atomic_write_bytes, atomic_write_text

    out = Path(out)
    paths = [out / "results.json", out / "report.md"]
    atomic_write_text(paths[0], json.dumps(results, indent=2))
    atomic_write_text(paths[1], "\n".join([
        f"# lorun_fast benchmark — {results['config']['task']}, {results['config']['stages']} stages", "",
        "```", summary(results), "```", "", "Machine:", "", "```json", json.dumps(results["machine"], indent=2),
        "```", "", "![memory vs stages](memory_vs_stages.png)", "![throughput](throughput.png)",
        "![roofline](roofline.png)", ""]))
    for name, plot in (("memory_vs_stages.png", _plot_sweep), ("throughput.png", _plot_throughput),
                       ("roofline.png", _plot_roofline)):
        buffer = io.BytesIO()
        path = out / name
        plot(results, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths
