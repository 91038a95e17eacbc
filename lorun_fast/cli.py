"""The command line: ``python -m lorun_fast <command>`` or ``lorun-fast <command>``.

Commands: ``train``, ``eval``, ``restore``, ``describe``, ``compress`` (``--help`` on each). Multi-process training:
``torchrun --nproc_per_node N -m lorun_fast train ...``.

Why one module of ~1,400 lines: the commands share the model-source options (checkpoint, adapters, task,
method), the output-safety checks, the interrupt handling and the error reporting, and most of a command is
argument checking in terms of its own options; split per command, those shared pieces would be imported back by
every part. Each command is one section (``# eval``, ``# restore``, ``# describe``, ``# compress``, ``# train``,
then the parser).
"""
from __future__ import annotations

import argparse
import csv
import io as _io
import json
import math
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

# torch is imported inside the commands, not here: the CLI must start, and answer Ctrl-C, before torch has loaded.
# The choices come from modules that import nothing heavy.
from lorun_fast.names import BACKBONE_NAMES, DEGRADATIONS, PRECISIONS, SR_SCALES, STRATEGIES, TRAIN_BACKENDS
from lorun_fast.tasks import TASK_NAMES

__all__ = ["main", "build_parser", "add_model_options"]

DTYPES = ("bfloat16", "float32", "float64")


class CLIError(Exception):
    """A usage error with a message for the user (exit status 2)."""


#: What :func:`main` reports as ``error: <message>`` with exit status 2: the command's own usage errors, files that
#: cannot be read or written, values the library refuses (ValueError; a .mat file without the expected key raises
#: ``MissingKeyError``, a ValueError too) and a training or reconstruction that went non-finite. Anything else (a
#: TypeError, a KeyError, ...) is a bug and surfaces as a traceback.
USER_ERRORS = (CLIError, OSError, ValueError, FloatingPointError)


#: Set by the command line's own Ctrl-C handler (:func:`install_interrupt_handler`): a library may catch and drop
#: the KeyboardInterrupt raised inside its import, so the commands also look at this before their work starts.
INTERRUPTED = threading.Event()


def install_interrupt_handler() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered in :data:`INTERRUPTED`."""
    def on_interrupt(signum, frame):
        INTERRUPTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)


def _stop_if_interrupted() -> None:
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name)
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise CLIError(f"--device {name}: expected cpu, cuda or cuda:N")
    if match.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA device is available here; use --device cpu")
        index = int(match.group(2) or 0)
        if index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _add_task_options(parser) -> None:
    group = parser.add_argument_group("CS task (sampling matrix; default: what the checkpoint records)")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--ratio", type=_percent,
                        help="CS ratio in percent: ISTA-Net's phi_0_<ratio>_1089.mat and Initialization_Matrix_<ratio>"
                             ".mat under $LORUN_DATA/cs_sampling")
    source.add_argument("--phi", help="sampling matrix .mat (key 'phi', m × 1089) instead of --ratio")
    group.add_argument("--qinit", help="initialisation matrix .mat (key 'Qinit', 1089 × m); default Φᵀ")
    group.add_argument("--force-task", action="store_true",
                       help="use --ratio/--phi even where the checkpoint records another task (prints a warning)")


def _add_degradation_options(group, default_prefix: str = "default ") -> None:
    group.add_argument("--degradation", choices=DEGRADATIONS,
                       help=f"how the LR image is made: MATLAB bicubic (the SR benchmarks') or Gaussian blur + "
                            f"decimation, circular boundaries ({default_prefix}bicubic)")
    group.add_argument("--blur-sigma", type=_positive(float),
                       help=f"gaussian: the blur's σ in HR pixels ({default_prefix}1.6)")
    group.add_argument("--blur-size", type=_positive(int),
                       help=f"gaussian: the odd side of the blur kernel ({default_prefix}2·ceil(3σ) + 1)")


def _same_operator(a, b) -> bool:
    import torch

    if a.phi.shape != b.phi.shape or not torch.equal(a.phi.double(), b.phi.double()):
        return False
    if (a.qinit is None) != (b.qinit is None):
        return False
    return a.qinit is None or torch.equal(a.qinit.double(), b.qinit.double())


def _operator(args, checkpoint=None, adapters=None):
    """The operator from --phi/--qinit or --ratio, else the task the checkpoint records. A given task that
    contradicts the recorded one is refused unless --force-task."""
    from lorun_fast.checkpoints import task_of
    from lorun_fast.reference import BlockCS
    from lorun_fast.tasks.cs import operator_from_task

    if args.qinit is not None and args.phi is None:
        raise CLIError("--qinit needs --phi")
    recorded, source = None, None
    for path in (adapters, checkpoint):
        task = task_of(path) if path is not None else None
        if task is not None:
            recorded, source = task, path
            break
    given_flag = (f"--phi {args.phi}" if args.phi is not None else
                  f"--ratio {args.ratio}" if args.ratio is not None else None)
    if given_flag is None:
        if recorded is None:
            raise CLIError(f"{args.command}: give --phi (and optionally --qinit), or --ratio to use the shared ISTA-Net "
                           f"files (the checkpoint does not record its task)")
        return operator_from_task(recorded)
    given = BlockCS.from_mat(args.phi, args.qinit) if args.phi is not None else operator_from_task({"ratio": args.ratio})
    if recorded is None:
        return given
    try:
        agrees = _same_operator(given, operator_from_task(recorded))
    except (OSError, ValueError, KeyError):  # the recorded files are not here: compare what can be compared
        ratio = recorded.get("ratio") or (100 * recorded["gaussian_ratio"] if recorded.get("gaussian_ratio") else None)
        agrees = None if ratio is None else round(ratio) == round(100 * given.ratio)
    if agrees is False and not args.force_task:
        raise CLIError(f"{given_flag} contradicts {source}, which records the task {json.dumps(recorded)}; drop the "
                       f"--ratio/--phi to use the recorded one, or add --force-task to use yours anyway")
    if agrees is False:
        warnings.warn(f"{given_flag} is not the task {source} records ({json.dumps(recorded)}); using {given_flag} "
                      f"as --force-task asks")
    elif agrees is None:
        warnings.warn(f"cannot check {given_flag} against the task {source} records ({json.dumps(recorded)}): its "
                      f"files are not here")
    return given


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


def _input_files(args) -> dict:
    """Every file a command reads, by option, so that no output can land on one of them."""
    names = ("checkpoint", "adapters", "phi", "qinit", "image", "original", "measurement")
    return {f"--{name}": getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _load(args, operator):
    from lorun_fast.checkpoints import load_model

    return load_model(args.checkpoint, operator, getattr(args, "adapters", None))


RESULTS_HEADER = ["image", "height", "width", "psnr_db", "ssim", "seconds"]


def _write_csv(path: Path, results) -> None:
    from lorun_fast.io import atomic_write_text

    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    mixed = any(getattr(r, "adapters", "") for r in results)
    writer.writerow(RESULTS_HEADER + (["adapters"] if mixed else []))
    for r in results:
        writer.writerow([r.name, r.height, r.width, f"{r.psnr:.4f}", f"{r.ssim:.6f}", f"{r.seconds:.4f}"]
                        + ([r.adapters] if mixed else []))
    atomic_write_text(path, buffer.getvalue())


def _earlier_eval_files(out: Path) -> set[str]:
    """The files an earlier ``eval --out`` wrote into ``out`` (what its results.csv names), which a new evaluation
    may replace; empty when ``out`` holds no results.csv of ours."""
    try:
        rows = list(csv.reader((out / "results.csv").read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()
    if not rows or rows[0][:len(RESULTS_HEADER)] != RESULTS_HEADER:
        return set()
    return ({"results.csv"} | {f"{row[0]}.png" for row in rows[1:] if row}
            | {f"{row[0]}_spectra.png" for row in rows[1:] if row})


def _check_eval_out(args, images: list[Path], names: list[str]) -> Path:
    """Before any compute: ``--out`` is writable, is not the image folder, overwrites no input, and holds nothing
    but an earlier evaluation's own files where this one will write."""
    from lorun_fast.io import check_not_inputs, check_output_folder, same_file

    out = Path(args.out)
    for folder in args.images:
        if same_file(out, folder):
            raise CLIError(f"--out {out}: is the --images folder; reconstructions would be mixed with (or "
                           f"overwrite) the originals. Choose another folder")
    planned = {f"{name}.png": out / f"{name}.png" for name in names}
    planned["results.csv"] = out / "results.csv"
    inputs = {**_input_files(args), **{f"--images {p.name}": p for p in images}}
    for path in planned.values():
        check_not_inputs({"--out": path}, inputs)
    check_output_folder(out, planned, _earlier_eval_files(out), "--out")
    return out


