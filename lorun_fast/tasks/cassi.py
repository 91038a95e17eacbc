"""CASSI (coded aperture snapshot spectral imaging): data, protocol, a classical baseline and previews.

The pieces a ``--task cassi`` pipeline needs, as plain functions over numpy cubes and the reference operator
:class:`lorun_fast.reference.CASSI`:

* :func:`read_cube` reads a multispectral cube (``.mat`` or ``.npy``) as float64 (H, W, B) in [0, 1];
  :func:`to_28_bands` brings CAVE's 31 bands (400, 410, …, 700 nm) to the 28 wavelengths of the standard
  CASSI simulation (TSA-Net / MST), 453.5 … 648.0 nm; :func:`load_cube_28` does both.
* :func:`load_mask` reads the coded-aperture mask (``cassi/mask.mat`` of the shared data by default).
* :class:`CassiSampler` draws training batches (random scene, crop and flip/rotation per sample, one random
  mask crop per batch), a pure function of ``(seed, step)``.
* :func:`cassi_scores` is the CASSI literature's metric: PSNR and SSIM per band, averaged over bands.
* :func:`tiles` cuts 256×256 test cubes out of larger scenes.
* :func:`gap_tv` is GAP-TV (Yuan, ICIP 2016), the classical baseline; :func:`reconstructor` turns ``"x0"``,
  ``"gap-tv"`` or a DUN into the ``reconstruct_fn(y, operator)`` that :func:`evaluate_cassi` calls.
* :func:`false_colour_png` and :func:`plot_spectra` write previews.

Conventions: cubes are numpy (H, W, B) with values in [0, 1]; the operator works on torch (N, B, H, W) and
measures y of shape (N, H, W + step·(B − 1)) with ``y = Σ_λ shift_λ(mask ⊙ x_λ)``, dispersion step 2 and
28 bands, as the mask's authors simulate it. Every error names the file or argument it is about.

Why one module of ~900 lines: it is the whole CASSI task — cube and mask readers, the training sampler, the
per-band scores, the GAP-TV baseline, previews and the task plug-in — as ``tasks/cs.py`` and ``tasks/sr.py`` are
for theirs; each part is small and used by the others.
"""
from __future__ import annotations

import math
import os
import time
from io import BytesIO
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from lorun_fast.evaluate import ImageResult
from lorun_fast.io import atomic_write_bytes, data_root, write_png_atomic
from lorun_fast.metrics import ssim_gaussian
from lorun_fast.reference import CASSI
from lorun_fast.reference.operators import MissingKeyError

__all__ = [
    "CAVE_WAVELENGTHS",
    "CASSI_WAVELENGTHS",
    "NUM_BANDS",
    "DISPERSION_STEP",
    "read_cube",
    "to_28_bands",
    "load_cube_28",
    "load_mask",
    "CassiSampler",
    "use_mask",
    "cassi_scores",
    "tiles",
    "tv_denoise",
    "gap_tv",
    "reconstructor",
    "evaluate_cassi",
    "false_colour_png",
    "plot_spectra",
]

#: The 31 CAVE bands: 400, 410, …, 700 nm (Yasuma et al., 2010).
CAVE_WAVELENGTHS = tuple(400.0 + 10.0 * k for k in range(31))

#: The 28 band centres (nm) of the standard CASSI simulation (TSA-Net's mask and KAIST test cubes), as listed in
#: ``lam28`` of caiyuanhao1998/MST ``visualization/show_simulation.m`` and ``visualization/show_line.m``.
#: They are not evenly spaced: a prism's dispersion is non-linear in wavelength, and the 2-pixel shift per band is
#: what is constant.
CASSI_WAVELENGTHS = (453.5, 457.5, 462.0, 466.0, 471.5, 476.5, 481.5, 487.0, 492.5, 498.0, 504.0, 510.0,
                     516.0, 522.5, 529.5, 536.5, 544.0, 551.5, 558.5, 567.5, 575.5, 584.5, 594.5, 604.0,
                     614.5, 625.0, 636.5, 648.0)

NUM_BANDS = 28
DISPERSION_STEP = 2

# Names under which spectral cubes are commonly stored; only used to word the error when a file holds none.
_COMMON_KEYS = ("orig", "Omsi", "img", "img_expand", "data", "cube", "hsi", "msi")

_LAYOUTS = ("hwb", "bhw")


# ----------------------------------------------------------------------------------------------------------------
# Reading cubes
# ----------------------------------------------------------------------------------------------------------------
def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The named arrays of a ``.mat`` file, or ``{"": array}`` for a ``.npy`` file."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return {"": np.load(path, allow_pickle=False)}
        except ValueError as err:  # object arrays need pickle, which is refused for untrusted files
            raise ValueError(f"cube file: {path} is not a plain numeric .npy array ({err})") from err
        except Exception as err:
            raise ValueError(f"cube file: {path} is not a readable .npy file ({type(err).__name__}: {err})") from err
    if suffix == ".mat":
        import scipy.io

        try:
            contents = scipy.io.loadmat(str(path))
        except NotImplementedError as err:  # scipy says this for MATLAB v7.3, which is HDF5
            raise ValueError(f"cube file: {path} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; save it "
                             f"with save(..., '-v7') or convert it to .npy ({err})") from err
        except Exception as err:
            raise ValueError(f"cube file: {path} is not a readable .mat file ({type(err).__name__}: {err})") from err
        return {k: v for k, v in contents.items() if not k.startswith("__")}
    raise ValueError(f"cube file: {path} has suffix {path.suffix!r}; expected .mat or .npy")


def _is_numeric(array) -> bool:
    return isinstance(array, np.ndarray) and (np.issubdtype(array.dtype, np.integer)
                                              or np.issubdtype(array.dtype, np.floating))


