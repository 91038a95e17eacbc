"""The single-kernel benchmarks' shared driver (``lora_conv.py``, ``gd_step.py``): each keeps only its problem, its
providers, its reference and its byte / FLOP counts; this module runs them and reports.

- ``gate_and_measure``: build every provider of one shape, gate its numerics against the float64 reference
  (``lorun_fast.testing``'s benchmark rule; a failing provider is reported, never timed), then time the passes that
  passed, interleaved (``harness.measure_providers``), and fill the ratio columns.
- ``add_common_options`` / ``check_common_options`` / ``run_main``: the command line every benchmark shares.
- Row and table helpers: ``pick``, ``require_positive``, ``check_known``, ``error_status``, ``numerics_summary``,
  ``apply_numerics``, ``fill_ratios``, ``fmt_or_dash``, ``fmt_ratio``, ``pass_label``, ``MEASUREMENT_HEADER`` /
  ``measurement_cells``, ``hbm_note``; report folders: ``check_report_folder``, ``write_report_folder``,
  ``print_report``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Mapping

import torch

import harness
from lorun_fast.testing import bench_tolerance

def pick(value, default):
    """``tuple(value)``, or ``default`` when ``value`` is None (an override of a preset's sizes)."""
    return tuple(value) if value is not None else default


def require_positive(parser, args, keys) -> None:
    """``parser.error`` unless every value of each list option ``args.<key>`` (when given) is ≥ 1."""
    for key in keys:
        values = getattr(args, key)
        if values is not None and any(v < 1 for v in values):
            parser.error(f"--{key}: expected positive integers, got {values}")


def check_known(label: str, values, known) -> None:
    """Raise ValueError for the first of ``values`` that is not in ``known``."""
    for value in values:
        if value not in known:
            raise ValueError(f"{label}: unknown {value!r}; expected some of {tuple(known)}")


def error_status(exc: BaseException) -> str:
    """A row's status for an exception: ``error: Type: first line of the message`` (at most 200 characters)."""
    return f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def numerics_summary(forward_errors: dict[str, float], train_errors: dict[str, float]) -> dict[str, dict]:
    """Per pass: ``{"errors": {tensor: rel err}, "max": largest}``."""
    return {"forward": {"errors": forward_errors, "max": max(forward_errors.values())},
            "forward+backward": {"errors": train_errors, "max": max(train_errors.values())}}


def apply_numerics(rows: Mapping[tuple[str, str], dict], name: str, passes, checked: dict[str, dict],
                   base_tol: float, baseline: str | None = None) -> bool:
    """Record rel_err, rel_errs and tol in the rows ``rows[(name, pass)]``; a row over its tolerance (or NaN) gets
    status ``failed numerics: ...``. With a ``baseline`` provider whose row of the same pass has a rel_err, the
    tolerance is at least twice that error (docs/design.md, §7.3). Returns whether any pass is still "ok" (to be timed)."""
    for pass_ in passes:
        row = rows[(name, pass_)]
        base_row = rows.get((baseline, pass_)) if baseline is not None else None
        base_err = base_row["rel_err"] if base_row is not None else None
        tol = bench_tolerance(base_tol, base_err)
        err = checked[pass_]["max"]
        row.update(rel_err=err, rel_errs=checked[pass_]["errors"], tol=tol)
        if not err <= tol:
            row["status"] = f"failed numerics: rel err {err:.2e} > tol {tol:.0e}"
    return any(rows[(name, p)]["status"] == "ok" for p in passes)


def fill_ratios(rows: Mapping[str, dict], ratios: Mapping[str, str]) -> None:
    """For every timed row of one pass and shape (``rows``: provider → row): ``row[key]`` = its p50 over the p50 of
    provider ``ratios[key]``, where that provider was timed."""
    for row in rows.values():
        if row["p50_ms"] is None:
            continue
        for key, other in ratios.items():
            ref_row = rows.get(other)
            if ref_row is not None and ref_row["p50_ms"]:
                row[key] = row["p50_ms"] / ref_row["p50_ms"]


def fmt_or_dash(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def fmt_ratio(value) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.0f}")


def pass_label(pass_: str) -> str:
    return "fwd" if pass_ == "forward" else "fwd+bwd"


MEASUREMENT_HEADER = (f"{'prec':<5}{'rel err':>8}  {'p50 [p20, p80] ms':<26}{'GB/s':>8}{'%HBM':>5}{'TFLOP/s':>8}"
                      f"{'%floor':>7}{'mem MiB':>8}")


def measurement_cells(row: dict, time_fmt: str) -> str:
    """The columns under ``MEASUREMENT_HEADER`` for one row; times p50 [p20, p80] in ms, formatted with
    ``time_fmt``."""
    t = time_fmt
    times = "-" if row["p50_ms"] is None else f"{row['p50_ms']:{t}} [{row['p20_ms']:{t}}, {row['p80_ms']:{t}}]"
    hbm = row["frac_hbm_measured"]
    floor = row["frac_floor"]
    mem = None if row["peak_mem_bytes"] is None else row["peak_mem_bytes"] / 2 ** 20
    return (f"{row['precision']:<5}{fmt_or_dash(row['rel_err'], '.1e'):>8}  {times:<26}"
            f"{fmt_or_dash(row['gbps'], '.2f'):>8}{fmt_or_dash(None if hbm is None else 100 * hbm, '.0f'):>5}"
            f"{fmt_or_dash(row['tflops'], '.3f'):>8}{fmt_or_dash(None if floor is None else 100 * floor, '.0f'):>7}"
            f"{fmt_or_dash(mem, '.2f'):>8}")


def hbm_note(hbm: dict) -> str:
    """A report note on the bandwidth ceiling (``hbm_bandwidth``'s result)."""
    datasheet = None if hbm["datasheet_Bps"] is None else hbm["datasheet_Bps"] / 1e12
    return (f"HBM: measured copy {hbm['measured_Bps'] / 1e12:.2f} TB/s, datasheet {fmt_or_dash(datasheet, '.2f')} "
            f"TB/s ({hbm['gpu']}).")


REPORT_FILES = ("results.json", "report.md")


def _is_earlier_report(out: Path, marker: str) -> bool:
    """Whether ``out`` holds an earlier benchmark report of this kind: its results.json parses and has ``marker``."""
    try:
        earlier = json.loads((Path(out) / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(earlier, dict) and marker in earlier


def check_report_folder(parser, out, planned=REPORT_FILES, marker: str = "rows") -> Path:
    """Before the benchmark runs: ``out`` is writable and holds no file of the user's where the report will go
    (an earlier report of this kind, recognised by ``marker`` in its results.json, may be replaced); otherwise a
    usage error from ``parser``."""
    from lorun_fast.io import check_output_folder

    replaceable = set(planned) if _is_earlier_report(out, marker) else set()
    try:
        return check_output_folder(out, planned, replaceable, "--out")
    except OSError as err:
        parser.error(str(err))


def write_report_folder(out, title: str, *, info: dict, hbm: dict | None, quick: bool, notes: list[str],
                        rows: list[dict], table: str) -> None:
    """``out/results.json`` (machine, hbm, quick, notes, rows) and ``out/report.md`` (``# lorun_fast — title``, the
    machine, the notes and the table)."""
    from lorun_fast.io import atomic_write_text
    out = Path(out)
    report = {"machine": info, "hbm": hbm, "quick": quick, "notes": notes, "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", "\n".join([
        f"# lorun_fast — {title}", "", f"Machine: {json.dumps(info)}", "",
        *[f"- {n}" for n in notes], "", "```", table, "```", ""]))


def print_report(name: str, device, info: dict, notes: list[str], table: str, rows: list[dict],
                 out=None) -> int:
    """Print the machine line, the notes and the table; returns the exit status: 1 when a row failed numerics or
    raised (said on stderr), else 0."""
    print(f"lorun_fast {name}: device {device} ({info.get('gpu') or info['cpu']}), torch {info['torch']}, "
          f"triton {info['triton']}, commit {info['git_commit']}")
    for n in notes:
        print(f"note: {n}")
    print(table)
    bad = [r for r in rows if r["status"].startswith(("failed", "error"))]
    if out:
        print(f"results written to {out}/results.json and report.md")
    if bad:
        print(f"{len(bad)} row(s) failed numerics or raised: see status", file=sys.stderr)
        return 1
    return 0


def gate_and_measure(rows: Mapping[tuple[str, str], dict], names, passes, *, device, cuda_only,
                     build: Callable, baseline_of: Callable, tolerance: float, fn_for: Callable, sizes,
                     hbm: dict | None, spec: dict | None, peak: float | None, ratios: Mapping[str, str]) -> None:
    """One shape of a single-kernel benchmark, on its prepared ``rows[(provider, pass)]``.

    ``build(name)`` returns ``(provider, checked)``: the provider and its ``numerics_summary`` against the
    reference (building also compiles and autotunes Triton kernels, before any timing). A provider that raises gets
    an error status; one over its tolerance (``tolerance``, or twice the error of ``baseline_of(name)``'s row) gets
    ``failed numerics``; CUDA-only providers without CUDA are skipped. The rest are timed per pass,
    ``fn_for(provider, pass)`` giving the callable, and ``ratios`` (column → provider) filled.
    """
    cuda = device.type == "cuda"

    def set_status(name, status):
        for pass_ in passes:
            rows[(name, pass_)]["status"] = status

    providers = {}
    for name in names:
        if name in cuda_only and not cuda:
            set_status(name, "skipped: needs CUDA")
            continue
        try:
            provider, checked = build(name)
        except Exception as exc:  # noqa: BLE001 - one broken provider must not stop the others
            set_status(name, error_status(exc))
            continue
        if apply_numerics(rows, name, passes, checked, tolerance, baseline_of(name)):
            providers[name] = provider  # time only the passes that passed
    for pass_ in passes:
        fns = {name: fn_for(provider, pass_) for name, provider in providers.items()
               if rows[(name, pass_)]["status"] == "ok"}
        pass_rows = {name: rows[(name, pass_)] for name in names}
        harness.measure_providers(pass_rows, fns, device, rounds=sizes.rounds, warmup_ms=sizes.warmup_ms,
                                  rep_ms=sizes.rep_ms, hbm=hbm, spec=spec, peak=peak)
        fill_ratios(pass_rows, ratios)


def add_common_options(parser: argparse.ArgumentParser, *, quick_help: str, dtypes, providers) -> None:
    """The options every single-kernel benchmark takes (its own come after)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=None, help="folder for results.json and report.md (default: print only)")
    parser.add_argument("--hw", type=int, nargs="+", default=None, help="override image sides")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="override batch sizes")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(dtypes), default=None, help="override dtypes")
    parser.add_argument("--providers", nargs="+", choices=providers, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--rep-ms", type=float, default=None, help="timed milliseconds per provider per round")


def check_common_options(parser: argparse.ArgumentParser, args, positive=("hw", "batch")) -> None:
    if args.out:
        check_report_folder(parser, args.out)
    require_positive(parser, args, positive)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds: expected ≥ 1, got {args.rounds}")


def device_and_threads(args) -> torch.device:
    """``--device`` (CUDA when available by default), with torch's CPU threads set to ``--threads``."""
    torch.set_num_threads(args.threads)
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def report(name: str, title: str, device, notes: list[str], rows: list[dict], table: str, out) -> int:
    """Print a benchmark's machine, notes and table, and write them to the folder ``out`` when given (no HBM
    figures: for benchmarks of whole models). Exit status as :func:`print_report`."""
    info = harness.machine_info(device)
    if out:
        write_report_folder(out, title, info=info, hbm=None, quick=False, notes=notes, rows=rows, table=table)
    return print_report(name, device, info, notes, table, rows, out)


def run_main(args, *, name: str, title: str, run: Callable, notes: Callable, format_table: Callable) -> int:
    """Run a benchmark from its parsed options: ``run(device)`` → rows, ``notes(device, hbm, rows)``; print the
    machine, the notes and the table, and write the report folder when ``--out`` is given. Exit status 1 when a
    row failed numerics or raised."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = harness.machine_info(device)
    rows = run(device)
    hbm = harness.hbm_bandwidth(device) if device.type == "cuda" else None  # cached: measured once in run()
    if device.type == "cuda":
        with harness.tf32_mode(True):
            info["benchmark_tf32_settings"] = harness.tf32_settings()  # what the float32 rows ran with
    report_notes = notes(device, hbm, rows)
    table = format_table(rows)
    if args.out:
        write_report_folder(args.out, title, info=info, hbm=hbm, quick=args.quick, notes=report_notes, rows=rows,
                            table=table)
    return print_report(name, device, info, report_notes, table, rows, args.out)