# ----------------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------------
METHODS = {"cs": ("model",), "cassi": ("model", "x0", "gap-tv"), "sr": ("model", "bicubic")}


_TASK_OPTIONS = (("--ratio", "ratio", "cs"), ("--phi", "phi", "cs"), ("--qinit", "qinit", "cs"),
                 ("--force-task", "force_task", "cs"), ("--mask", "mask", "cassi"), ("--tiles", "tiles", "cassi"),
                 ("--cube-key", "cube_key", "cassi"), ("--cube-layout", "cube_layout", "cassi"),
                 ("--gap-iterations", "gap_iterations", "cassi"), ("--scale", "scale", "sr"),
                 ("--degradation", "degradation", "sr"), ("--blur-sigma", "blur_sigma", "sr"),
                 ("--blur-size", "blur_size", "sr"))


def _defaults(command: str) -> dict:
    required = {"eval": ["--images", "-"], "train": ["--out", "-"]}[command]
    return vars(build_parser().parse_args([command, *required]))


def _task_name(args) -> str:
    """--task, else the task the checkpoint records (files of CS record no name), else cs."""
    from lorun_fast.checkpoints import task_of

    recorded = None
    for path in (getattr(args, "adapters", None), getattr(args, "checkpoint", None)):
        task = task_of(path) if path is not None else None
        if task is not None:
            recorded = task.get("task", "cs")
            break
    if args.task is not None and recorded is not None and args.task != recorded:
        raise CLIError(f"--task {args.task}: the checkpoint is a {recorded} model")
    return args.task or recorded or "cs"


def _check_method_source(args) -> None:
    """A checkpoint is the model of ``--method model`` and of nothing else: refuse one the method would ignore."""
    if args.method != "model" and (args.checkpoint is not None or args.adapters is not None):
        raise CLIError(f"--method {args.method}: reconstructs without a model; drop --checkpoint/--adapters (or use "
                       f"--method model)")


def _print_results(args, results, out) -> None:
    from lorun_fast.evaluate import format_table, mean_scores

    print(format_table(results))
    if out is not None:
        _write_csv(out / "results.csv", results)
        print(f"results written to {out}")
    mean_psnr, mean_ssim = mean_scores(results)
    print(f"mean PSNR {mean_psnr:.2f} dB, mean SSIM {mean_ssim:.4f} over {len(results)} images")


def _image_paths(entries) -> list[Path]:
    """The images named by ``--images``: the images of each folder (sorted), and files as given."""
    from lorun_fast.io import IMAGE_SUFFIXES, list_images

    paths: list[Path] = []
    for entry in map(Path, entries):
        if entry.is_dir():
            paths += list_images(entry)
        elif entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(entry)
        elif entry.is_file():
            raise CLIError(f"--images {entry}: is not an image ({', '.join(IMAGE_SUFFIXES)})")
        else:
            raise CLIError(f"--images {entry}: not found")
    return paths


def _eval_cassi(args, device) -> int:
    """CASSI: simulate the measurement of each test cube with the mask, reconstruct (a model, the x0
    initialisation or GAP-TV) and score per band (TSA-Net/MST protocol)."""
    import torch

    from lorun_fast.io import check_output_folder
    from lorun_fast.reference import CASSI
    from lorun_fast.checkpoints import task_of
    from lorun_fast.io import same_file
    from lorun_fast.tasks.cassi import (DISPERSION_STEP, NUM_BANDS, cube_files, evaluate_cassi, load_mask,
                                        reconstructor)

    cubes = cube_files(args.images)
    recorded = task_of(args.checkpoint) if args.checkpoint else None
    mask = load_mask(args.mask or (recorded or {}).get("mask"))
    out = None
    if args.out:
        out = Path(args.out)
        for entry in args.images:
            if same_file(out, entry) or (Path(entry).is_file() and same_file(out, Path(entry).parent)):
                raise CLIError(f"--out {out}: holds the --images cubes; choose another folder")
        existing = [p.name for p in out.iterdir()] if out.is_dir() else []
        check_output_folder(out, existing + ["results.csv"], _earlier_eval_files(out), "--out")
    if args.method == "model":
        if args.checkpoint is None:
            raise CLIError("--method model needs --checkpoint (or use --method x0 / gap-tv)")
        operator = CASSI(torch.from_numpy(mask), NUM_BANDS, DISPERSION_STEP)
        from lorun_fast.checkpoints import load_model

        model = load_model(args.checkpoint, operator, args.adapters).to(device=device, dtype=_dtype(args.dtype))
        method = model.eval()
    else:
        method = args.method
    options = {"iterations": args.gap_iterations} if args.method == "gap-tv" else {}
    results = evaluate_cassi(reconstructor(method, **options), cubes, mask, mode=args.tiles, key=args.cube_key,
                             layout=args.cube_layout, dtype=_dtype(args.dtype), device=device, out_dir=out,
                             progress=not args.quiet,
                             on_load=lambda path, described: print(f"{path.name}: {described}", file=sys.stderr))
    _print_results(args, results, out)
    return 0


def _sr_scale(args) -> int:
    """--scale, else the scale the checkpoint records, else 4; a --scale contradicting the checkpoint is refused."""
    from lorun_fast.checkpoints import task_of

    recorded = task_of(args.checkpoint) if args.checkpoint else None
    recorded_scale = (recorded or {}).get("scale")
    if args.scale is not None and recorded_scale is not None and args.scale != recorded_scale:
        raise CLIError(f"--scale {args.scale}: {args.checkpoint} is a ×{recorded_scale} model")
    return args.scale or recorded_scale or 4


_DEGRADATION_OPTIONS = (("--degradation", "degradation"), ("--blur-sigma", "blur_sigma"), ("--blur-size", "blur_size"))


def _sr_degradation(args):
    """The degradation of the checkpoint (a --degradation/--blur-* contradicting it is refused), else the one the
    options describe (default MATLAB bicubic), at ``_sr_scale``."""
    from lorun_fast.checkpoints import task_of
    from lorun_fast.tasks.sr import SRDegradation

    scale = _sr_scale(args)
    recorded = task_of(args.checkpoint) if args.checkpoint else None
    if recorded is not None:
        found = SRDegradation.from_record(recorded)
        values = {"degradation": found.kind, "blur_sigma": found.sigma if found.kind == "gaussian" else None,
                  "blur_size": found.size if found.kind == "gaussian" else None}
        for option, dest in _DEGRADATION_OPTIONS:
            given = getattr(args, dest)
            if given is not None and given != values[dest]:
                raise CLIError(f"{option} {given}: {args.checkpoint} is a model of {found.describe()}")
        return found
    try:
        return SRDegradation(scale, args.degradation or "bicubic", args.blur_sigma, args.blur_size)
    except ValueError as err:
        raise CLIError(_option_words(str(err))) from err


def _option_words(message: str) -> str:
    """A message naming fields (``blur_sigma: ...``) spoken in options (``--blur-sigma: ...``)."""
    for option, dest in _DEGRADATION_OPTIONS:
        message = re.sub(rf"\b{dest}\b", option, message)
    return message


def _sr_model(args, degradation, device):
    return _load(args, degradation.operator()).to(device=device, dtype=_dtype(args.dtype)).eval()


def _eval_sr(args, device) -> int:
    """SR: the SR literature's protocol (MATLAB bicubic degradation, or the Gaussian one; Y channel, shave =
    scale), for the bicubic baseline or a model."""
    import time

    from lorun_fast.evaluate import ImageResult, output_names
    from lorun_fast.tasks.sr import bicubic_baseline, evaluate_sr, read_hr

    if args.method == "model" and args.checkpoint is None:
        raise CLIError("--method model needs --checkpoint (or use --method bicubic)")
    images = _image_paths(args.images)
    degradation = _sr_degradation(args)
    scale = degradation.scale
    out = None
    if args.out:
        from lorun_fast.io import check_output_folder

        out = check_output_folder(args.out, ["results.csv"], _earlier_eval_files(Path(args.out)), "--out")
    if args.method == "model":
        model = _sr_model(args, degradation, device)
        _stop_if_interrupted()
        results = evaluate_sr(model, images, scale, device, _dtype(args.dtype), progress=not args.quiet,
                              degradation=degradation)
    else:
        results = []
        for name, path in zip(output_names(images), images):
            start = time.perf_counter()
            scores = bicubic_baseline(path, scale, degradation=degradation)
            height, width = read_hr(path).shape[:2]
            results.append(ImageResult(name, height, width, scores.psnr, scores.ssim, time.perf_counter() - start))
    _print_results(args, results, out)
    return 0


