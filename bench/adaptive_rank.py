"""PSNR against adapter parameters: LoRun adapter sets at their trained rank and compressed by ``compress``.

    python bench/adaptive_rank.py --images $LORUN_DATA/Set11 --out DIR \
        --run "γ=10:runs/lorun_ista/base.safetensors:runs/lorun_ista/adapters-cs25.safetensors" \
        --run "γ=50:runs/g50/base.safetensors:runs/g50/adapters-cs25.safetensors" \
        --energies 0.999,0.99,0.95,0.9,0.8,0.6 --budgets 20000,40000 --budgets-of "γ=10"

For every ``--run LABEL:BASE:ADAPTERS`` it evaluates the adapter set as trained, then compressed to each energy
(``compress --energy``), to each of ``--budgets`` (``compress --budget``) and, with ``--budgets-of LABEL``, to
that run's LoRA parameter count (the same parameters as a trained low-rank set, spent where the spectrum says), all on
the block-CS protocol of ``eval`` with the operator the adapter file records. Writes ``results.json``, ``table.md``
and ``psnr_vs_params.png`` to ``--out`` (a new or empty folder); the compressed files go to ``--out/adapters``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lorun_fast.checkpoints import load_lorun, task_of
from lorun_fast.compress import compress_file, file_spectra, lora_parameters
from lorun_fast.evaluate import evaluate_folder, mean_scores
from lorun_fast.reference import lora_layers
from lorun_fast.tasks.cs import operator_from_task


def _lora_parameters(adapters: Path) -> int:
    return lora_parameters(file_spectra(adapters)[3])


def _evaluate(label: str, setting: str, base: Path, adapters: Path, images: Path, summary: dict | None) -> dict:
    task = task_of(adapters)
    if task is None:
        raise ValueError(f"{adapters}: records no task; this benchmark needs the adapter file's Φ")
    model = load_lorun(base, adapters, operator_from_task(task))
    start = time.perf_counter()
    psnr, ssim = mean_scores(evaluate_folder(model, images))
    counts = model.parameter_counts()
    ranks = [layer.ranks for layer in lora_layers(model)]
    row = {"run": label, "setting": setting, "adapters": adapters.name, "psnr": psnr, "ssim": ssim,
           "lora_parameters": (_lora_parameters(adapters) if summary is None
                               else summary["lora_parameters_after"]),
           "adapter_parameters": counts["trainable"],
           "mean_rank": sum(map(sum, ranks)) / sum(map(len, ranks)),
           "eval_seconds": time.perf_counter() - start}
    if summary is not None:
        row["min_energy_kept"] = summary["min_energy_kept"]
        row["frobenius_error"] = summary["frobenius_error"]
    print(f"{label:>8} {setting:>16}: {row['lora_parameters']:>8,} LoRA params, mean rank {row['mean_rank']:.2f}, "
          f"PSNR {psnr:.2f} dB, SSIM {ssim:.4f}", flush=True)
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| run | setting | LoRA parameters | adapter set (with ρ, θ) | mean rank | min energy kept | PSNR (dB) "
             "| SSIM |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        energy = f"{r['min_energy_kept']:.4f}" if "min_energy_kept" in r else "1 (as trained)"
        lines.append(f"| {r['run']} | {r['setting']} | {r['lora_parameters']:,} | {r['adapter_parameters']:,} | "
                     f"{r['mean_rank']:.2f} | {energy} | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = sorted((r for r in rows if r["run"] == run and r["setting"].startswith(("energy", "trained"))),
                      key=lambda r: r["lora_parameters"])
        (line,) = ax.plot([r["lora_parameters"] for r in mine], [r["psnr"] for r in mine], "o-",
                          label=f"{run}: energy sweep")
        trained = [r for r in mine if r["setting"] == "trained"]
        ax.plot([r["lora_parameters"] for r in trained], [r["psnr"] for r in trained], "k*", markersize=12)
        budget = [r for r in rows if r["run"] == run and r["setting"].startswith("budget")]
        if budget:
            ax.plot([r["lora_parameters"] for r in budget], [r["psnr"] for r in budget], "s",
                    color=line.get_color(), markerfacecolor="none", markersize=8, label=f"{run}: budget")
    ax.set_xscale("log")
    ax.set_xlabel("LoRA parameters (A and B, all layers and stages)")
    ax.set_ylabel("mean PSNR (dB)")
    ax.set_title(title + " (★ as trained)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL:BASE:ADAPTERS",
                        help="a trained adapter set and its base (repeat for several)")
    parser.add_argument("--images", required=True, help="the evaluation images (e.g. Set11)")
    parser.add_argument("--out", required=True, help="a new or empty folder for the results")
    parser.add_argument("--energies", default="0.999,0.99,0.95,0.9,0.8,0.6",
                        help="comma-separated energies to compress to")
    parser.add_argument("--budgets", default="", help="comma-separated LoRA parameter budgets to compress every run "
                        "to (those below a run's rank-1 floor or above its own count are skipped)")
    parser.add_argument("--budgets-of", action="append", default=[], metavar="LABEL",
                        help="compress the other runs to this run's LoRA parameter count")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    runs = []
    for text in args.run:
        parts = text.split(":")
        if len(parts) != 3:
            parser.error(f"--run {text}: expected LABEL:BASE:ADAPTERS")
        runs.append((parts[0], Path(parts[1]), Path(parts[2])))
    labels = [label for label, _, _ in runs]
    for label in args.budgets_of:
        if label not in labels:
            parser.error(f"--budgets-of {label}: not one of the runs {labels}")
    try:
        energies = [float(e) for e in args.energies.split(",") if e]
    except ValueError:
        parser.error(f"--energies {args.energies}: expected comma-separated numbers")
    if not all(0 < e <= 1 for e in energies):
        parser.error(f"--energies {args.energies}: each must be in (0, 1]")
    try:
        budgets = [int(b) for b in args.budgets.split(",") if b]
    except ValueError:
        parser.error(f"--budgets {args.budgets}: expected comma-separated ints")
    args.budgets = budgets
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"--out {out}: expected a new or empty folder")
    return args, runs, energies, out


def main(argv=None) -> int:
    args, runs, energies, out = parse_args(argv)
    torch.set_num_threads(args.threads)
    images = Path(args.images)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, base, adapters in runs:
        rows.append(_evaluate(label, "trained", base, adapters, images, None))
        for energy in energies:
            target = out / "adapters" / f"{label}-energy-{energy:g}.safetensors"
            summary = compress_file(adapters, target, energy=energy)
            rows.append(_evaluate(label, f"energy {energy:g}", base, target, images, summary))
        items = file_spectra(adapters)[3]
        floor, own = lora_parameters(items, {(s.layer, s.stage): 1 for s in items}), lora_parameters(items)
        budgets = [(b, f"budget {b:,}") for b in args.budgets if floor <= b < own]
        budgets += [(_lora_parameters(next(a for lab, _, a in runs if lab == other)), f"(= {other})")
                    for other in args.budgets_of if other != label]
        for budget, name in budgets:
            name = name if name.startswith("budget") else f"budget {budget:,} {name}"
            target = out / "adapters" / f"{label}-budget-{budget}.safetensors"
            if target.exists():
                continue
            summary = compress_file(adapters, target, budget=budget)
            rows.append(_evaluate(label, name, base, target, images, summary))
    (out / "results.json").write_text(json.dumps({"images": str(images), "rows": rows}, indent=1))
    (out / "table.md").write_text(_table(rows) + "\n")
    _plot(rows, out / "psnr_vs_params.png", f"{images.name}: PSNR vs LoRA parameters")
    print(_table(rows))
    print(f"written: {out / 'results.json'}, {out / 'table.md'}, {out / 'psnr_vs_params.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
