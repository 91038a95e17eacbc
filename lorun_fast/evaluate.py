"""The ISTA-Net evaluation protocol for block CS, usable with any DUN, image folder and sampling matrix.

Per image: 8-bit gray in [0, 255] → divide by 255 → zero-pad right and bottom by ``b − (size mod b)`` (a full
extra block when the size is already a multiple) → measure ``y = Φ x`` per block → reconstruct → crop → clip
to [0, 1] → compare ``x_rec·255`` (not rounded) with the uint8 original: PSNR = 20·log10(255/√MSE) and SSIM as
scikit-image computes it by default. The means are plain averages over images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorun_fast.io import list_images, read_gray, write_png_atomic
from lorun_fast.metrics import SSIM_WIN_SIZE, psnr, ssim
from lorun_fast.reference import DUN, BlockCS

__all__ = ["ImageResult", "ista_pad", "reconstruct_cs", "evaluate_cs", "evaluate_cs_mixed", "format_table",
           "output_names", "check_finite_output", "check_scorable"]


@dataclass
class ImageResult:
    name: str
    height: int
    width: int
    psnr: float
    ssim: float
    seconds: float
    adapters: str = ""  # the adapter set of a mixed batch (evaluate_cs_mixed)


def ista_pad(image: np.ndarray, block_size: int = 33) -> np.ndarray:
    """Zero-pad right and bottom by ``block_size − (size mod block_size)``, as ISTA-Net's ``imread_CS_py``."""
    h, w = image.shape
    return np.pad(image, ((0, block_size - h % block_size), (0, block_size - w % block_size)))


def output_names(paths: list[Path]) -> list[str]:
    """The name of each input's result row and reconstruction (``<name>.png``): the file's stem, or its whole name
    where two inputs share a stem (``a.png`` and ``a.tif``), so that no result overwrites another. Raises if the
    names still collide."""
    stems = [Path(p).stem.casefold() for p in paths]
    names = [Path(p).stem if stems.count(stem) == 1 else Path(p).name for p, stem in zip(paths, stems)]
    seen: dict[str, Path] = {}
    for name, path in zip(names, paths):
        key = name.casefold()
        if key in seen:
            raise ValueError(f"images: {seen[key].name} and {Path(path).name} would both be written as {name}.png; "
                             f"rename one of them")
        seen[key] = Path(path)
    return names


def check_finite_output(x: torch.Tensor, what) -> None:
    """A reconstruction with NaN or inf is an error, not a number: its PSNR would print as nan."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise FloatingPointError(f"{what}: the reconstruction holds {bad} non-finite value(s) (NaN or inf) of "
                                 f"{x.numel()}; the model or its input is broken")


def check_scorable(image: np.ndarray, what) -> None:
    """SSIM needs at least a 7×7 image; say so with the file's name before any work is done on it."""
    if image.shape[0] < SSIM_WIN_SIZE or image.shape[1] < SSIM_WIN_SIZE:
        raise ValueError(f"{what}: {image.shape[0]}×{image.shape[1]} is too small to score; SSIM needs at least "
                         f"{SSIM_WIN_SIZE}×{SSIM_WIN_SIZE} pixels")