def cmd_eval(args) -> int:
    from lorun_fast.evaluate import evaluate_cs, output_names

    device = _device(args.device)
    _check_sources(args)
    task = _task_name(args)
    defaults = _defaults("eval")
    foreign = [option for option, dest, owner in _TASK_OPTIONS if owner != task and getattr(args, dest) != defaults[dest]]
    if foreign:
        raise CLIError(f"{', '.join(foreign)}: not an option of the {task} task")
    if args.method not in METHODS[task]:
        raise CLIError(f"--method {args.method}: the {task} task offers {', '.join(METHODS[task])}")
    _check_method_source(args)
    if args.manifest is not None and task != "cs":
        raise CLIError(f"--manifest: mixed batches are evaluated for the cs task, not {task}")
    if task == "cassi":
        return _eval_cassi(args, device)
    if task == "sr":
        return _eval_sr(args, device)
    if args.checkpoint is None:
        raise CLIError("eval: --checkpoint is required for the cs task")
    if args.manifest is not None:
        return _eval_mixed(args, device)
    images = _image_paths(args.images)  # a bad folder fails before the model is built
    names = output_names(images)
    out = _check_eval_out(args, images, names) if args.out else None
    model = _load(args, _operator(args, args.checkpoint, args.adapters))
    _stop_if_interrupted()
    results = _evaluate_keeping_rows(
        lambda results: evaluate_cs(model, images, out_dir=out, device=device, dtype=_dtype(args.dtype),
                                    progress=not args.quiet, results=results), out, len(images))
    if results is None:
        return 130
    _print_results(args, results, out)
    return 0


def _evaluate_keeping_rows(evaluate, out, total: int):
    """``evaluate(results)``, which appends a row per finished image; on Ctrl-C the rows so far go to
    ``out/results.csv`` (the folder stays recognisably an evaluation's, so a rerun may replace it) and None is
    returned (exit status 130)."""
    results = []
    try:
        evaluate(results)
    except KeyboardInterrupt:
        if out is not None and results:
            _write_csv(out / "results.csv", results)
            print(f"interrupted after {len(results)} of {total} images; results.csv in {out} holds those",
                  file=sys.stderr)
            return None
        raise
    return results


