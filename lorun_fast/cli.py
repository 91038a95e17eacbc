"""The command line: ``python -m lorun_fast <command>`` or ``lorun-fast <command>``.

Commands: ``train``, ``eval``, ``restore``, ``describe`` (``--help`` on each). Multi-process training:
``torchrun --nproc_per_node N -m lorun_fast train ...``.
"""
from __future__ import annotations

import argparse
import csv
import io as _io
import json
import sys
from pathlib import Path

import torch

__all__ = ["main", "build_parser"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class CLIError(Exception):
    """A usage error with a message for the user (exit status 2)."""


def _device(name: str | None) -> str:
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return device


def _add_task_options(parser, default_ratio=None) -> None:
    group = parser.add_argument_group("CS task (sampling matrix)")
    group.add_argument("--ratio", type=int, default=default_ratio,
                       help="CS ratio in percent: ISTA-Net's phi_0_<ratio>_1089.mat and Initialization_Matrix_<ratio>"
                            ".mat under $LORUN_DATA/cs_sampling" + (f" (default {default_ratio})" if default_ratio
                                                                    else "; default: what the checkpoint records"))
    group.add_argument("--phi", help="sampling matrix .mat (key 'phi', m × 1089) instead of --ratio")
    group.add_argument("--qinit", help="initialisation matrix .mat (key 'Qinit', 1089 × m); default Φᵀ")


def _operator(args, checkpoint=None, adapters=None):
    """The operator from --phi/--qinit, --ratio, or the task the checkpoint records."""
    from lorun_fast.checkpoints import task_of
    from lorun_fast.reference import BlockCS
    from lorun_fast.train import operator_from_task

    if args.phi is not None:
        return BlockCS.from_mat(args.phi, args.qinit)
    if args.qinit is not None:
        raise CLIError("--qinit needs --phi")
    if args.ratio is not None:
        return operator_from_task({"ratio": args.ratio})
    for path in (adapters, checkpoint):
        task = task_of(path) if path is not None else None
        if task is not None:
            return operator_from_task(task)
    raise CLIError(f"{args.command}: give --phi (and optionally --qinit), or --ratio to use the shared ISTA-Net files "
                   f"(the checkpoint does not record its task)")


def _check_sources(args) -> None:
    """Fail early (before any matrix is read) on a checkpoint/adapters pair that cannot work."""
    adapters = getattr(args, "adapters", None)
    if adapters is not None and args.checkpoint and Path(args.checkpoint).suffix != ".safetensors":
        raise CLIError(f"--checkpoint {args.checkpoint}: --adapters needs a lorun_fast base (.safetensors), not a "
                       f"published pickle")
    for name in ("checkpoint", "adapters"):
        path = getattr(args, name, None)
        if path is not None and not Path(path).is_file():
            raise CLIError(f"--{name} {path}: file not found")


def _load(args, operator):
    from lorun_fast.checkpoints import load_model

    return load_model(args.checkpoint, operator, getattr(args, "adapters", None))


def _write_csv(path: Path, results) -> None:
    from lorun_fast.io import atomic_write_text

    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "height", "width", "psnr_db", "ssim", "seconds"])
    for r in results:
        writer.writerow([r.name, r.height, r.width, f"{r.psnr:.4f}", f"{r.ssim:.6f}", f"{r.seconds:.4f}"])
    atomic_write_text(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from lorun_fast.evaluate import evaluate_folder, format_table, mean_scores
    from lorun_fast.io import list_images

    device = _device(args.device)
    _check_sources(args)
    list_images(args.images)  # a bad folder fails before the model is built
    model = _load(args, _operator(args, args.checkpoint, args.adapters))
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


# ----------------------------------------------------------------------------------------------------------------
# restore
# ----------------------------------------------------------------------------------------------------------------
def cmd_restore(args) -> int:
    import time

    import numpy as np

    from lorun_fast.evaluate import ista_pad, reconstruct_cs
    from lorun_fast.io import read_gray, write_png_atomic
    from lorun_fast.metrics import psnr, ssim

    if (args.image is None) == (args.measurement is None):
        raise CLIError("restore: give exactly one of --image (an image to measure and reconstruct) or "
                       "--measurement (a .npy of block measurements)")
    if Path(args.out).suffix.lower() != ".png":
        raise CLIError(f"--out {args.out}: expected a .png file name")
    _check_sources(args)
    device = _device(args.device)
    dtype = DTYPES[args.dtype]
    original = read_gray(args.image) if args.image else None
    reference = read_gray(args.original) if args.original else original
    model = _load(args, _operator(args, args.checkpoint, args.adapters)).to(device=device, dtype=dtype).eval()
    operator = model.operator
    start = time.perf_counter()
    if original is not None:
        x_rec = reconstruct_cs(model, original, device, dtype)
        if args.save_measurement:
            padded = ista_pad(original.astype(np.float64) / 255.0, operator.block_size)
            with torch.no_grad():
                y = operator.A(torch.from_numpy(padded).to(device=device, dtype=dtype)[None, None])
            _save_npy(args.save_measurement, y[0, 0].float().cpu().numpy())
    else:
        y = _load_measurement(args.measurement, operator)
        hp, wp = y.shape[2] * operator.block_size, y.shape[3] * operator.block_size
        size = tuple(args.size) if args.size else (hp, wp)
        if not (0 < size[0] <= hp and 0 < size[1] <= wp):
            raise CLIError(f"--size {size[0]} {size[1]}: the measurement covers {hp}×{wp} pixels")
        with torch.no_grad():
            x = model(y.to(device=device, dtype=dtype), (hp, wp))
        x_rec = np.clip(x[0, 0, :size[0], :size[1]].double().cpu().numpy(), 0.0, 1.0)
    seconds = time.perf_counter() - start
    write_png_atomic(args.out, x_rec)
    print(f"reconstruction ({x_rec.shape[0]}x{x_rec.shape[1]}, CS ratio {operator.ratio:.4f}) written to {args.out} "
          f"in {seconds:.2f} s")
    if reference is not None:
        if reference.shape != x_rec.shape:
            raise CLIError(f"--original: {reference.shape[0]}x{reference.shape[1]} does not match the "
                           f"reconstruction {x_rec.shape[0]}x{x_rec.shape[1]}")
        ref = reference.astype(np.float64)
        print(f"PSNR {psnr(x_rec * 255.0, ref):.2f} dB, SSIM {ssim(x_rec * 255.0, ref):.4f}")
    return 0


def _save_npy(path, array) -> None:
    import numpy as np

    from lorun_fast.io import atomic_write_bytes

    buffer = _io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())
    print(f"measurement {tuple(array.shape)} written to {path}")