def _pick_array(arrays: dict[str, np.ndarray], key: str | None, path: Path) -> tuple[str, np.ndarray]:
    if "" in arrays:  # .npy: one array, no key
        if key is not None:
            raise ValueError(f"cube file: {path} is a .npy file, which holds one unnamed array; drop key={key!r}")
        return "", arrays[""]
    if key is not None:
        if key not in arrays:
            raise MissingKeyError(f"cube file: {path} has no key {key!r}; it has {sorted(arrays)}")
        return key, arrays[key]
    candidates = [k for k, v in arrays.items() if _is_numeric(v) and v.ndim == 3]
    if len(candidates) == 1:
        return candidates[0], arrays[candidates[0]]
    if not candidates:
        raise ValueError(f"cube file: {path} holds no 3-D numeric array (keys: {sorted(arrays)}; cubes are usually "
                         f"stored as one of {', '.join(_COMMON_KEYS)}); pass key=... if it is stored differently")
    raise ValueError(f"cube file: {path} holds several 3-D numeric arrays {sorted(candidates)}; pass key=... to "
                     f"choose one")


def _detect_layout(shape: tuple[int, int, int], layout: str | None, where: str) -> str:
    if layout is not None:
        if layout not in _LAYOUTS:
            raise ValueError(f"layout: expected one of {_LAYOUTS} (or None to detect), got {layout!r}")
        return layout
    # The band axis is the short one: 28 or 31 bands against 256 or 512 pixels.
    hwb = shape[2] < min(shape[0], shape[1])
    bhw = shape[0] < min(shape[1], shape[2])
    if hwb != bhw:
        return "hwb" if hwb else "bhw"
    raise ValueError(f"{where}: cannot tell the band axis of shape {shape} (neither the first nor the last axis is "
                     f"the only short one); pass layout='hwb' (H, W, bands) or layout='bhw' (bands, H, W)")