def _eval_mixed(args, device) -> int:
    """eval --manifest: images that each name their adapter set, reconstructed in mixed batches on one base."""
    from lorun_fast.adapter_sets import AdapterSets, load_adapter_sets, read_manifest
    from lorun_fast.evaluate import evaluate_cs_mixed, mean_scores, output_names

    given = [option for option, dest in (("--adapters", "adapters"), ("--ratio", "ratio"), ("--phi", "phi"),
                                         ("--qinit", "qinit"), ("--gaussian", "gaussian"))
             if getattr(args, dest, None) is not None]
    if given:
        raise CLIError(f"{', '.join(given)}: with --manifest each set's file gives its adapters and Φ; drop "
                       f"{'them' if len(given) > 1 else 'it'}")
    if Path(args.checkpoint).suffix != ".safetensors":
        raise CLIError(f"--checkpoint {args.checkpoint}: --manifest needs the lorun_fast base (.safetensors) the "
                       f"sets were trained on")
    files, assignment = read_manifest(args.manifest)
    images = _image_paths(args.images)
    unnamed = [p.name for p in images if p.name not in assignment]
    if unnamed:
        raise CLIError(f"--manifest {args.manifest}: names no adapter set for {unnamed[:5]}"
                       f"{f' and {len(unnamed) - 5} more' if len(unnamed) > 5 else ''}")
    absent = sorted(set(assignment) - {p.name for p in images})
    if absent:
        raise CLIError(f"--manifest {args.manifest}: lists {absent[:5]}, which --images does not hold")
    names = output_names(images)
    out = _check_eval_out(args, images, names) if args.out else None
    used = sorted({assignment[p.name] for p in images})
    sets = AdapterSets(load_adapter_sets(args.checkpoint, {name: files[name] for name in used}))
    _stop_if_interrupted()
    results = _evaluate_keeping_rows(
        lambda results: evaluate_cs_mixed(sets, images, [assignment[p.name] for p in images], out_dir=out,
                                          device=device, dtype=_dtype(args.dtype), batch_size=args.batch_size,
                                          progress=not args.quiet, results=results), out, len(images))
    if results is None:
        return 130
    _print_results(args, results, out)
    for name in used:
        mine = [r for r in results if r.adapters == name]
        mean_psnr, mean_ssim = mean_scores(mine)
        print(f"  set {name}: {len(mine)} images, mean PSNR {mean_psnr:.2f} dB, mean SSIM {mean_ssim:.4f}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# restore
# ----------------------------------------------------------------------------------------------------------------
def _adapters_from_manifest(args) -> None:
    """restore --manifest: --adapters becomes the file of the set the manifest names for --image."""
    from lorun_fast.adapter_sets import read_manifest

    if args.adapters is not None:
        raise CLIError("--adapters: with --manifest the manifest names the adapter set; drop --adapters")
    if args.image is None:
        raise CLIError("--manifest: needs --image (the manifest names sets by image file name)")
    files, assignment = read_manifest(args.manifest)
    name = Path(args.image).name
    if name not in assignment:
        raise CLIError(f"--manifest {args.manifest}: names no adapter set for {name}")
    args.adapters = str(files[assignment[name]])


def cmd_restore(args) -> int:
    import time

    import numpy as np
    import torch

    from lorun_fast.evaluate import check_finite_output, check_scorable, ista_pad, reconstruct_cs
    from lorun_fast.io import check_not_inputs, check_writable_folder, read_gray, same_file, write_png_atomic
    from lorun_fast.metrics import psnr, ssim

    if args.manifest is not None:
        _adapters_from_manifest(args)
    _check_sources(args)
    task = _task_name(args)
    if args.method not in METHODS[task]:
        raise CLIError(f"--method {args.method}: restore of the {task} task offers {', '.join(METHODS[task])}")
    _check_method_source(args)
    if task == "cassi":
        return _restore_cassi(args)
    if task == "sr":
        return _restore_sr(args)
    for option, dest in (("--mask", "mask"), ("--plot", "plot"), ("--preview", "preview"), ("--scale", "scale"),
                         *_DEGRADATION_OPTIONS):
        if getattr(args, dest) is not None:
            raise CLIError(f"{option}: not an option of the cs task")
    if args.degrade:
        raise CLIError("--degrade: not an option of the cs task (an --image is always measured)")
    if args.checkpoint is None:
        raise CLIError("restore: --checkpoint is required for the cs task")
    if Path(args.out).suffix.lower() != ".png":
        raise CLIError(f"--out {args.out}: expected a .png file name")
    if args.size is not None and args.measurement is None:
        raise CLIError("--size: only with --measurement (an --image keeps its own size)")
    if args.save_measurement is not None and args.image is None:
        raise CLIError("--save-measurement: only with --image (the measurement simulated from it)")
    if args.save_measurement is not None and same_file(args.out, args.save_measurement):
        raise CLIError(f"--save-measurement {args.save_measurement}: is the --out file")
    check_not_inputs({"--out": args.out, "--save-measurement": args.save_measurement}, _input_files(args))
    for path, what in ((args.out, "--out"), (args.save_measurement, "--save-measurement")):
        if path is not None:
            if Path(path).is_dir():
                raise CLIError(f"{what} {path}: is a folder; expected a file name")
            check_writable_folder(Path(path).parent, f"{what} {path}: its folder")
    device = _device(args.device)
    dtype = _dtype(args.dtype)
    original = read_gray(args.image) if args.image else None
    reference = read_gray(args.original) if args.original else original
    if reference is not None:
        check_scorable(reference, args.original or args.image)
    if original is not None and reference is not None and reference.shape != original.shape:
        raise CLIError(f"--original {args.original}: {reference.shape[0]}x{reference.shape[1]} does not match "
                       f"--image {args.image} ({original.shape[0]}x{original.shape[1]})")
    model = _load(args, _operator(args, args.checkpoint, args.adapters)).to(device=device, dtype=dtype).eval()
    operator = model.operator
    if original is not None:
        start = time.perf_counter()
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
            raise CLIError(f"--size {size[0]} {size[1]}: the measurement {args.measurement} covers only "
                           f"{hp}×{wp} pixels")
        if reference is not None and reference.shape != size:
            raise CLIError(f"--original {args.original}: {reference.shape[0]}x{reference.shape[1]} does not match "
                           f"the reconstruction's {size[0]}x{size[1]} (set it with --size H W)")
        start = time.perf_counter()
        with torch.no_grad():
            x = model(y.to(device=device, dtype=dtype), (hp, wp))
        check_finite_output(x, f"--measurement {args.measurement}")
        x_rec = np.clip(x[0, 0, :size[0], :size[1]].double().cpu().numpy(), 0.0, 1.0)
    seconds = time.perf_counter() - start
    write_png_atomic(args.out, x_rec)
    print(f"reconstruction ({x_rec.shape[0]}x{x_rec.shape[1]}, CS ratio {operator.ratio:.4f}) written to {args.out} "
          f"in {seconds:.2f} s")
    if reference is not None:
        ref = reference.astype(np.float64)
        print(f"PSNR {psnr(x_rec * 255.0, ref):.2f} dB, SSIM {ssim(x_rec * 255.0, ref):.4f}")
    return 0


def _restore_cassi(args) -> int:
    """CASSI: a cube (measured here with the mask) or a measurement (H, W + 2·27) in → the reconstructed cube out
    (.npy as H×W×28 float32, or .mat with key 'cube'), a false-colour preview, and with the original PSNR/SSIM and,
    with --plot, the spectra at a few pixels against it."""
    import time

    import numpy as np
    import torch

    from lorun_fast.evaluate import check_finite_output
    from lorun_fast.io import atomic_write_bytes, check_not_inputs, check_writable_folder, same_file
    from lorun_fast.reference import CASSI
    from lorun_fast.tasks.cassi import (DISPERSION_STEP, NUM_BANDS, cassi_scores, false_colour_png, load_cube_28,
                                        load_mask, plot_spectra, reconstructor, tiles)

    out = Path(args.out)
    if out.suffix.lower() not in (".npy", ".mat"):
        raise CLIError(f"--out {out}: expected a .npy or .mat file name for the reconstructed cube")
    if args.size is not None:
        raise CLIError("--size: not an option of the cassi task (the cube has the mask's size)")
    if args.scale is not None or args.degrade:
        raise CLIError("--scale/--degrade: not options of the cassi task")
    for option, dest in _DEGRADATION_OPTIONS:
        if getattr(args, dest) is not None:
            raise CLIError(f"{option}: not an option of the cassi task")
    if args.method == "model" and args.checkpoint is None:
        raise CLIError("--method model needs --checkpoint (or use --method x0 / gap-tv)")
    preview = Path(args.preview) if args.preview else out.with_suffix(".png")
    outputs = {"--out": out, "--preview": preview, "--plot": args.plot, "--save-measurement": args.save_measurement}
    named = [(k, Path(v)) for k, v in outputs.items() if v is not None]
    for i, (label, path) in enumerate(named):
        for other_label, other in named[i + 1:]:
            if same_file(path, other):
                raise CLIError(f"{other_label} {other}: is the {label} file")
    if not args.preview and (preview.exists() or preview.is_symlink()):
        raise CLIError(f"--out {out}: its preview {preview} already exists; name another with --preview")
    check_not_inputs(outputs, _input_files(args))
    for label, path in named:
        if path.is_dir():
            raise CLIError(f"{label} {path}: is a folder; expected a file name")
        check_writable_folder(path.parent, f"{label} {path}: its folder")

    device, dtype = _device(args.device), _dtype(args.dtype)
    from lorun_fast.checkpoints import task_of

    recorded = task_of(args.checkpoint) if args.checkpoint else None
    mask = load_mask(args.mask or (recorded or {}).get("mask"))
    operator = CASSI(torch.from_numpy(mask), NUM_BANDS, DISPERSION_STEP).to(device=device, dtype=dtype)
    size = mask.shape[0]
    original = None
    if args.image is not None or args.original is not None:
        cube, described = load_cube_28(args.image or args.original)
        print(f"{args.image or args.original}: {described}", file=sys.stderr)
        if mask.shape[0] != mask.shape[1]:
            raise CLIError(f"--mask: {mask.shape[0]}×{mask.shape[1]} is not square")
        if cube.shape[0] < size or cube.shape[1] < size:
            raise CLIError(f"{args.image or args.original}: {cube.shape[0]}×{cube.shape[1]} is smaller than the "
                           f"{size}×{size} mask")
        if cube.shape[:2] != (size, size):
            print(f"using the centre {size}×{size} of the {cube.shape[0]}×{cube.shape[1]} cube", file=sys.stderr)
        original = tiles(cube, size, "center")[0][1]
    if args.image is not None:
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(original, -1, 0)))[None].to(device=device, dtype=dtype)
        with torch.no_grad():
            y = operator.A(x)
        if args.save_measurement:
            _save_npy(args.save_measurement, y[0].float().cpu().numpy())
    else:
        y = _load_cassi_measurement(args.measurement, operator).to(device=device, dtype=dtype)
    if args.method == "model":
        model = _load(args, operator).to(device=device, dtype=dtype).eval()
        method = model
    else:
        method = args.method
    start = time.perf_counter()
    with torch.no_grad():
        x_rec = reconstructor(method)(y, operator)
    seconds = time.perf_counter() - start
    check_finite_output(x_rec, args.measurement or args.image)
    rec = np.clip(np.moveaxis(x_rec[0].double().cpu().numpy(), 0, -1), 0.0, 1.0)
    if out.suffix.lower() == ".npy":
        _save_npy(out, rec.astype(np.float32), "cube")
    else:
        import scipy.io

        buffer = _io.BytesIO()
        scipy.io.savemat(buffer, {"cube": rec.astype(np.float32)})
        atomic_write_bytes(out, buffer.getvalue())
        print(f"cube {rec.shape} written to {out} (key 'cube')")
    false_colour_png(rec, preview)
    print(f"reconstruction ({size}x{size}x{NUM_BANDS}, {args.method}) written to {out}, preview {preview}, in "
          f"{seconds:.2f} s")
    if original is not None:
        psnr_value, ssim_value = cassi_scores(rec, original)
        print(f"PSNR {psnr_value:.2f} dB, SSIM {ssim_value:.4f} (per band, averaged over {NUM_BANDS} bands)")
        if args.plot:
            plot_spectra(rec, original, args.plot)
            print(f"spectra written to {args.plot}")
    elif args.plot:
        raise CLIError("--plot: needs the original cube (--image or --original)")
    return 0