def _load_measurement(path, operator) -> torch.Tensor:
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--measurement: {path} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"--measurement: {path} is not a readable .npy file ({err})") from err
    y = torch.from_numpy(np.asarray(array, dtype=np.float64))
    if y.dim() == 3:
        y = y[None, None]
    if y.dim() != 5 or y.shape[-1] != operator.num_measurements:
        raise ValueError(f"--measurement: {path} has shape {tuple(array.shape)}; expected (Hb, Wb, "
                         f"{operator.num_measurements}) block measurements for this Φ")
    return y


# ----------------------------------------------------------------------------------------------------------------
# describe
# ----------------------------------------------------------------------------------------------------------------
def _stages_text(per_stage: list[int]) -> str:
    if len(set(per_stage)) == 1:
        return f"{per_stage[0]:,} × {len(per_stage)}"
    return ", ".join(f"{n:,}" for n in per_stage)


def _describe_rows(rows: list[tuple[str, dict]]) -> str:
    block_total = next((c["total"] for name, c in rows if name.startswith("block")), None)
    lines = [f"{'model':<22}{'total':>12}{'trainable':>12}{'shared':>12}  {'per stage':<22}{'vs block':>9}"]
    for name, c in rows:
        share = f"{100 * c['total'] / block_total:.1f}%" if block_total else ""
        lines.append(f"{name:<22}{c['total']:>12,}{c['trainable']:>12,}{c['shared']:>12,}  "
                     f"{_stages_text(c['per_stage']):<22}{share:>9}")
    return "\n".join(lines)