@torch.no_grad()
def reconstruct_cs(model: DUN, image: np.ndarray, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Measure one uint8 gray image with the model's operator and reconstruct it: float64 in [0, 1], H × W."""
    operator = model.operator
    if not isinstance(operator, BlockCS):
        raise TypeError(f"model: the CS protocol needs a BlockCS operator, got {type(operator).__name__}")
    if image.ndim != 2:
        raise ValueError(f"image: expected a 2-D gray image, got shape {image.shape}")
    h, w = image.shape
    padded = ista_pad(image.astype(np.float64) / 255.0, operator.block_size)
    x = torch.from_numpy(padded).to(device=device, dtype=dtype)[None, None]
    y = operator.A(x)
    x_rec = model(y, tuple(x.shape[-2:]))
    check_finite_output(x_rec, "model")
    return np.clip(x_rec[0, 0, :h, :w].double().cpu().numpy(), 0.0, 1.0)


def evaluate_cs(model: DUN, images: list[Path], out_dir: Path | None = None, device: str = "cpu",
                dtype: torch.dtype = torch.float32, progress: bool = False,
                results: list[ImageResult] | None = None) -> list[ImageResult]:
    """Run the protocol over ``images``; reconstructions go to ``out_dir/<name>.png`` (names from
    :func:`output_names`) when it is given. Rows are appended to ``results`` when given, so that a caller keeps
    those finished before an interruption."""
    names = output_names(images)
    model = model.to(device=device, dtype=dtype).eval()
    results = [] if results is None else results
    iterator = images
    if progress:
        from tqdm import tqdm
        iterator = tqdm(images, desc="eval", unit="img")
    for name, path in zip(names, iterator):
        original = read_gray(path)
        check_scorable(original, path)
        start = time.perf_counter()
        try:
            x_rec = reconstruct_cs(model, original, device, dtype)
        except FloatingPointError as err:
            raise FloatingPointError(f"{path}: {err}") from err
        seconds = time.perf_counter() - start
        reference = original.astype(np.float64)
        row = ImageResult(name, *original.shape, psnr(x_rec * 255.0, reference), ssim(x_rec * 255.0, reference),
                          seconds)
        # The image first, then its row: an interruption between the two must not leave a row without its file.
        if out_dir is not None:
            write_png_atomic(Path(out_dir) / f"{name}.png", x_rec)
        results.append(row)
    return results


def evaluate_cs_mixed(sets, images: list[Path], adapters: list[str], out_dir: Path | None = None,
                      device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 8,
                      progress: bool = False, results: list[ImageResult] | None = None) -> list[ImageResult]:
    """The protocol of :func:`evaluate_cs` for images that each name their adapter set (``adapters[i]`` for
    ``images[i]``) and are measured with that set's Φ: consecutive images of one padded size share a batch (up to
    ``batch_size``), reconstructed in one :class:`~lorun_fast.adapter_sets.AdapterSets` forward. ``seconds`` is
    the batch's time divided among its images."""
    if len(adapters) != len(images):
        raise ValueError(f"adapters: {len(adapters)} set names for {len(images)} images")
    names = output_names(images)
    sets = sets.to(device=device, dtype=dtype).eval()
    results = [] if results is None else results
    block = sets.sets[sets.names[0]].operator.block_size
    pending: list[tuple[str, Path, np.ndarray, str]] = []

    def flush():
        if not pending:
            return
        start = time.perf_counter()
        xs = [torch.from_numpy(ista_pad(img.astype(np.float64) / 255.0, block)).to(device=device,
                                                                                   dtype=dtype)[None, None]
              for _, _, img, _ in pending]
        size = tuple(xs[0].shape[-2:])
        with torch.no_grad():
            ys = [sets.sets[a].operator.A(x) for x, (_, _, _, a) in zip(xs, pending)]
            x_rec = sets(ys, [a for _, _, _, a in pending], size)
        check_finite_output(x_rec, "model")
        seconds = (time.perf_counter() - start) / len(pending)
        for row, (name, path, original, adapter) in enumerate(pending):
            h, w = original.shape
            rec = np.clip(x_rec[row, 0, :h, :w].double().cpu().numpy(), 0.0, 1.0)
            reference = original.astype(np.float64)
            result = ImageResult(name, h, w, psnr(rec * 255.0, reference), ssim(rec * 255.0, reference), seconds,
                                 adapter)
            if out_dir is not None:
                write_png_atomic(Path(out_dir) / f"{name}.png", rec)
            results.append(result)
        pending.clear()

    iterator = list(zip(names, images, adapters))
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="eval", unit="img")
    for name, path, adapter in iterator:
        original = read_gray(path)
        check_scorable(original, path)
        padded = tuple(d + block - d % block for d in original.shape)  # ista_pad's size
        if pending and (len(pending) >= batch_size
                        or tuple(d + block - d % block for d in pending[0][2].shape) != padded):
            flush()
        pending.append((name, path, original, adapter))
    flush()
    return results


def evaluate_folder(model: DUN, folder, **kwargs) -> list[ImageResult]:
    return evaluate_cs(model, list_images(folder), **kwargs)


def mean_scores(results: list[ImageResult]) -> tuple[float, float]:
    return float(np.mean([r.psnr for r in results])), float(np.mean([r.ssim for r in results]))


def format_table(results: list[ImageResult]) -> str:
    """A per-image table and the mean, for the terminal."""
    lines = [f"{'image':<16}{'size':>10}{'PSNR (dB)':>12}{'SSIM':>10}{'time (s)':>10}"]
    for r in results:
        lines.append(f"{r.name:<16}{f'{r.height}x{r.width}':>10}{r.psnr:>12.2f}{r.ssim:>10.4f}{r.seconds:>10.2f}")
    mean_psnr, mean_ssim = mean_scores(results)
    lines.append(f"{'mean':<16}{'':>10}{mean_psnr:>12.2f}{mean_ssim:>10.4f}{sum(r.seconds for r in results):>10.2f}")
    return "\n".join(lines)