def _read_measurement_npy(path):
    """The array of a ``--measurement`` .npy file (never unpickled), with errors naming it."""
    import numpy as np

    path = Path(path)
    if path.is_dir():
        raise CLIError(f"--measurement {path}: is a folder; expected a .npy file")
    if not path.is_file():
        raise CLIError(f"--measurement {path}: file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CLIError(f"--measurement {path}: is not a readable .npy file ({err})") from err


def _load_cassi_measurement(path, operator):
    """A CASSI measurement (H, W + step·(bands − 1)) from a .npy file, checked against the operator."""
    import numpy as np
    import torch

    array = _read_measurement_npy(path)
    expected = (operator.mask.shape[0], operator.measurement_width)
    if array.dtype.kind not in "fiu":
        raise CLIError(f"--measurement {path}: holds {array.dtype} data; expected real numbers")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != expected:
        raise CLIError(f"--measurement {path}: has shape {tuple(array.shape)}; the mask "
                       f"{tuple(operator.mask.shape)} with {operator.num_bands} bands and step {operator.step} "
                       f"measures {expected}")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise CLIError(f"--measurement {path}: holds {bad} non-finite value(s) (NaN or inf)")
    return torch.from_numpy(np.asarray(array, dtype=np.float64))[None]


def _restore_sr(args) -> int:
    """SR: an LR image (or, with --degrade, an HR image degraded here: the model's degradation, MATLAB bicubic by
    default) → the ×scale image as SR papers display it (the model's Y, bicubic Cb/Cr), with PSNR/SSIM on Y
    against the HR when it is known."""
    import time

    from lorun_fast.io import check_not_inputs, check_writable_folder
    from lorun_fast.tasks.sr import (colour_sr, modcrop, read_hr, reconstruct_y, sr_scores, upscale_bicubic,
                                     y_channel)

    if args.measurement is not None:
        raise CLIError("--measurement: the sr task takes an --image (LR, or HR with --degrade)")
    for option, dest in (("--mask", "mask"), ("--plot", "plot"), ("--preview", "preview"), ("--size", "size"),
                         ("--save-measurement", "save_measurement")):
        if getattr(args, dest) is not None:
            raise CLIError(f"{option}: not an option of the sr task")
    if args.degrade and args.original:
        raise CLIError("--original: with --degrade the --image is the original")
    if Path(args.out).suffix.lower() != ".png":
        raise CLIError(f"--out {args.out}: expected a .png file name")
    if args.method == "model" and args.checkpoint is None:
        raise CLIError("--method model needs --checkpoint (or use --method bicubic)")
    check_not_inputs({"--out": args.out}, _input_files(args))
    if Path(args.out).is_dir():
        raise CLIError(f"--out {args.out}: is a folder; expected a file name")
    check_writable_folder(Path(args.out).parent, f"--out {args.out}: its folder")
    degradation = _sr_degradation(args)
    scale = degradation.scale
    device = _device(args.device)
    image = read_hr(args.image)
    hr = None
    if args.degrade:
        hr = modcrop(image, scale)
        try:
            degradation.check_hr(hr, "--image")
        except ValueError as err:
            raise CLIError(f"--image {args.image}: {err}") from err
        lr = degradation.degrade(hr)
    else:
        lr = image
        if args.original:
            hr = modcrop(read_hr(args.original), scale)
            if (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2] or lr.ndim != hr.ndim:
                raise CLIError(f"--image {args.image}: LR {lr.shape[0]}×{lr.shape[1]} times {scale} is "
                               f"{lr.shape[0] * scale}×{lr.shape[1] * scale}, but --original {args.original} is "
                               f"{hr.shape[0]}×{hr.shape[1]} (after cropping to a multiple of {scale})"
                               + ("" if lr.ndim == hr.ndim else "; and one is gray, the other colour"))
    start = time.perf_counter()
    if args.method == "model":
        model = _sr_model(args, degradation, device)
        _stop_if_interrupted()
        sr = colour_sr(lr, reconstruct_y(model, lr, scale, device, _dtype(args.dtype)), scale)
    else:
        sr = upscale_bicubic(lr, scale)
    seconds = time.perf_counter() - start
    from lorun_fast.io import write_png_atomic

    write_png_atomic(args.out, sr)
    print(f"×{scale} {args.method} reconstruction ({sr.shape[0]}x{sr.shape[1]}) written to {args.out} in "
          f"{seconds:.2f} s")
    if hr is not None:
        scores = sr_scores(y_channel(sr), y_channel(hr), scale)
        print(f"PSNR {scores.psnr:.2f} dB, SSIM {scores.ssim:.4f} (Y channel, {scale} pixels shaved)")
    return 0


def _save_npy(path, array, what: str = "measurement") -> None:
    import numpy as np

    from lorun_fast.io import atomic_write_bytes

    buffer = _io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())
    print(f"{what} {tuple(array.shape)} written to {path}")


def _load_measurement(path, operator):
    """Block measurements (Hb, Wb, m) from a .npy file, checked to be real, finite, non-empty and of this Φ."""
    import numpy as np
    import torch

    array = _read_measurement_npy(path)
    m = operator.num_measurements
    expected = f"(Hb, Wb, {m}) block measurements for this Φ"
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        kind = getattr(array, "dtype", type(array).__name__)
        raise CLIError(f"--measurement {path}: holds {kind} data; expected real numbers, {expected}")
    shape = tuple(array.shape)
    if array.ndim == 3:
        array = array[None, None]
    if array.ndim != 5 or array.shape[-1] != m or min(array.shape) < 1:
        raise CLIError(f"--measurement {path}: has shape {shape}; expected {expected}")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise CLIError(f"--measurement {path}: holds {bad} non-finite value(s) (NaN or inf)")
    return torch.from_numpy(np.asarray(array, dtype=np.float64))


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


_ARCHITECTURE_OPTIONS = ("task", "backbone", "channels", "blocks", "stages", "rank", "gamma", "alpha", "targets",
                         "per_stage")


def _backbone_kwargs(args) -> dict:
    backbone = args.backbone or "resunet"
    if backbone == "resunet":
        return {"channels": args.channels or 16, "num_blocks": 1 if args.blocks is None else args.blocks}
    if args.blocks is not None:
        raise CLIError("--blocks: only the resunet backbone has residual blocks")
    return {"channels": args.channels or 32}


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(item for item in (text or "").split(",") if item)


def _model_config(args, strategy: str, backbone: str, backbone_kwargs: dict):
    """The ModelConfig of :func:`add_model_options`' options, with their defaults (9 stages, γ = 10, every
    convolution a target), for ``strategy`` and the resolved backbone."""
    from lorun_fast.models import ModelConfig

    return ModelConfig(strategy=strategy, num_stages=args.stages or 9, backbone=backbone,
                       backbone_kwargs=backbone_kwargs, rank=args.rank,
                       gamma=10.0 if args.gamma is None else args.gamma, alpha=args.alpha,
                       targets=_split(args.targets) or ("*",), per_stage=_split(args.per_stage))


def cmd_describe(args) -> int:
    from lorun_fast.models import ModelConfig, build_dun, lorun_from
    from lorun_fast.reference import BlockCS

    _check_sources(args)
    if args.task == "cassi":  # parameter counts depend on the bands, not on the mask
        import torch

        from lorun_fast.reference import CASSI

        operator = CASSI(torch.ones(8, 8), 28, 2)
    else:
        operator = BlockCS.gaussian(0.1)  # nor on Φ
    if args.checkpoint:
        given = [f"--{name.replace('_', '-')}" for name in _ARCHITECTURE_OPTIONS if getattr(args, name) is not None]
        if given:
            raise CLIError(f"{', '.join(given)}: describe --checkpoint reads the architecture from the file; drop "
                           f"{'them' if len(given) > 1 else 'it'}")
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
    if args.rank is not None and args.gamma is not None:
        raise CLIError("--rank and --gamma: give one (a fixed rank, or the rule r = ceil(min(in, out)·γ/100))")
    backbone = args.backbone or "resunet"
    from lorun_fast.tasks import get_task

    try:
        kwargs = get_task(args.task or "cs").backbone_kwargs(backbone, _backbone_kwargs(args))
    except ValueError as err:
        raise CLIError(f"--backbone {backbone}: {err}") from err
    config = _model_config(args, "lorun", backbone, kwargs)
    rows = []
    for strategy in ("block", "shared"):
        plain = ModelConfig(strategy=strategy, num_stages=config.num_stages, backbone=backbone, backbone_kwargs=kwargs)
        rows.append((strategy, build_dun(operator, plain).parameter_counts()))
    shared = build_dun(operator, ModelConfig(strategy="shared", num_stages=config.num_stages, backbone=backbone,
                                             backbone_kwargs=kwargs))
    lorun = lorun_from(shared, rank=config.rank, gamma=config.gamma, alpha=config.alpha, targets=config.targets,
                       per_stage=config.per_stage)
    rows.append(("lorun", lorun.parameter_counts()))
    if args.json:
        print(json.dumps([{"model": name, **counts} for name, counts in rows]))
        return 0
    rule = f"rank {config.rank}" if config.rank else f"γ = {config.gamma:g}"
    print(f"{args.task or 'cs'}: {backbone} {kwargs}, {config.num_stages} stages, LoRA {rule} on "
          f"{list(config.targets)}" + (f", per-stage {list(config.per_stage)}" if config.per_stage else ""))
    print(_describe_rows(rows))
    print("lorun: 'trainable' is phase 2 (adapters, step sizes and per-stage parameters; the base is frozen)")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# compress
# ----------------------------------------------------------------------------------------------------------------
def cmd_compress(args) -> int:
    from lorun_fast.io import check_writable_folder

    adapters, out = Path(args.adapters), Path(args.out)
    if not adapters.is_file():
        raise CLIError(f"--adapters {adapters}: no such file")
    if out.suffix != ".safetensors":
        raise CLIError(f"--out {out}: expected a .safetensors file name for the compressed adapter set")
    if out.exists() or out.is_symlink():
        raise CLIError(f"--out {out}: already exists; compress never overwrites a file, name a new one")
    check_writable_folder(out.parent, f"--out {out}: its folder")
    _stop_if_interrupted()
    from lorun_fast.compress import compress_file

    summary = compress_file(adapters, out, energy=args.energy, budget=args.budget)
    if args.json:
        print(json.dumps(summary))
        return 0
    before, after = summary["lora_parameters_before"], summary["lora_parameters_after"]
    print(f"{adapters} → {out}: LoRA parameters {before:,} → {after:,} ({after / before:.1%}); adapter set "
          f"{summary['adapter_parameters_before']:,} → {summary['adapter_parameters_after']:,} (with step sizes and "
          f"per-stage parameters)")
    print(f"smallest energy kept by an adapter {summary['min_energy_kept']:.4f}; ‖ΔW − ΔW'‖_F over all adapters "
          f"{summary['frobenius_error']:.4g}")
    width = max(len(name) for name in summary["ranks"])
    for name, ranks in summary["ranks"].items():
        print(f"  {name:<{width}}  ranks per stage {ranks}  (was {summary['source_ranks'][name]})")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------------