def cmd_describe(args) -> int:
    from lorun_fast.models import ModelConfig, build_dun, lorun_from
    from lorun_fast.reference import BlockCS

    operator = BlockCS.gaussian(0.1)  # parameter counts do not depend on Φ
    _check_sources(args)
    if args.checkpoint:
        from lorun_fast.checkpoints import load_model

        model = load_model(args.checkpoint, operator, args.adapters)
        counts = model.parameter_counts()
        name = f"{model.strategy} ({model.num_stages} stages)"
        if args.json:
            print(json.dumps({"model": name, "config": model.config.to_dict(), **counts}))
        else:
            print(f"{args.checkpoint}: {model.config.backbone} {model.config.backbone_kwargs}")
            print(_describe_rows([(name, counts)]))
            print("per stage: " + ", ".join(f"{k}: {n:,}" for k, n in enumerate(counts["per_stage"])))
        return 0
    if args.adapters:
        raise CLIError("describe: --adapters needs --checkpoint (the base)")
    kwargs = {"channels": args.channels or (32 if args.backbone == "ista_net_plus" else 16)}
    if args.backbone == "resunet":
        kwargs["num_blocks"] = 1 if args.blocks is None else args.blocks
    elif args.blocks is not None:
        raise CLIError("--blocks: only the resunet backbone has residual blocks")
    targets = tuple(args.targets.split(","))
    per_stage = tuple(s for s in (args.per_stage or "").split(",") if s)
    rows = []
    for strategy in ("block", "shared"):
        config = ModelConfig(strategy=strategy, num_stages=args.stages, backbone=args.backbone,
                             backbone_kwargs=kwargs)
        rows.append((strategy, build_dun(operator, config).parameter_counts()))
    shared = build_dun(operator, ModelConfig(strategy="shared", num_stages=args.stages, backbone=args.backbone,
                                             backbone_kwargs=kwargs))
    lorun = lorun_from(shared, rank=args.rank, gamma=args.gamma, alpha=args.alpha, targets=targets,
                       per_stage=per_stage)
    rows.append(("lorun", lorun.parameter_counts()))
    if args.json:
        print(json.dumps([{"model": name, **counts} for name, counts in rows]))
        return 0
    rule = f"rank {args.rank}" if args.rank else f"γ = {args.gamma:g}"
    print(f"{args.backbone} {kwargs}, {args.stages} stages, LoRA {rule} on {list(targets)}"
          + (f", per-stage {list(per_stage)}" if per_stage else ""))
    print(_describe_rows(rows))
    print("lorun: 'trainable' is phase 2 (adapters, step sizes and per-stage parameters; the base is frozen)")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------------
def _train_config(args):
    from lorun_fast.train import TrainConfig

    kwargs = {}
    if args.backbone == "resunet":
        kwargs = {"channels": args.channels or 16, "num_blocks": 1 if args.blocks is None else args.blocks}
    else:
        if args.blocks is not None:
            raise CLIError("--blocks: only the resunet backbone has residual blocks")
        kwargs = {"channels": args.channels or 32}
    return TrainConfig(
        strategy=args.strategy, num_stages=args.stages, backbone=args.backbone, backbone_kwargs=kwargs,
        rank=args.rank, gamma=args.gamma, alpha=args.alpha, targets=args.targets.split(","),
        per_stage=[s for s in (args.per_stage or "").split(",") if s],
        ratio=args.ratio, phi=args.phi, qinit=args.qinit, gaussian_seed=args.gaussian,
        base=args.base, base_phase=args.base_phase, steps=args.steps, phase1_steps=args.phase1_steps,
        train_images=args.train_images, val_images=args.val_images, val_every=args.val_every,
        val_limit=args.val_limit, crop=args.crop, batch_size=args.batch_size, augment=not args.no_augment,
        lr=args.lr, lr_phase2=args.lr_phase2, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip or None, seed=args.seed,
        precision=args.precision, backend=args.backend, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, adapter_name=args.adapter_name)