def read_cube(path: str | os.PathLike, key: str | None = None,
              layout: str | None = None) -> tuple[np.ndarray, str]:
    """Read a multispectral cube as float64 (H, W, B) in [0, 1], and say what was read.

    * Files: ``.mat`` (MATLAB up to v7; v7.3/HDF5 is refused with a hint) or ``.npy`` (no pickles).
    * ``key``: the ``.mat`` variable; by default the single 3-D numeric array in the file (CAVE files here use
      ``orig``, uint8 512×512×31, and ``Omsi``, uint16 256×256×31). Several candidates without ``key`` is an error
      listing them.
    * ``layout``: ``"hwb"`` (H, W, bands) or ``"bhw"`` (bands, H, W); by default the band axis is the first or
      last axis when it alone is shorter than the two others, and any other shape is an error asking for it.
    * Scaling by dtype: uint8 / 255, uint16 / 65535; floats are taken as they are but must lie in [0, 1];
      other integer types (whose full range is rarely the data's) are refused, as are NaN and inf.

    Returns ``(cube, description)``, e.g. ``"feathers.mat['orig']: uint8 512×512×31 (H, W, B; detected), /255"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cube file: {path} does not exist")
    name, array = _pick_array(_load_arrays(path), key, path)
    where = f"{path}[{name!r}]" if name else str(path)
    if not _is_numeric(array):
        raise ValueError(f"cube file: {where} is not a numeric array (dtype {getattr(array, 'dtype', type(array))})")
    if array.ndim != 3:
        raise ValueError(f"cube file: {where} has shape {array.shape}; expected a 3-D cube")
    if min(array.shape) == 0:
        raise ValueError(f"cube file: {where} is empty (shape {array.shape})")
    chosen = _detect_layout(array.shape, layout, f"cube file: {where}")
    how = "given" if layout is not None else "detected"

    dtype = array.dtype
    if dtype == np.uint8:
        cube, scaling = array.astype(np.float64) / 255.0, "/255"
    elif dtype == np.uint16:
        cube, scaling = array.astype(np.float64) / 65535.0, "/65535"
    elif np.issubdtype(dtype, np.floating):
        cube = array.astype(np.float64)
        if not np.all(np.isfinite(cube)):
            bad = int(np.size(cube) - np.count_nonzero(np.isfinite(cube)))
            raise ValueError(f"cube file: {where} contains {bad} NaN or inf value(s)")
        low, high = float(cube.min()), float(cube.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"cube file: {where} is {dtype} with values in [{low:g}, {high:g}]; float cubes must "
                             f"already lie in [0, 1] (they are not rescaled, since their peak is unknown)")
        scaling = "float, as is"
    else:
        raise ValueError(f"cube file: {where} has dtype {dtype}; expected uint8, uint16 or float in [0, 1] (other "
                         f"integer types have no known full-scale value)")
    if chosen == "bhw":
        cube = np.moveaxis(cube, 0, -1)
    cube = np.ascontiguousarray(cube)
    h, w, b = cube.shape
    label = f"{path.name}[{name!r}]" if name else path.name
    description = f"{label}: {dtype} {h}×{w}×{b} (H, W, B; {chosen} {how}), {scaling}"
    return cube, description


# ----------------------------------------------------------------------------------------------------------------
# Bands
# ----------------------------------------------------------------------------------------------------------------
def _band_weights(wavelengths_in: np.ndarray, wavelengths_out: np.ndarray, method: str) -> np.ndarray:
    """The (B_in, B_out) matrix taking input bands to output bands: linear interpolation or nearest band."""
    weights = np.zeros((len(wavelengths_in), len(wavelengths_out)))
    for j, target in enumerate(wavelengths_out):
        if method == "nearest":
            # argmin takes the first of two equally near bands, i.e. the shorter wavelength (625 nm → 620 nm)
            weights[int(np.argmin(np.abs(wavelengths_in - target))), j] = 1.0
            continue
        upper = int(np.searchsorted(wavelengths_in, target, side="left"))
        if wavelengths_in[upper] == target:
            weights[upper, j] = 1.0
            continue
        lower = upper - 1
        t = (target - wavelengths_in[lower]) / (wavelengths_in[upper] - wavelengths_in[lower])
        weights[lower, j], weights[upper, j] = 1.0 - t, t
    return weights


def to_28_bands(cube: np.ndarray, wavelengths_in: Sequence[float] | None = None,
                method: str = "interp") -> tuple[np.ndarray, str]:
    """Resample a cube's bands to the 28 CASSI wavelengths (:data:`CASSI_WAVELENGTHS`).

    ``cube`` is (H, W, B). ``wavelengths_in`` gives the band centres in nm, increasing; by default a 31-band cube is
    taken to be CAVE's (400, 410, …, 700 nm) and a 28-band cube to be on the CASSI wavelengths already, and any other
    band count is an error. ``method``: ``"interp"`` interpolates linearly between the two neighbouring input bands,
    ``"nearest"`` copies the nearest band (the shorter one on a tie). Targets outside the input range are refused
    rather than extrapolated. A cube already on the 28 wavelengths is returned unchanged (as float64).

    Returns ``(cube28, description)`` with the description saying which method was used.
    """
    if method not in ("interp", "nearest"):
        raise ValueError(f"method: expected 'interp' or 'nearest', got {method!r}")
    cube = np.asarray(cube, dtype=np.float64)
    if cube.ndim != 3:
        raise ValueError(f"cube: expected (H, W, B), got shape {cube.shape}")
    bands = cube.shape[-1]
    if wavelengths_in is None:
        if bands == NUM_BANDS:
            return cube, f"{NUM_BANDS} bands as given (taken to be the CASSI wavelengths)"
        if bands != len(CAVE_WAVELENGTHS):
            raise ValueError(f"cube: has {bands} bands; expected 31 (CAVE, 400–700 nm) or {NUM_BANDS} (CASSI), or "
                             f"pass wavelengths_in to say where its bands lie")
        wavelengths_in = CAVE_WAVELENGTHS
    source = np.asarray(wavelengths_in, dtype=np.float64)
    target = np.asarray(CASSI_WAVELENGTHS)
    if source.ndim != 1 or len(source) != bands:
        raise ValueError(f"wavelengths_in: expected {bands} wavelengths (one per band of the cube), got "
                         f"{source.shape}")
    if np.array_equal(source, target):
        return cube, f"{NUM_BANDS} bands as given (on the CASSI wavelengths)"
    if not np.all(np.diff(source) > 0):
        raise ValueError("wavelengths_in: expected strictly increasing wavelengths")
    if target[0] < source[0] or target[-1] > source[-1]:
        raise ValueError(f"wavelengths_in: {source[0]:g}–{source[-1]:g} nm does not cover the CASSI range "
                         f"{target[0]:g}–{target[-1]:g} nm (no extrapolation)")
    out = cube @ _band_weights(source, target, method)
    span = f"{source[0]:g}–{source[-1]:g} nm"
    how = "linear interpolation" if method == "interp" else "nearest band"
    return out, f"{bands} bands ({span}) → {NUM_BANDS} CASSI bands (453.5–648 nm) by {how}"


def load_cube_28(path: str | os.PathLike, key: str | None = None, layout: str | None = None,
                 method: str = "interp", wavelengths_in: Sequence[float] | None = None) -> tuple[np.ndarray, str]:
    """:func:`read_cube` then :func:`to_28_bands`: float64 (H, W, 28) in [0, 1] and one description of both."""
    cube, read_note = read_cube(path, key, layout)
    try:
        cube28, band_note = to_28_bands(cube, wavelengths_in, method)
    except ValueError as err:
        raise ValueError(f"cube file: {path}: {err}") from err
    return cube28, f"{read_note}; {band_note}"


# ----------------------------------------------------------------------------------------------------------------
# Mask
# ----------------------------------------------------------------------------------------------------------------
def load_mask(path: str | os.PathLike | None = None, key: str = "mask") -> np.ndarray:
    """The coded-aperture mask as float64 (H, W), by default ``data_root()/cassi/mask.mat`` (key ``mask``).

    The mask must be 2-D, finite, non-negative (it is a transmission) and not all zero.
    """
    if path is None:
        path = data_root() / "cassi" / "mask.mat"
        if not path.is_file():
            raise FileNotFoundError(f"mask file: {path} does not exist (the default under the shared data; set "
                                    f"LORUN_DATA or pass a path)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file: {path} does not exist")
    if path.suffix.lower() == ".npy":
        mask = _load_arrays(path)[""]
    else:
        arrays = _load_arrays(path)
        if key not in arrays:
            raise MissingKeyError(f"mask file: {path} has no key {key!r}; it has {sorted(arrays)}")
        mask = arrays[key]
    if not _is_numeric(mask):
        raise ValueError(f"mask file: {path} does not hold a numeric array (got {getattr(mask, 'dtype', type(mask))})")
    mask = mask.astype(np.float64)
    if mask.ndim != 2 or min(mask.shape) == 0:
        raise ValueError(f"mask file: {path} has shape {mask.shape}; expected a 2-D (H, W) mask")
    if not np.all(np.isfinite(mask)):
        raise ValueError(f"mask file: {path} contains NaN or inf")
    if mask.min() < 0:
        raise ValueError(f"mask file: {path} has negative values (min {mask.min():g}); a mask is a transmission ≥ 0")
    if not np.any(mask):
        raise ValueError(f"mask file: {path} is all zero; it would measure nothing")
    return np.ascontiguousarray(mask)


# ----------------------------------------------------------------------------------------------------------------
# Training batches
# ----------------------------------------------------------------------------------------------------------------
class CassiSampler:
    """Training batches of CASSI cubes: a pure function of ``(seed, step)``, like ``tasks.cs.PatchSampler``.

    ``scenes`` are (H, W, B) arrays in [0, 1] (kept as float32), all with the same B (28 for the standard
    operator). ``batch(step)`` returns ``(x, mask_crop)``:

    * ``x``: float32 (batch_size, B, crop, crop); each sample is a random scene, a random crop position and, with
      ``augment``, one of the 8 flips/rotations;
    * ``mask_crop``: float32 (crop, crop), ONE random crop of ``mask`` for the whole batch. A DUN's operator holds a
      single mask, so all samples of a batch are measured with the same one; varying its position from batch to
      batch keeps the network from learning one fixed code pattern. Put it into the operator with :func:`use_mask`.

    The generator is ``np.random.default_rng([seed, step])``: the mask position is drawn first, then per sample
    the scene, top, left and variant. A crop larger than any scene or than the mask is an error.
    """

    def __init__(self, scenes: Sequence[np.ndarray], mask: np.ndarray, crop: int, batch_size: int, seed: int = 0,
                 augment: bool = True, names: Sequence[str] | None = None):
        if not scenes:
            raise ValueError("scenes: none given")
        if isinstance(crop, bool) or not isinstance(crop, (int, np.integer)) or crop < 1:
            raise ValueError(f"crop: expected a positive int, got {crop!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if names is not None and len(names) != len(scenes):
            raise ValueError(f"names: expected {len(scenes)} names, one per scene, got {len(names)}")
        names = list(names) if names is not None else [f"scene {i}" for i in range(len(scenes))]
        arrays = []
        for name, scene in zip(names, scenes):
            scene = np.asarray(scene)
            if scene.ndim != 3:
                raise ValueError(f"scenes: {name} has shape {scene.shape}; expected (H, W, bands)")
            arrays.append(np.ascontiguousarray(scene, dtype=np.float32))
        bands = {a.shape[-1] for a in arrays}
        if len(bands) != 1:
            raise ValueError(f"scenes: expected the same number of bands in every scene, got {sorted(bands)}")
        small = [(n, a.shape) for n, a in zip(names, arrays) if a.shape[0] < crop or a.shape[1] < crop]
        if small:
            raise ValueError(f"crop: {crop}×{crop} is larger than {len(small)} scene(s), e.g. {small[0][0]} of size "
                             f"{small[0][1][0]}×{small[0][1][1]}; use a smaller crop")
        mask = np.asarray(mask, dtype=np.float32)
        if mask.ndim != 2:
            raise ValueError(f"mask: expected a 2-D (H, W) mask, got shape {mask.shape}")
        if mask.shape[0] < crop or mask.shape[1] < crop:
            raise ValueError(f"crop: {crop}×{crop} is larger than the mask ({mask.shape[0]}×{mask.shape[1]}); use a "
                             f"crop no larger than the mask")
        self.scenes, self.names, self.mask = arrays, names, np.ascontiguousarray(mask)
        self.num_bands = bands.pop()
        self.crop, self.batch_size, self.seed, self.augment = int(crop), int(batch_size), int(seed), augment

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``step``: ``(x (batch_size, B, crop, crop), mask_crop (crop, crop))``, float32."""
        rng = np.random.default_rng([self.seed, int(step)])
        c = self.crop
        top = int(rng.integers(self.mask.shape[0] - c + 1))
        left = int(rng.integers(self.mask.shape[1] - c + 1))
        mask_crop = np.ascontiguousarray(self.mask[top:top + c, left:left + c])
        x = np.empty((self.batch_size, self.num_bands, c, c), dtype=np.float32)
        for i in range(self.batch_size):
            scene = self.scenes[int(rng.integers(len(self.scenes)))]
            top = int(rng.integers(scene.shape[0] - c + 1))
            left = int(rng.integers(scene.shape[1] - c + 1))
            k = int(rng.integers(8))  # drawn even without augment, so augment does not shift later draws
            patch = scene[top:top + c, left:left + c]
            if self.augment:
                patch = np.rot90(patch, k % 4, axes=(0, 1))
                if k >= 4:
                    patch = patch[:, ::-1]
            x[i] = np.moveaxis(patch, -1, 0)
        return torch.from_numpy(x), torch.from_numpy(mask_crop)


