"""The command line: ``python -m lorun_fast <command>`` or ``lorun-fast <command>``."""
from __future__ import annotations

import argparse
import csv
import io as _io
import sys
from pathlib import Path

import torch

__all__ = ["main", "build_parser"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _cs_operator(args):
    from lorun_fast.io import data_root
    from lorun_fast.reference import BlockCS

    phi, qinit = args.phi, args.qinit
    if phi is None:
        if args.ratio is None:
            raise SystemExit("eval: give --phi (and optionally --qinit), or --ratio to use the shared ISTA-Net files")
        folder = data_root() / "cs_sampling"
        phi = folder / f"phi_0_{args.ratio}_1089.mat"
        candidate = folder / f"Initialization_Matrix_{args.ratio}.mat"
        qinit = qinit if qinit is not None else (candidate if candidate.is_file() else None)
    return BlockCS.from_mat(phi, qinit)


def _write_csv(path: Path, results) -> None:
    from lorun_fast.io import atomic_write_text

    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "height", "width", "psnr_db", "ssim", "seconds"])
    for r in results:
        writer.writerow([r.name, r.height, r.width, f"{r.psnr:.4f}", f"{r.ssim:.6f}", f"{r.seconds:.4f}"])
    atomic_write_text(path, buffer.getvalue())


def cmd_eval(args) -> int:
    from lorun_fast.checkpoints import load_any_dun
    from lorun_fast.evaluate import evaluate_folder, format_table, mean_scores

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_any_dun(args.checkpoint, _cs_operator(args))
    out = Path(args.out) if args.out else None
    results = evaluate_folder(model, args.images, out_dir=out, device=device, dtype=DTYPES[args.dtype],
                              progress=not args.quiet)
    print(format_table(results))
    if out is not None:
        _write_csv(out / "results.csv", results)
        print(f"reconstructions and results.csv written to {out}")
    mean_psnr, mean_ssim = mean_scores(results)
    print(f"mean PSNR {mean_psnr:.2f} dB, mean SSIM {mean_ssim:.4f} over {len(results)} images")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorun-fast", description="LoRA-unfolding networks: evaluate, train, "
                                     "restore. Data is found through LORUN_DATA (default ../shared/data).")
    commands = parser.add_subparsers(dest="command", required=True)

    ev = commands.add_parser("eval", help="evaluate a DUN checkpoint with the ISTA-Net block-CS protocol",
                             description="Evaluate a DUN checkpoint (lorun_fast .safetensors or a published "
                             "ISTA-Net+ .pkl) on an image folder: per-image PSNR/SSIM table and the mean.")
    ev.add_argument("--checkpoint", required=True, help="a .safetensors DUN or an ISTA-Net+ net_params_*.pkl")
    ev.add_argument("--images", required=True, help="folder of test images (e.g. $LORUN_DATA/Set11)")
    ev.add_argument("--phi", help="sampling matrix .mat (key 'phi', m × 1089)")
    ev.add_argument("--qinit", help="initialisation matrix .mat (key 'Qinit', 1089 × m); default Φᵀ")
    ev.add_argument("--ratio", type=int, help="use the shared ISTA-Net matrices for this ratio (10, 25, 40, ...)")
    ev.add_argument("--out", help="folder for reconstructions (PNG) and results.csv")
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