#: train's options → the TrainConfig field each sets (messages speak of options, the config of fields)
TRAIN_FIELDS = {
    "strategy": "strategy", "stages": "num_stages", "backbone": "backbone", "channels": "backbone_kwargs",
    "blocks": "backbone_kwargs", "rank": "rank", "gamma": "gamma", "alpha": "alpha", "targets": "targets",
    "per_stage": "per_stage", "ratio": "ratio", "phi": "phi", "qinit": "qinit", "gaussian": "gaussian_seed",
    "base": "base", "base_phase": "base_phase", "steps": "steps", "phase1_steps": "phase1_steps",
    "train_images": "train_images", "val_images": "val_images", "val_every": "val_every", "val_limit": "val_limit",
    "crop": "crop", "batch_size": "batch_size", "no_augment": "augment", "lr": "lr", "lr_phase2": "lr_phase2",
    "min_lr_ratio": "min_lr_ratio", "warmup": "warmup_steps", "weight_decay": "weight_decay",
    "grad_clip": "grad_clip", "seed": "seed", "precision": "precision", "backend": "backend",
    "log_every": "log_every", "checkpoint_every": "checkpoint_every", "adapter_name": "adapter_name",
    "task": "task_name", "mask": "mask", "exclude": "exclude", "scale": "scale", "degradation": "degradation",
    "blur_sigma": "blur_sigma", "blur_size": "blur_size",
}


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _explicit(args) -> dict:
    """The train options given on the command line with a value other than their default."""
    defaults = _defaults("train")
    return {dest: getattr(args, dest) for dest in TRAIN_FIELDS if getattr(args, dest) != defaults.get(dest)}


def _base_options(args) -> tuple[str, dict]:
    """The backbone of a --base, after refusing --backbone/--channels/--blocks that contradict it."""
    from lorun_fast.train import base_architecture

    if not Path(args.base).is_file():
        raise CLIError(f"--base {args.base}: file not found")
    arch = base_architecture(args.base)
    kwargs = arch.backbone_kwargs
    given = {"--backbone": (args.backbone, arch.backbone), "--channels": (args.channels, kwargs.get("channels")),
             "--blocks": (args.blocks, kwargs.get("num_blocks"))}
    for option, (value, found) in given.items():
        if value is not None and value != found:
            raise CLIError(f"{option} {value} contradicts --base {args.base}, a {arch.backbone} {kwargs}: phase 2 "
                           f"trains adapters on the base as it is; drop {option}")
    return arch.backbone, dict(kwargs)


def _train_config(args):
    from lorun_fast.train import TrainConfig

    if args.phi is not None and args.ratio is not None:
        raise CLIError("--ratio and --phi: give one (a ratio uses ISTA-Net's matrices or, with --gaussian, a "
                       "seeded Gaussian Φ)")
    if args.rank is not None and args.gamma is not None:
        raise CLIError("--rank and --gamma: give one (a fixed rank, or the rule r = ceil(min(in, out)·γ/100))")
    from lorun_fast.tasks import get_task

    task = get_task(args.task)
    cs_only = [option for option, value in (("--ratio", args.ratio), ("--phi", args.phi), ("--qinit", args.qinit),
                                            ("--gaussian", args.gaussian)) if value is not None]
    cassi_only = [option for option, value in (("--mask", args.mask), ("--exclude", args.exclude))
                  if value is not None]
    if args.task != "cs" and cs_only:
        raise CLIError(f"{', '.join(cs_only)}: not an option of the {args.task} task")
    if args.task != "cassi" and cassi_only:
        raise CLIError(f"{', '.join(cassi_only)}: not an option of the {args.task} task")
    sr_only = [option for option, dest in (("--scale", "scale"), *_DEGRADATION_OPTIONS)
               if getattr(args, dest) is not None]
    if args.task != "sr" and sr_only:
        raise CLIError(f"{', '.join(sr_only)}: not an option of the {args.task} task")
    if args.base is not None:
        backbone, kwargs = _base_options(args)
    else:
        backbone, kwargs = args.backbone or "resunet", _backbone_kwargs(args)
    try:
        kwargs = task.backbone_kwargs(backbone, kwargs)
    except ValueError as err:
        raise CLIError(f"--backbone {backbone}: {err}") from err
    ratio, exclude = None, []
    if args.task == "cs":
        ratio = 25 if args.ratio is None and args.phi is None else args.ratio
    elif args.task == "cassi":
        from lorun_fast.tasks.cassi import HELD_OUT

        exclude = list(HELD_OUT) if args.exclude is None else list(_split(args.exclude))
    try:
        model = _model_config(args, args.strategy, backbone, kwargs)
    except ValueError as err:
        raise _as_option_error(err) from err
    return TrainConfig(
        model=model, task_name=args.task,
        ratio=ratio, phi=args.phi, qinit=args.qinit, mask=args.mask, exclude=exclude, scale=args.scale or 4,
        degradation=args.degradation or "bicubic", blur_sigma=args.blur_sigma, blur_size=args.blur_size,
        gaussian_seed=args.gaussian, base=args.base, base_phase=args.base_phase, steps=args.steps,
        phase1_steps=args.phase1_steps, train_images=args.train_images, val_images=args.val_images,
        val_every=args.val_every, val_limit=args.val_limit, crop=args.crop or task.default_crop,
        batch_size=args.batch_size,
        augment=not args.no_augment, lr=args.lr, lr_phase2=args.lr_phase2, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip or None, seed=args.seed,
        precision=args.precision, backend=args.backend, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, adapter_name=args.adapter_name)


def _as_option_error(err: ValueError) -> CLIError:
    """A TrainConfig message (``field: ...``) spoken in options (``--field: ...``)."""
    text = str(err)
    field_name, colon, rest = text.partition(":")
    options = [dest for dest, f in TRAIN_FIELDS.items() if f == field_name.strip()]
    for dest, field_name_in_text in TRAIN_FIELDS.items():
        if "_" in field_name_in_text and dest == field_name_in_text:
            rest = re.sub(rf"\b{field_name_in_text}\b", _option(dest), rest)
    if colon and options:
        return CLIError(f"{'/'.join(_option(d) for d in options)}:{rest}")
    return CLIError(text)


def _ignored_on_resume(args, recorded) -> list[str]:
    """One line per option given with --resume whose value differs from what the run records (and is not used)."""
    lines = []
    recorded_dict = {**recorded.to_dict(), **recorded.model.to_dict()}  # the fields as options name them
    for dest, value in _explicit(args).items():
        field_name = TRAIN_FIELDS[dest]
        shown = recorded_dict[field_name]
        if dest in ("channels", "blocks"):
            shown = recorded_dict["backbone_kwargs"].get("channels" if dest == "channels" else "num_blocks")
        elif dest == "no_augment":
            value, shown = True, not recorded_dict["augment"]
        elif dest in ("targets", "per_stage", "exclude"):
            value = list(_split(value))
        if value != shown:
            lines.append(f"{_option(dest)} {value} is not used: the run records {field_name}={shown!r}")
    return lines