def cmd_train(args) -> int:
    from lorun_fast.train import TrainConfig, run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a folder")
    existing = (out / "config.json").is_file() or (out / "last.json").is_file()
    if existing and not args.resume:
        raise CLIError(f"--out {out}: already holds a training run; pass --resume to continue it, or choose "
                       f"another folder")
    if args.resume and (out / "config.json").is_file() and (out / "last.json").is_file():
        try:
            config = TrainConfig.from_dict(json.loads((out / "config.json").read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"resume: {out / 'config.json'} is corrupt ({err})") from err
        last = json.loads((out / "last.json").read_text(encoding="utf-8"))
        print(f"resuming {out} at step {last.get('step')} of {config.steps} with its saved config.json "
              f"(model, data and optimiser options on this command line are not used)", file=sys.stderr)
    else:
        config = _train_config(args)
        for name, path, folder in (("--train-images", config.train_images, True),
                                   ("--val-images", config.val_images, True), ("--base", config.base, False)):
            if path is not None and not (Path(path).is_dir() if folder else Path(path).is_file()):
                raise CLIError(f"{name} {path}: {'folder' if folder else 'file'} not found")
    trainer, summary = run_training(config, out, device=_device(args.device), resume=args.resume,
                                    stop_at=args.stop_at, quiet=args.quiet, install_signal_handlers=True)
    if trainer.rank != 0:
        return 0
    if summary is None:
        print(f"stopped at step {trainer.step} of {config.steps}; checkpoint saved in {out} "
              f"(continue with: lorun-fast train --out {out} --resume)", file=sys.stderr)
        return 130 if trainer.stop_requested else 0
    counts = summary["parameters"]
    print(f"done: {config.strategy}, {summary['steps']} steps in {summary['train_seconds']:.1f} s of training; "
          f"{counts['total']:,} parameters ({counts['trainable']:,} trained last)")
    if summary.get("last_val"):
        print(f"validation: PSNR {summary['last_val']['psnr']:.2f} dB, SSIM {summary['last_val']['ssim']:.4f}")
    print(f"files in {out}: {', '.join(summary['files'])}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# the parser
# ----------------------------------------------------------------------------------------------------------------
def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected > 0, got {text}")
        return value
    return parse


def _add_model_source(parser, required=True) -> None:
    parser.add_argument("--checkpoint", required=required,
                        help="a lorun_fast .safetensors (model or base) or a published ISTA-Net+ net_params_*.pkl")
    parser.add_argument("--adapters", help="an adapters-<name>.safetensors set to put on the base in --checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorun-fast", description="LoRA-unfolding networks for block compressive "
                                     "sensing: train, evaluate, restore, describe. Data is found through LORUN_DATA "
                                     "(default ../shared/data).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,restore,describe}")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    # -- train ---------------------------------------------------------------------------------------------------
    tr = commands.add_parser(
        "train", help="train a block, shared or lorun DUN (two phases for lorun)", formatter_class=fmt,
        description="Train a DUN for block CS on random crops of an image folder (measured on the fly with Φ). "
                    "lorun: phase 1 trains the weight-tied (shared) DUN for --phase1-steps (or takes --base), phase 2 "
                    "freezes it and trains per-stage LoRA adapters and step sizes. Checkpoints go to --out; Ctrl-C "
                    "saves one, and --resume continues exactly where it stopped. Multi-process: "
                    "torchrun --nproc_per_node N -m lorun_fast train ...")
    tr.add_argument("--out", required=True, help="run folder (config, log.jsonl, checkpoints, final files)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                    "with its saved config.json (starts fresh when there is none)")
    g = tr.add_argument_group("model")
    g.add_argument("--strategy", choices=("block", "shared", "lorun"), default="lorun")
    g.add_argument("--stages", type=_positive(int), default=9, help="number of DUN stages K")
    g.add_argument("--backbone", choices=("resunet", "ista_net_plus"), default="resunet")
    g.add_argument("--channels", type=_positive(int), help="width c (resunet: [c,2c,4c,8c]; default 16, "
                   "ista_net_plus 32)")
    g.add_argument("--blocks", type=int, help="resunet residual blocks per level (default 1)")
    g.add_argument("--rank", type=_positive(int), help="LoRA rank of every layer (default: the γ rule)")
    g.add_argument("--gamma", type=float, default=10.0, help="rank rule r = ceil(min(in, out)·γ/100)")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, so the scale is 1)")
    g.add_argument("--targets", default="*", help="comma-separated globs of the convolutions given adapters")
    g.add_argument("--per-stage", help="comma-separated base parameters made per stage in phase 2 (e.g. soft_thr)")
    g = tr.add_argument_group("CS task")
    g.add_argument("--ratio", type=int, default=25, help="CS ratio in percent (ISTA-Net's matrices unless --gaussian)")
    g.add_argument("--phi", help="sampling matrix .mat instead of the ratio's")
    g.add_argument("--qinit", help="initialisation matrix .mat for --phi")
    g.add_argument("--gaussian", type=int, metavar="SEED", help="use a seeded Gaussian Φ at --ratio (no files)")
    g = tr.add_argument_group("lorun phases")
    g.add_argument("--base", help="phase 1 given: a .safetensors shared/base/lorun DUN, or a block model (e.g. a "
                   "published ISTA-Net+ .pkl) with --base-phase")
    g.add_argument("--base-phase", type=int, help="which stage of a block --base is the shared base")
    g.add_argument("--steps", type=_positive(int), default=1000, help="optimizer steps in all (lorun: both phases)")
    g.add_argument("--phase1-steps", type=int, help="lorun: steps of phase 1 (default half of --steps)")
    g = tr.add_argument_group("data")
    g.add_argument("--train-images", help="training image folder (default $LORUN_DATA/Train400)")
    g.add_argument("--val-images", help="held-out folder validated with the ISTA-Net protocol every --val-every")
    g.add_argument("--val-every", type=int, default=0, help="validate every N steps and at the end (0: never)")
    g.add_argument("--val-limit", type=_positive(int), help="validate on the first N images only")
    g.add_argument("--crop", type=_positive(int), default=66, help="square crop size (any; padded to 33-blocks)")
    g.add_argument("--batch-size", type=_positive(int), default=8, help="global batch (split over processes)")
    g.add_argument("--no-augment", action="store_true", help="no random flips/rotations")
    g = tr.add_argument_group("optimisation")
    g.add_argument("--lr", type=_positive(float), default=1e-3, help="Adam learning rate (phase 1)")
    g.add_argument("--lr-phase2", type=_positive(float), help="lorun phase 2 learning rate (default --lr)")
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="cosine floor as a fraction of the lr")
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up steps per phase")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the data")
    g.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: autocast of the forward pass")
    g.add_argument("--backend", choices=("auto", "reference", "merged", "triton"), default="auto",
                   help="LoRA layers in phase 2: fused (auto: triton on CUDA, merged on CPU) or peft's reference")
    g = tr.add_argument_group("run")
    g.add_argument("--log-every", type=_positive(int), default=10, help="log.jsonl train events every N steps")
    g.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps (0: only at phase "
                   "ends, on stop and at the end)")
    g.add_argument("--adapter-name", help="name of the adapter set file (default cs<ratio>)")
    g.add_argument("--stop-at", type=_positive(int), help="save a checkpoint and stop at this step (resume later)")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--threads", type=_positive(int), help="torch CPU threads")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    # -- eval ----------------------------------------------------------------------------------------------------
    ev = commands.add_parser("eval", help="evaluate a checkpoint on an image folder (ISTA-Net block-CS protocol)",
                             description="Evaluate a DUN checkpoint (lorun_fast .safetensors — a model, or a base with "
                             "--adapters — or a published ISTA-Net+ .pkl) on an image folder: per-image PSNR/SSIM "
                             "table and the mean; with --out, reconstructions as PNG and results.csv.")
    _add_model_source(ev)
    ev.add_argument("--images", required=True, help="folder of test images (e.g. $LORUN_DATA/Set11)")
    _add_task_options(ev)
    ev.add_argument("--out", help="folder for reconstructions (PNG) and results.csv")
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    # -- restore -------------------------------------------------------------------------------------------------
    rs = commands.add_parser("restore", help="measure one image with Φ, reconstruct it, write a PNG",
                             description="One image in → block-CS measurement (ISTA-Net protocol) → reconstruction → "
                             "PNG out, with PSNR/SSIM against the original. Or reconstruct a saved measurement "
                             "(--measurement y.npy of shape (Hb, Wb, m)); PSNR then needs --original.")
    _add_model_source(rs)
    rs.add_argument("--image", help="the original image to measure and reconstruct")
    rs.add_argument("--measurement", help="a .npy of block measurements (Hb, Wb, m) instead of --image")
    rs.add_argument("--size", type=_positive(int), nargs=2, metavar=("H", "W"),
                    help="with --measurement: crop the reconstruction to H×W")
    rs.add_argument("--original", help="reference image for PSNR/SSIM (default: --image)")
    rs.add_argument("--out", required=True, help="the reconstruction (.png)")
    rs.add_argument("--save-measurement", help="also save the simulated measurement as .npy")
    _add_task_options(rs)
    rs.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    rs.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    rs.set_defaults(func=cmd_restore)

    # -- describe ------------------------------------------------------------------------------------------------
    ds = commands.add_parser("describe", help="parameter counts per strategy and per stage", formatter_class=fmt,
                             description="Parameter counts (total, trainable, shared, per stage) of the block, shared "
                             "and lorun strategies for a backbone, or of one checkpoint (--checkpoint [--adapters]).")
    _add_model_source(ds, required=False)
    ds.add_argument("--backbone", choices=("resunet", "ista_net_plus"), default="resunet")
    ds.add_argument("--channels", type=_positive(int), help="width (default 16 for resunet, 32 for ista_net_plus)")
    ds.add_argument("--blocks", type=int, help="resunet residual blocks per level (default 1)")
    ds.add_argument("--stages", type=_positive(int), default=9)
    ds.add_argument("--rank", type=_positive(int), help="LoRA rank (default: the γ rule)")
    ds.add_argument("--gamma", type=float, default=10.0)
    ds.add_argument("--alpha", type=float)
    ds.add_argument("--targets", default="*")
    ds.add_argument("--per-stage", help="comma-separated base parameters made per stage (e.g. soft_thr)")
    ds.add_argument("--json", action="store_true", help="print JSON")
    ds.set_defaults(func=cmd_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