def use_mask(operator: CASSI, mask: torch.Tensor | np.ndarray) -> CASSI:
    """Put ``mask`` into ``operator.mask`` (in the dtype and on the device of the operator's buffer): copied in place
    when the shapes agree, else the buffer is replaced (a model trained on 64² crops evaluated on 256² tiles).

    This is how a batch's mask crop from :class:`CassiSampler`, or an evaluation mask, reaches a DUN whose operator
    (and its device) is fixed at build time. Returns the operator.
    """
    if not isinstance(operator, CASSI):
        raise TypeError(f"operator: expected a CASSI operator, got {type(operator).__name__}")
    mask = torch.as_tensor(mask)
    if mask.dim() != 2:
        raise ValueError(f"mask: expected a 2-D (H, W) mask, got shape {tuple(mask.shape)}")
    with torch.no_grad():
        if tuple(mask.shape) == tuple(operator.mask.shape):
            operator.mask.copy_(mask)
        else:
            operator.mask = mask.to(dtype=operator.mask.dtype, device=operator.mask.device).clone()
    return operator


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------

def _as_cube(array, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a cube (H, W, B), got shape {array.shape}")
    return array


def _ssim_per_band(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The SSIM of each band of two (H, W, B) cubes, as MST's ``torch_ssim`` computes it (see cassi_scores): the
    11×11 Gaussian window with zero padding 5 (``padding="same"``), data range 1, the whole map averaged."""
    return np.array([ssim_gaussian(x[..., b], ref[..., b], data_range=1.0, padding="same")
                     for b in range(x.shape[-1])])


def cassi_scores(x_rec, x_true) -> tuple[float, float]:
    """``(PSNR, SSIM)`` of a reconstructed cube against the true one, with the CASSI literature's protocol.

    Both are (H, W, B) numpy arrays or tensors on the [0, 1] scale; nothing is clipped or rounded here.

    * PSNR: per band ``10·log10(1 / MSE_b)`` (peak 1), averaged over the B bands. A band reconstructed exactly
      gives ``inf`` and so does the mean, as :func:`lorun_fast.metrics.psnr` does for identical images; that
      never happens on a real reconstruction and an inf is easy to spot. (TSA-Net's code takes the true cube's
      maximum as the peak, which is 1 on its normalised KAIST cubes but not on every CAVE crop; MST's rounds
      ``x·256`` and uses peak 255, which reads about 0.03 dB lower than this.)
    * SSIM: MST's ``torch_ssim`` (``simulation/train_code/ssim_torch.py``): an 11×11 Gaussian window, σ = 1.5,
      applied to each band with zero padding of 5 ('same' size); local (co)variances as ``E[xy] − μx·μy``;
      ``C1 = 0.01²``, ``C2 = 0.03²``; the SSIM map averaged over every pixel, borders included. MST averages the
      map over all bands at once, which is the mean of the per-band SSIMs since bands have equal size. Computed
      here in float64 (MST: float32).
    """
    x_rec = _as_cube(x_rec, "x_rec")
    x_true = _as_cube(x_true, "x_true")
    if x_rec.shape != x_true.shape:
        raise ValueError(f"x_rec, x_true: expected the same shape, got {x_rec.shape} and {x_true.shape}")
    if x_rec.size == 0:
        raise ValueError(f"x_rec: empty cube (shape {x_rec.shape})")
    for name, cube in (("x_rec", x_rec), ("x_true", x_true)):
        if not np.all(np.isfinite(cube)):
            raise ValueError(f"{name}: contains NaN or inf (a diverged reconstruction has no meaningful score)")
    mse = np.mean((x_rec - x_true) ** 2, axis=(0, 1))
    with np.errstate(divide="ignore"):
        psnr_bands = 10.0 * np.log10(1.0 / mse)
    return float(np.mean(psnr_bands)), float(np.mean(_ssim_per_band(x_rec, x_true)))


# ----------------------------------------------------------------------------------------------------------------
# Test tiles
# ----------------------------------------------------------------------------------------------------------------
def tiles(cube: np.ndarray, size: int = 256, mode: str = "center",
          name: str = "scene") -> list[tuple[str, np.ndarray]]:
    """Square test cubes cut from a scene: ``[(name, tile (size, size, B)), ...]``.

    ``mode="center"``: one centred crop (offsets ``(H − size) // 2`` and ``(W − size) // 2``), named ``name``.
    ``mode="tiles"``: every non-overlapping ``size`` tile from the top-left corner, row by row, named
    ``{name}_r{row}c{col}``; a remainder narrower than ``size`` at the right or bottom is left out. A scene
    smaller than ``size`` in either direction is an error. Tiles are views of ``cube``.
    """
    cube = np.asarray(cube)
    if cube.ndim != 3:
        raise ValueError(f"cube: expected (H, W, B), got shape {cube.shape}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    h, w = cube.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cube: {name} is {h}×{w}, smaller than the {size}×{size} tile size")
    if mode == "center":
        top, left = (h - size) // 2, (w - size) // 2
        return [(name, cube[top:top + size, left:left + size])]
    if mode == "tiles":
        return [(f"{name}_r{r}c{c}", cube[r * size:(r + 1) * size, c * size:(c + 1) * size])
                for r in range(h // size) for c in range(w // size)]
    raise ValueError(f"mode: expected 'center' or 'tiles', got {mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# GAP-TV
# ----------------------------------------------------------------------------------------------------------------
def _gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along W and H, zero at the last column / row (Neumann boundary)."""
    gx = torch.zeros_like(u)
    gy = torch.zeros_like(u)
    gx[..., :, :-1] = u[..., :, 1:] - u[..., :, :-1]
    gy[..., :-1, :] = u[..., 1:, :] - u[..., :-1, :]
    return gx, gy


def _divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Minus the adjoint of :func:`_gradient` (backward differences), for fields that vanish where it does."""
    div = px.clone()
    div[..., :, 1:] -= px[..., :, :-1]
    div += py
    div[..., 1:, :] -= py[..., :-1, :]
    return div


def tv_denoise(x: torch.Tensor, weight: float, iterations: int = 5, tau: float = 0.25) -> torch.Tensor:
    """Isotropic TV denoising of each 2-D image (last two axes) of ``x`` separately, Chambolle's projection.

    Approximately solves ``min_u ½‖u − x‖² + weight·TV(u)`` per band with ``iterations`` fixed-point steps of
    the dual field ``p``, started at zero: ``p ← (p + τ∇(div p − x/weight)) / (1 + τ|∇(div p − x/weight)|)``,
    ``u = x − weight·div p``. τ = 0.25 is the step the public GAP-TV code uses (Chambolle proves convergence for
    τ ≤ 1/8; 1/4 works in practice and converges faster).
    """
    if weight <= 0:
        raise ValueError(f"weight: expected > 0, got {weight}")
    px = torch.zeros_like(x)
    py = torch.zeros_like(x)
    scaled = x / weight
    for _ in range(iterations):
        gx, gy = _gradient(_divergence(px, py) - scaled)
        norm = torch.sqrt(gx * gx + gy * gy).mul_(tau).add_(1.0)
        px = (px + tau * gx) / norm
        py = (py + tau * gy) / norm
    return x - weight * _divergence(px, py)


def _phi_sum(operator: CASSI, like: torch.Tensor) -> torch.Tensor:
    """The diagonal of Φ Φᵀ, ``Σ_λ shift_λ(mask²)``, shape (1, H, W'), with zeros set to 1 (y and Φx vanish there)."""
    mask = operator.mask.to(like.dtype)
    # A multiplies by the mask once more, so feeding it the mask itself gives Σ shift(mask²)
    weight = operator.A(mask.expand(1, operator.num_bands, *mask.shape))
    return torch.where(weight > 0, weight, torch.ones_like(weight))


@torch.no_grad()
def gap_tv(y: torch.Tensor, operator: CASSI, iterations: int = 100, tv_weight: float = 0.1,
           tv_iterations: int = 10, step: float = 1.0, accelerate: bool = True,
           x0: torch.Tensor | None = None) -> torch.Tensor:
    """GAP-TV (X. Yuan, "Generalized alternating projection based total variation minimization for compressive
    sensing", ICIP 2016) for the CASSI operator: measurements (N, H, W') → cube (N, B, H, W).

    Start ``x = Φᵀ(y / Σ_λ shift(mask²))`` (= ``operator.init(y)``, since Φ Φᵀ is diagonal for CASSI); then
    ``iterations`` times:

    * projection: with ``accelerate``, ``y1 ← y1 + (y − Φx)`` and ``x ← x + step·Φᵀ((y1 − Φx) / diag(ΦΦᵀ))``
      (the accelerated GAP of the public code, ``y1`` starting at 0); without it, ``y1`` is replaced by ``y``;
    * prior: ``x ← tv_denoise(x, tv_weight, tv_iterations)`` on each band.

    The iteration count is fixed (no stopping test), so the cost is predictable. ``tv_weight`` is on the [0, 1]
    intensity scale. Runs in ``y``'s dtype and device.
    """
    if not isinstance(operator, CASSI):
        raise TypeError(f"operator: expected a CASSI operator, got {type(operator).__name__}")
    if iterations < 0 or tv_iterations < 0:
        raise ValueError(f"iterations, tv_iterations: expected ≥ 0, got {iterations}, {tv_iterations}")
    phi_sum = _phi_sum(operator, y)
    x = operator.A_adjoint(y / phi_sum) if x0 is None else x0.to(y.dtype).clone()
    y1 = torch.zeros_like(y)
    for _ in range(iterations):
        yb = operator.A(x)
        if accelerate:
            y1 = y1 + (y - yb)
            x = x + step * operator.A_adjoint((y1 - yb) / phi_sum)
        else:
            x = x + step * operator.A_adjoint((y - yb) / phi_sum)
        if tv_iterations:
            x = tv_denoise(x, tv_weight, tv_iterations)
    return x


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
ReconstructFn = Callable[[torch.Tensor, CASSI], torch.Tensor]


def reconstructor(method: str | torch.nn.Module, **gap_tv_options) -> ReconstructFn:
    """A ``reconstruct_fn(y, operator) -> cube (N, B, H, W)`` for :func:`evaluate_cassi`.

    ``method``: ``"x0"`` (``operator.init``, the normalised shift-back), ``"gap-tv"`` (:func:`gap_tv` with
    ``gap_tv_options``) or a DUN (``lorun_fast.reference.DUN`` or anything called as ``model(y, (H, W))`` with a
    CASSI ``model.operator``). For a DUN, the evaluation mask is copied into the model's operator first
    (:func:`use_mask`), so the model measures with the same code the data was measured with.
    """
    if isinstance(method, str):
        if gap_tv_options and method != "gap-tv":
            raise ValueError(f"method: options {sorted(gap_tv_options)} only apply to 'gap-tv', not {method!r}")
        if method == "x0":
            return lambda y, operator: operator.init(y)
        if method == "gap-tv":
            return lambda y, operator: gap_tv(y, operator, **gap_tv_options)
        raise ValueError(f"method: expected 'x0', 'gap-tv' or a DUN model, got {method!r}")
    model = method
    if not isinstance(getattr(model, "operator", None), CASSI):
        raise TypeError(f"method: a model needs a CASSI operator as .operator, got "
                        f"{type(getattr(model, 'operator', None)).__name__}")

    @torch.no_grad()
    def run_model(y: torch.Tensor, operator: CASSI) -> torch.Tensor:
        use_mask(model.operator, operator.mask)
        return model(y, tuple(operator.mask.shape))

    return run_model


def evaluate_cassi(reconstruct_fn: ReconstructFn, cube_paths: Sequence[str | os.PathLike],
                   operator_mask: np.ndarray | torch.Tensor, *, size: int | None = None, mode: str = "center",
                   key: str | None = None, layout: str | None = None, band_method: str = "interp",
                   step: int = DISPERSION_STEP, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   clip: bool = True, out_dir: str | os.PathLike | None = None,
                   progress: bool = False, on_load: Callable[[Path, str], None] | None = None
                   ) -> list[ImageResult]:
    """Simulate CASSI on test cubes, reconstruct them and score them: one :class:`ImageResult` per tile.

    For each file: :func:`load_cube_28` (``key``, ``layout``, ``band_method``) → :func:`tiles` (``size``,
    ``mode``) → ``y = CASSI(mask, 28, step).A(x)`` (noise-free, in ``dtype`` on ``device``) →
    ``reconstruct_fn(y, operator)`` (timed; ``(1, 28, size, size)`` or ``(28, size, size)``) → clipped to [0, 1]
    when ``clip`` (the true cube lies there) → :func:`cassi_scores`. ``size`` defaults to the mask's side; the
    mask must be ``size × size``, since the operator measures a cube of the mask's size. Rows are named after the
    file stem (``feathers``, or ``feathers_r0c1`` for ``mode="tiles"``); height and width are the tile size.

    With ``out_dir``, writes ``<name>.png`` (false colour of the reconstruction) and ``<name>_spectra.png`` there.
    ``on_load(path, description)`` hears what was read from each file (key, layout, scaling, bands).
    """
    mask = torch.as_tensor(operator_mask).to(torch.float64)
    if mask.dim() != 2:
        raise ValueError(f"operator_mask: expected a 2-D mask, got shape {tuple(mask.shape)}")
    if size is None:
        if mask.shape[0] != mask.shape[1]:
            raise ValueError(f"operator_mask: {tuple(mask.shape)} is not square; pass size and a size×size mask")
        size = int(mask.shape[0])
    if tuple(mask.shape) != (size, size):
        raise ValueError(f"operator_mask: shape {tuple(mask.shape)} does not match the {size}×{size} test tiles")
    if not cube_paths:
        raise ValueError("cube_paths: none given")
    operator = CASSI(mask.to(dtype), NUM_BANDS, step).to(device)
    results = []
    paths = list(cube_paths)
    if progress:
        from tqdm import tqdm
        paths = tqdm(paths, desc="eval", unit="cube")
    for path in paths:
        cube, described = load_cube_28(path, key, layout, band_method)
        if on_load is not None:
            on_load(Path(path), described)
        for name, tile in tiles(cube, size, mode, Path(path).stem):
            x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(tile, -1, 0)))[None].to(device=device, dtype=dtype)
            with torch.no_grad():
                y = operator.A(x)
                start = time.perf_counter()
                x_rec = reconstruct_fn(y, operator)
                if x_rec.is_cuda:
                    torch.cuda.synchronize(x_rec.device)
                seconds = time.perf_counter() - start
            if x_rec.dim() == 4:
                if x_rec.shape[0] != 1:
                    raise ValueError(f"reconstruct_fn: returned a batch of {x_rec.shape[0]} for one cube")
                x_rec = x_rec[0]
            if tuple(x_rec.shape) != (NUM_BANDS, size, size):
                raise ValueError(f"reconstruct_fn: expected a cube of shape (1, {NUM_BANDS}, {size}, {size}), got "
                                 f"{tuple(x_rec.shape)}")
            rec = np.moveaxis(x_rec.detach().double().cpu().numpy(), 0, -1)
            if clip:
                rec = np.clip(rec, 0.0, 1.0)
            psnr_value, ssim_value = cassi_scores(rec, tile)
            results.append(ImageResult(name, size, size, psnr_value, ssim_value, seconds))
            if out_dir is not None:
                false_colour_png(rec, Path(out_dir) / f"{name}.png")
                plot_spectra(rec, tile, Path(out_dir) / f"{name}_spectra.png", title=name)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Previews
# ----------------------------------------------------------------------------------------------------------------
def _wavelengths_for(bands: int, wavelengths: Sequence[float] | None) -> np.ndarray | None:
    if wavelengths is not None:
        wavelengths = np.asarray(wavelengths, dtype=np.float64)
        if wavelengths.shape != (bands,):
            raise ValueError(f"wavelengths: expected {bands} values (one per band), got {wavelengths.shape}")
        return wavelengths
    if bands == NUM_BANDS:
        return np.asarray(CASSI_WAVELENGTHS)
    if bands == len(CAVE_WAVELENGTHS):
        return np.asarray(CAVE_WAVELENGTHS)
    return None


def false_colour_png(cube, path: str | os.PathLike, rgb_nm: tuple[float, float, float] = (620.0, 550.0, 460.0),
                     wavelengths: Sequence[float] | None = None) -> Path:
    """Write an (H, W, B) cube as an RGB PNG from the bands nearest to ``rgb_nm`` (red, green, blue).

    For 28 bands that is 625.0, 551.5 and 462.0 nm. The three bands are divided by their common maximum (so the
    colour balance is kept and the brightest value is white) after clipping negatives. Written atomically with
    :func:`lorun_fast.io.write_png_atomic`; returns the path.
    """
    cube = _as_cube(cube, "cube")
    grid = _wavelengths_for(cube.shape[-1], wavelengths)
    if grid is None:
        raise ValueError(f"cube: has {cube.shape[-1]} bands; pass wavelengths to place them")
    indices = [int(np.argmin(np.abs(grid - nm))) for nm in rgb_nm]
    rgb = np.clip(cube[..., indices], 0.0, None)
    peak = float(rgb.max())
    if peak > 0:
        rgb = rgb / peak
    return write_png_atomic(path, rgb)


def plot_spectra(cube_rec, cube_true, path: str | os.PathLike, pixels: Sequence[tuple[int, int]] | None = None,
                 wavelengths: Sequence[float] | None = None, title: str | None = None) -> Path:
    """Plot reconstructed vs true spectra at a few pixels and write the PNG atomically; returns the path.

    ``pixels`` are (row, col) positions; by default the four points at a quarter and three quarters of the height
    and width. Each panel shows both spectra over the band wavelengths (the 28 CASSI wavelengths for 28 bands)
    and their correlation coefficient, the number MST reports for spectral fidelity. Drawn with matplotlib's Agg
    canvas on a private figure (no pyplot state), saved to memory, then written with ``atomic_write_bytes``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cube_rec = _as_cube(cube_rec, "cube_rec")
    cube_true = _as_cube(cube_true, "cube_true")
    if cube_rec.shape != cube_true.shape:
        raise ValueError(f"cube_rec, cube_true: expected the same shape, got {cube_rec.shape} and {cube_true.shape}")
    h, w, bands = cube_true.shape
    if pixels is None:
        pixels = [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]
    pixels = [(int(r), int(c)) for r, c in pixels]
    if not pixels:
        raise ValueError("pixels: none given")
    outside = [p for p in pixels if not (0 <= p[0] < h and 0 <= p[1] < w)]
    if outside:
        raise ValueError(f"pixels: {outside} lie outside the {h}×{w} cube")
    grid = _wavelengths_for(bands, wavelengths)
    axis_values = grid if grid is not None else np.arange(bands)

    columns = min(len(pixels), 2)
    rows = math.ceil(len(pixels) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows), dpi=100)
    FigureCanvasAgg(figure)
    for i, (r, c) in enumerate(pixels):
        ax = figure.add_subplot(rows, columns, i + 1)
        true, rec = cube_true[r, c], cube_rec[r, c]
        ax.plot(axis_values, true, "k-", label="original")
        ax.plot(axis_values, rec, "r--", label="reconstruction")
        corr = np.corrcoef(true, rec)[0, 1] if np.std(true) > 0 and np.std(rec) > 0 else float("nan")
        ax.set_title(f"pixel ({r}, {c}), corr {corr:.3f}", fontsize=9)
        ax.set_xlabel("wavelength (nm)" if grid is not None else "band")
        ax.set_ylabel("intensity")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# The task plug-in
# ----------------------------------------------------------------------------------------------------------------
#: Scenes of the shared CAVE folder held out of training by default (one full scene and the 16-bit cloth).
HELD_OUT = ("sushi", "cloth_256")


def cube_files(paths) -> list[Path]:
    """The ``.mat``/``.npy`` cubes named by ``paths`` (files, or folders whose cubes are taken), in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in (".mat", ".npy"))
            if not found:
                raise ValueError(f"cubes: {entry} holds no .mat or .npy cubes")
            files += found
        elif entry.is_file():
            files.append(entry)
        else:
            raise FileNotFoundError(f"cubes: {entry} does not exist")
    return files


class CassiTask:
    """Single-disperser CASSI: 28-band cubes, the real 256² mask (random crops of it in training), step 2.

    Record: ``{"task": "cassi", "mask": path or None (the shared mask), "num_bands": 28, "step": 2}``.
    """

    name = "cassi"
    default_crop = 256

    def record(self, config) -> dict:
        return {"task": self.name, "mask": str(Path(config.mask).absolute()) if config.mask else None,
                "num_bands": NUM_BANDS, "step": DISPERSION_STEP}

    def operator(self, record: dict) -> CASSI:
        mask = load_mask(record.get("mask"))
        return CASSI(torch.from_numpy(mask), int(record.get("num_bands", NUM_BANDS)),
                     int(record.get("step", DISPERSION_STEP)))

    def training_operator(self, record: dict, config) -> CASSI:
        """The operator at the crop size (its mask is replaced by each batch's crop)."""
        mask = load_mask(record.get("mask"))
        if config.crop > min(mask.shape):
            raise ValueError(f"crop: {config.crop} is larger than the mask ({mask.shape[0]}×{mask.shape[1]})")
        crop = np.ascontiguousarray(mask[:config.crop, :config.crop])
        return CASSI(torch.from_numpy(crop), NUM_BANDS, DISPERSION_STEP)

    def backbone_kwargs(self, backbone: str, kwargs: dict) -> dict:
        if backbone != "resunet":
            raise ValueError(f"backbone: the cassi task uses the resunet backbone (28 bands in and out), got "
                             f"{backbone!r}")
        kwargs = dict(kwargs)
        if kwargs.setdefault("in_channels", NUM_BANDS) != NUM_BANDS:
            raise ValueError(f"backbone_kwargs: in_channels {kwargs['in_channels']} is not the {NUM_BANDS} bands")
        return kwargs

    def default_train_images(self) -> str:
        return str(data_root() / "cassi" / "cave")

    def default_adapter_name(self, config) -> str:
        return "cassi"

    def training_files(self, config) -> list[Path]:
        files = [p for p in cube_files(config.train_images or self.default_train_images())
                 if p.stem not in set(config.exclude)]
        if not files:
            raise ValueError(f"train_images: no cube left for training after excluding {list(config.exclude)}")
        return files

    def sampler(self, config) -> CassiSampler:
        files = self.training_files(config)
        scenes = [load_cube_28(p)[0] for p in files]
        return CassiSampler(scenes, load_mask(config.mask), config.crop, config.batch_size, config.seed,
                            config.augment, [p.stem for p in files])

    def rank_slice(self, batch, rank: int, world_size: int):
        x, mask = batch
        per = x.shape[0] // world_size
        return x[rank * per:(rank + 1) * per], mask

    def loss(self, model, train_model, batch, device, bf16: bool) -> torch.Tensor:
        """MSE of the reconstruction of a batch measured with its mask crop."""
        x, mask = batch
        x = x.to(device)
        use_mask(model.operator, mask.to(device))
        with torch.no_grad():
            y = model.operator.A(x)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            x_hat = train_model(y, tuple(x.shape[-2:]))
        return torch.nn.functional.mse_loss(x_hat.float(), x)

    def validation_files(self, paths) -> list[Path]:
        return cube_files(paths)

    def check(self, config, need) -> None:
        """The CASSI part of ``TrainConfig.validate`` (Φ options are CS's; the ratio is ignored)."""
        need(config.phi is None and config.qinit is None and config.gaussian_seed is None,
             "phi, qinit, gaussian_seed: the cassi task measures with a mask, not a sampling matrix")
        need(config.model.backbone == "resunet", f"backbone: the cassi task uses the resunet backbone, got "
                                                 f"{config.model.backbone!r}")
        need(config.crop <= 256, f"crop: expected at most the mask's 256, got {config.crop}")
        need(config.degradation == "bicubic" and config.blur_sigma is None and config.blur_size is None,
             "degradation, blur_sigma, blur_size: only the sr task has them")

    def validate(self, model, paths, device: str, config) -> list[ImageResult]:
        return evaluate_cassi(reconstructor(model), paths, load_mask(config.mask), device=device)


TASK = CassiTask()