def cmd_train(args) -> int:
    import torch

    from lorun_fast.train import check_run_folder, read_recorded_config, run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    out = Path(args.out)
    try:
        kind = check_run_folder(out, args.resume)
    except OSError as err:
        raise CLIError(f"--out: {err}") from err
    if kind in ("resume", "restart"):
        config = read_recorded_config(out)
        for line in _ignored_on_resume(args, config):
            print(f"warning: {line}", file=sys.stderr)
        where = "from its last checkpoint" if kind == "resume" else "from step 0 (it never reached a checkpoint)"
        print(f"resuming {out} {where} with its saved config.json ({config.steps} steps)", file=sys.stderr)
    else:
        if args.resume:
            print(f"--resume: nothing to resume in {out}; starting a new run", file=sys.stderr)
        config = _train_config(args)
        try:
            config.validate()
        except ValueError as err:
            raise _as_option_error(err) from err
        if config.train_images is not None and not Path(config.train_images).is_dir():
            raise CLIError(f"--train-images {config.train_images}: folder not found")
        if config.val_images is not None and not Path(config.val_images).exists():
            raise CLIError(f"--val-images {config.val_images}: not found")
    _stop_if_interrupted()
    try:
        trainer, summary = run_training(config, out, device=device, resume=args.resume, stop_at=args.stop_at,
                                        quiet=args.quiet, install_signal_handlers=True)
    except ValueError as err:
        raise _as_option_error(err) from err
    if trainer.rank != 0:
        return 0
    if summary is None:
        print(f"{'interrupted: ' if trainer.stop_requested else ''}stopped at step {trainer.step} of "
              f"{config.steps}; checkpoint saved in {out} "
              f"(continue with: lorun-fast train --out {out} --resume)", file=sys.stderr)
        return 130 if trainer.stop_requested else 0
    counts = summary["parameters"]
    print(f"done: {config.model.strategy}, {summary['steps']} steps in {summary['train_seconds']:.1f} s of training; "
          f"{counts['total']:,} parameters ({counts['trainable']:,} trained last)")
    if summary.get("last_val"):
        print(f"validation: PSNR {summary['last_val']['psnr']:.2f} dB, SSIM {summary['last_val']['ssim']:.4f}")
    print(f"files in {out}: {', '.join(summary['files'])}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# the parser
# ----------------------------------------------------------------------------------------------------------------
def _number(kind, low=None, high=None, low_open=False):
    """An argparse type: a finite ``kind`` in [low, high] (``low_open``: > low), with a message naming the bound."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"expected {'>' if low_open else '≥'} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected ≤ {high}, got {text}")
        return value
    return parse


def _positive(kind):
    return _number(kind, 0, low_open=True)


_percent = _number(int, 0, 100, low_open=True)
_gamma = _number(float, 0, 100, low_open=True)


def _add_model_source(parser, required=True) -> None:
    parser.add_argument("--checkpoint", required=required,
                        help="a lorun_fast .safetensors (model or base) or a published ISTA-Net+ net_params_*.pkl")
    parser.add_argument("--adapters", help="an adapters-<name>.safetensors set to put on the base in --checkpoint")


def add_model_options(group, *, train: bool) -> None:
    """The model's options, the same for train and describe (:func:`_model_config` reads them): strategy (train
    only: describe shows every strategy), stages, backbone, width, residual blocks and the LoRA settings."""
    if train:
        group.add_argument("--strategy", choices=STRATEGIES, default="lorun")
    group.add_argument("--stages", type=_positive(int), default=9 if train else None,
                       help="number of DUN stages K" + ("" if train else " (default 9)"))
    group.add_argument("--backbone", choices=BACKBONE_NAMES,
                       help="default resunet" + (" (or the --base's)" if train else ""))
    group.add_argument("--channels", type=_positive(int), help="width c (resunet: [c,2c,4c,8c]; default 16, "
                       "ista_net_plus 32)")
    group.add_argument("--blocks", type=_number(int, 0), help="resunet residual blocks per level (default 1)")
    rank = group.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=_positive(int), help="LoRA rank of every layer (clamped, with a warning, to a "
                      "layer's min(in, out)); default: the γ rule")
    rank.add_argument("--gamma", type=_gamma, help="rank rule r = ceil(min(in, out)·γ/100) (default 10)")
    group.add_argument("--alpha", type=_positive(float), help="LoRA alpha > 0 (default: the rank, so the scale is 1)")
    group.add_argument("--targets", help="comma-separated globs of the convolutions given adapters (default *)")
    group.add_argument("--per-stage", help="comma-separated base parameters made per stage in phase 2 (e.g. soft_thr)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorun-fast", description="LoRA-unfolding networks for block compressive "
                                     "sensing: train, evaluate, restore, describe. Data is found through LORUN_DATA "
                                     "(default ../shared/data).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,restore,describe,compress}")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    device_help = "cpu, cuda or cuda:N (default: cuda when available)"

    # -- train ---------------------------------------------------------------------------------------------------
    tr = commands.add_parser(
        "train", help="train a block, shared or lorun DUN (two phases for lorun)", formatter_class=fmt,
        description="Train a DUN for block CS on random crops of an image folder (measured on the fly with Φ). "
                    "lorun: phase 1 trains the weight-tied (shared) DUN for --phase1-steps (or takes --base), phase 2 "
                    "freezes it and trains per-stage LoRA adapters and step sizes. Checkpoints go to --out, a new or "
                    "empty folder (or the run's own with --resume: nothing else is ever overwritten); Ctrl-C saves "
                    "one, and --resume continues exactly where it stopped. Multi-process: "
                    "torchrun --nproc_per_node N -m lorun_fast train ...")
    tr.add_argument("--out", required=True, help="run folder (config, log.jsonl, checkpoints, final files): new or "
                    "empty, or an earlier run with --resume")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                    "with its saved config.json (options that differ are named and not used; a new or empty "
                    "--out starts a new run)")
    add_model_options(tr.add_argument_group("model"), train=True)
    tr.add_argument("--task", choices=TASK_NAMES, default="cs", help="the restoration task")
    g = tr.add_argument_group("sr task")
    g.add_argument("--scale", type=int, choices=SR_SCALES, help="the SR scale (default 4)")
    _add_degradation_options(g)
    g = tr.add_argument_group("cassi task")
    g.add_argument("--mask", help="coded-aperture mask .mat (default $LORUN_DATA/cassi/mask.mat)")
    g.add_argument("--exclude", help="comma-separated scene names of --train-images left out of training "
                   "(default sushi,cloth_256: held out for testing)")
    g = tr.add_argument_group("CS task")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--phi", help="sampling matrix .mat instead of the ratio's")
    source.add_argument("--gaussian", type=_number(int, 0), metavar="SEED",
                        help="use a seeded Gaussian Φ at --ratio (no files)")
    g.add_argument("--ratio", type=_percent, help="CS ratio in percent (default 25; ISTA-Net's matrices unless "
                   "--gaussian)")
    g.add_argument("--qinit", help="initialisation matrix .mat for --phi")
    g = tr.add_argument_group("lorun phases")
    g.add_argument("--base", help="phase 1 given: a .safetensors shared/base/lorun DUN, or a block model (e.g. a "
                   "published ISTA-Net+ .pkl) with --base-phase; its architecture is used")
    g.add_argument("--base-phase", type=_number(int, 0), help="which stage of a block --base is the shared base")
    g.add_argument("--steps", type=_positive(int), default=1000, help="optimizer steps in all (lorun: both phases)")
    g.add_argument("--phase1-steps", type=_number(int, 0), help="lorun: steps of phase 1 (default half of --steps)")
    g = tr.add_argument_group("data")
    g.add_argument("--train-images", help="training folder: images for cs (default $LORUN_DATA/Train400), .mat/.npy "
                   "cubes for cassi (default $LORUN_DATA/cassi/cave)")
    g.add_argument("--val-images", help="held-out folder (for cassi also one cube file) validated with the task's "
                   "protocol every --val-every")
    g.add_argument("--val-every", type=_number(int, 0), default=0, help="validate on --val-images every N steps and "
                   "at the end (0: never)")
    g.add_argument("--val-limit", type=_positive(int), help="validate on the first N images only")
    g.add_argument("--crop", type=_positive(int), help="square crop size (cs: any, padded to 33-blocks, default 66; "
                   "cassi: at most 256, default 256)")
    g.add_argument("--batch-size", type=_positive(int), default=8, help="global batch (split over processes)")
    g.add_argument("--no-augment", action="store_true", help="no random flips/rotations")
    g = tr.add_argument_group("optimisation")
    g.add_argument("--lr", type=_positive(float), default=1e-3, help="Adam learning rate (phase 1)")
    g.add_argument("--lr-phase2", type=_positive(float), help="lorun phase 2 learning rate (default --lr)")
    g.add_argument("--min-lr-ratio", type=_number(float, 0, 1), default=0.01,
                   help="cosine floor as a fraction of the lr")
    g.add_argument("--warmup", type=_number(int, 0), default=0, help="linear warm-up steps per phase")
    g.add_argument("--weight-decay", type=_number(float, 0), default=0.0)
    g.add_argument("--grad-clip", type=_number(float, 0), default=1.0, help="max gradient norm (0: no clipping)")
    g.add_argument("--seed", type=_number(int, 0), default=0, help="seed of the initialisation and of the data")
    g.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="bfloat16: autocast of the forward pass")
    g.add_argument("--backend", choices=TRAIN_BACKENDS, default="auto",
                   help="LoRA layers in phase 2: fused (auto: triton on CUDA, merged on CPU) or peft's reference")
    g = tr.add_argument_group("run")
    g.add_argument("--log-every", type=_positive(int), default=10, help="log.jsonl train events every N steps")
    g.add_argument("--checkpoint-every", type=_number(int, 0), default=100, help="checkpoint every N steps (0: only "
                   "at phase ends, on stop and at the end)")
    g.add_argument("--adapter-name", help="name of the adapter set file, a plain name (default cs<ratio>)")
    g.add_argument("--stop-at", type=_positive(int), help="save a checkpoint and stop at this step (resume later)")
    g.add_argument("--device", help=device_help)
    g.add_argument("--threads", type=_positive(int), help="torch CPU threads")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    # -- eval ----------------------------------------------------------------------------------------------------
    ev = commands.add_parser("eval", help="evaluate a checkpoint on an image folder (ISTA-Net block-CS protocol)",
                             description="Evaluate a DUN checkpoint (lorun_fast .safetensors — a model, or a base with "
                             "--adapters — or a published ISTA-Net+ .pkl) on an image folder: per-image PSNR/SSIM "
                             "table and the mean; with --out, reconstructions as PNG and results.csv.")
    _add_model_source(ev, required=False)
    ev.add_argument("--images", required=True, nargs="+", help="test images: folders and/or files (e.g. "
                    "$LORUN_DATA/Set11); .mat/.npy cubes for cassi; HR images for sr")
    ev.add_argument("--task", choices=TASK_NAMES, help="default: what the checkpoint records, else cs")
    ev.add_argument("--method", default="model", choices=("model", "x0", "gap-tv", "bicubic"),
                    help="model (the checkpoint; cs, cassi); x0 (the initialisation) or gap-tv (Yuan 2016) for "
                         "cassi; bicubic (MATLAB bicubic upscaling) for sr")
    _add_task_options(ev)
    ev.add_argument("--manifest", help="cs: a mixed batch. JSON {\"adapters\": {set: file}, \"images\": {image file "
                    "name: set}} (paths relative to it): --checkpoint is the base all sets share, each image is "
                    "measured with its set's Φ (recorded in the set's file) and reconstructed with its adapters, "
                    "several sets per batch")
    ev.add_argument("--batch-size", type=_positive(int), default=8, help="--manifest: images per mixed batch")
    g = ev.add_argument_group("cassi task")
    g.add_argument("--mask", help="coded-aperture mask .mat (key 'mask'; default $LORUN_DATA/cassi/mask.mat); its "
                   "size is the size of the evaluated tiles")
    g.add_argument("--tiles", choices=("center", "tiles"), default="center",
                   help="centre crop of each scene, or all non-overlapping tiles of the mask's size")
    g.add_argument("--cube-key", help="the array's key in .mat cubes (default: detected)")
    g.add_argument("--cube-layout", choices=("hwb", "bhw"), help="axis order of the cubes (default: detected)")
    g.add_argument("--gap-iterations", type=_positive(int), default=100, help="GAP-TV iterations")
    g = ev.add_argument_group("sr task")
    g.add_argument("--scale", type=int, choices=SR_SCALES, help="super-resolution factor (default: the "
                   "checkpoint's, else 4)")
    _add_degradation_options(g, "default: the checkpoint's, else ")
    ev.add_argument("--out", help="folder for reconstructions (PNG) and results.csv: new, empty or an earlier "
                    "evaluation's (never the --images folder; nothing else in it is overwritten)")
    ev.add_argument("--device", help=device_help)
    ev.add_argument("--dtype", choices=DTYPES, default="float32")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    # -- restore -------------------------------------------------------------------------------------------------
    rs = commands.add_parser("restore", help="measure one image with Φ, reconstruct it, write a PNG",
                             description="One image in → block-CS measurement (ISTA-Net protocol) → reconstruction → "
                             "PNG out, with PSNR/SSIM against the original. Or reconstruct a saved measurement "
                             "(--measurement y.npy of shape (Hb, Wb, m)); PSNR then needs --original.")
    _add_model_source(rs, required=False)
    rs.add_argument("--task", choices=TASK_NAMES, help="default: what the checkpoint records, else cs")
    rs.add_argument("--method", default="model", choices=("model", "x0", "gap-tv", "bicubic"),
                    help="cassi: x0 or gap-tv instead of a model; sr: bicubic")
    source = rs.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="the original image (cassi: a .mat/.npy cube) to measure and reconstruct")
    source.add_argument("--measurement", help="a .npy measurement instead of --image: block measurements (Hb, Wb, m) "
                        "for cs, (H, W + 54) for cassi")
    rs.add_argument("--manifest", help="a mixed-batch manifest (see eval --manifest): the adapter set it names for "
                    "--image (by file name) goes on the base in --checkpoint, instead of --adapters")
    rs.add_argument("--size", type=_positive(int), nargs=2, metavar=("H", "W"),
                    help="with --measurement: crop the reconstruction to H×W")
    rs.add_argument("--original", help="reference image for PSNR/SSIM (default: --image)")
    rs.add_argument("--out", required=True, help="the reconstruction (.png for cs; .npy or .mat cube for cassi); "
                    "never one of the inputs")
    g = rs.add_argument_group("sr task")
    g.add_argument("--scale", type=int, choices=SR_SCALES, help="default: the checkpoint's, else 4")
    g.add_argument("--degrade", action="store_true", help="--image is an HR image: degrade it here (the "
                   "--degradation) and report PSNR/SSIM against it")
    _add_degradation_options(g, "default: the checkpoint's, else ")
    g = rs.add_argument_group("cassi task")
    g.add_argument("--mask", help="coded-aperture mask .mat (default: the checkpoint's, else the shared one)")
    g.add_argument("--preview", help="false-colour PNG of the reconstruction (default: --out with .png)")
    g.add_argument("--plot", help="PNG of the spectra at a few pixels against the original")
    rs.add_argument("--save-measurement", help="with --image: also save the simulated measurement as .npy")
    _add_task_options(rs)
    rs.add_argument("--device", help=device_help)
    rs.add_argument("--dtype", choices=DTYPES, default="float32")
    rs.set_defaults(func=cmd_restore)

    # -- describe ------------------------------------------------------------------------------------------------
    ds = commands.add_parser("describe", help="parameter counts per strategy and per stage", formatter_class=fmt,
                             description="Parameter counts (total, trainable, shared, per stage) of the block, shared "
                             "and lorun strategies for a backbone, or of one checkpoint (--checkpoint [--adapters]; "
                             "its architecture comes from the file).")
    _add_model_source(ds, required=False)
    ds.add_argument("--task", choices=TASK_NAMES, help="the task's images (1 channel for cs and sr, "
                    "28 bands for cassi); default cs")
    add_model_options(ds, train=False)
    ds.add_argument("--json", action="store_true", help="print JSON")
    ds.set_defaults(func=cmd_describe)

    # -- compress ------------------------------------------------------------------------------------------------
    cp = commands.add_parser("compress", help="adaptive rank: truncate an adapter set by SVD, per layer and stage",
                             formatter_class=fmt,
                             description="Per layer and stage, the SVD of the update s·B_k·A_k truncated to the "
                             "smallest rank that keeps --energy of its squared Frobenius norm, or a global "
                             "--budget of LoRA parameters spent greedily by squared singular value per parameter. "
                             "Writes a new adapter set for the same base with per-layer-per-stage ranks.")
    cp.add_argument("--adapters", required=True, help="the adapters-<name>.safetensors set to compress")
    cp.add_argument("--out", required=True, help="the compressed adapter set to write (.safetensors, a new file)")
    amount = cp.add_mutually_exclusive_group(required=True)
    amount.add_argument("--energy", type=_number(float, 0, 1, low_open=True),
                        help="fraction of each update's energy (Σσ²) to keep, in (0, 1]")
    amount.add_argument("--budget", type=_positive(int), help="total LoRA parameters (A and B of every layer and "
                        "stage; at least rank 1 everywhere)")
    cp.add_argument("--json", action="store_true", help="print the summary as JSON")
    cp.set_defaults(func=cmd_compress)
    return parser


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _print_warning
            return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
