"""Image and file I/O for evaluation and training.

Everything here returns plain numpy arrays with a fixed, documented convention, so that the Set11 / Set5
numbers computed by this package can be compared with the published ones:

* :func:`read_gray` gives the 8-bit gray image the CS papers (ISTA-Net and its successors) evaluate on.
* :func:`read_rgb` and :func:`rgb_to_y` give the Y channel the SR papers evaluate on.
* The ``atomic_write_*`` functions never leave a half-written file behind, so a killed training run or a
  crashed benchmark cannot corrupt a result that was already there.

Errors name the path and say what was expected and what was found.
"""

from __future__ import annotations

import os
import re
import secrets
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "data_root",
    "read_gray",
    "read_rgb",
    "rgb_to_y",
    "list_images",
    "write_png_atomic",
    "atomic_write_bytes",
    "atomic_write_text",
    "TEMP_NAME",
    "remove_stale_temps",
    "check_writable_folder",
    "same_file",
    "check_not_inputs",
    "check_file_name",
    "check_output_folder",
]

#: File name endings :func:`list_images` accepts (compared case-insensitively).
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")

# PIL modes that hold 8-bit (or 1-bit) samples and that these readers know how to convert.
_GRAY_MODES = ("1", "L", "LA")
_PALETTE_MODES = ("P", "PA")
_RGB_MODES = ("RGB", "RGBA")
_SUPPORTED_MODES = _GRAY_MODES + _PALETTE_MODES + _RGB_MODES

# OpenCV's fixed-point luma for 8-bit BGR2YCrCb / BGR2GRAY: Y = (R*4899 + G*9617 + B*1868 + 2^13) >> 14.
# The weights are 0.299, 0.587, 0.114 scaled by 2^14 and sum to exactly 2^14, so R == G == B == v gives v.
_LUMA_WEIGHTS_Q14 = (4899, 9617, 1868)
_LUMA_SHIFT = 14


# --------------------------------------------------------------------------------------------------------------
# Where the data lives
# --------------------------------------------------------------------------------------------------------------
def data_root() -> Path:
    """The folder holding the benchmark data (``Set11/``, ``Set5/``, ``cs_sampling/``, ...).

    Resolution order, first match wins:

    1. the environment variable ``LORUN_DATA`` when set and non-empty (``~`` expanded, made absolute
       against the current directory);
    2. ``<repo root>/../shared/data`` where the repo root is the folder above the ``lorun_fast/`` package,
       recognised by its ``pyproject.toml`` (a source checkout or an editable install);
    3. otherwise (a regular, non-editable install, where the package sits in ``site-packages``)
       ``<current directory>/../shared/data``, which is right when commands run from the repo root.

    The data is third-party and kept outside the repository, so it may be absent: this function never
    raises for that. Callers check ``data_root().exists()`` (tests skip when it is missing).
    """
    env = os.environ.get("LORUN_DATA", "").strip()
    if env:
        return Path(env).expanduser().absolute()
    repo_root = Path(__file__).resolve().parent.parent
    if (repo_root / "pyproject.toml").is_file():
        return repo_root.parent / "shared" / "data"
    return Path.cwd().parent / "shared" / "data"


# --------------------------------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------------------------------
def _open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, turning every failure into an error that names the path.

    PIL decodes lazily, so a truncated file would otherwise only fail later, far from the file name;
    ``load()`` here forces the decode while we still know which file it was.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: '{path}'")
    if not path.is_file():
        raise ValueError(f"expected an image file, but '{path}' is not a regular file (a folder?)")
    try:
        with Image.open(path) as img:
            img.load()
    except PermissionError as exc:
        raise PermissionError(f"cannot read image file '{path}': permission denied") from exc
    except UnidentifiedImageError as exc:
        raise ValueError(f"'{path}' is not an image PIL can read (unknown or unsupported format)") from exc
    except Image.DecompressionBombError as exc:
        raise ValueError(f"'{path}' is too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ValueError(f"'{path}' looks like an image but could not be decoded (corrupt or truncated?): "
                         f"{exc}") from exc
    return img


def _check_8bit_mode(img: Image.Image, path: str | os.PathLike) -> None:
    """Refuse modes whose samples are not 8-bit, rather than silently clipping or rescaling them.

    16-bit gray ('I;16'), 32-bit ('I', 'F') and exotic colour spaces have no single right mapping to
    uint8; whoever reads such data (e.g. the 16-bit CAVE cube) must scale it deliberately.
    """
    if img.mode not in _SUPPORTED_MODES:
        raise ValueError(f"'{path}' has PIL mode '{img.mode}'; expected an 8-bit image in one of the modes "
                         f"{', '.join(_SUPPORTED_MODES)} (16-bit and float images are not rescaled here)")


def _palette_is_gray(img: Image.Image) -> bool:
    """True when every palette entry has R == G == B, i.e. the palette only encodes gray levels."""
    palette = np.asarray(img.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    return bool(np.all(palette[:, 0] == palette[:, 1]) and np.all(palette[:, 1] == palette[:, 2]))


def _luma_opencv(rgb: np.ndarray) -> np.ndarray:
    """Luma of uint8 RGB exactly as OpenCV's 8-bit ``COLOR_BGR2YCrCb`` (channel Y) computes it.

    OpenCV uses 14-bit fixed point with round-half-up, not ``round(0.299 R + 0.587 G + 0.114 B)``; the
    two disagree on about 0.2 % of colours, so the integer form is used to match OpenCV bit for bit.
    """
    wr, wg, wb = _LUMA_WEIGHTS_Q14
    rgb = rgb.astype(np.int32)
    acc = wr * rgb[..., 0] + wg * rgb[..., 1] + wb * rgb[..., 2] + (1 << (_LUMA_SHIFT - 1))
    return (acc >> _LUMA_SHIFT).astype(np.uint8)


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit image as a gray uint8 array of shape (H, W).

    * 'L' (8-bit gray) is returned unchanged; 'LA' drops alpha; '1' (bilevel) becomes 0 / 255.
    * 'P' (palette) with a gray palette, like Set11's ``Parrots.tif`` and ``foreman.tif``, goes through
      PIL's ``.convert("L")``, which maps each index to its gray value exactly. A colour palette is
      expanded to RGB and treated as below.
    * 'RGB' / 'RGBA' (alpha dropped, not composited) become the luma Y of YCbCr computed as OpenCV's
      8-bit ``COLOR_BGR2YCrCb`` does (Y ≈ 0.299 R + 0.587 G + 0.114 B, rounded), the conversion CS/denoising
      code built on ``cv2.imread`` applies; a gray image stored as RGB keeps its values exactly.
    * 16-bit gray ('I;16'), 32-bit integer or float images raise ``ValueError``: there is no canonical
      8-bit scaling for them, so the caller must choose one.

    Multi-frame files (multi-page TIFF) give their first frame.
    """
    img = _open_image(path)
    _check_8bit_mode(img, path)
    if img.mode in _GRAY_MODES:
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if img.mode in _PALETTE_MODES and _palette_is_gray(img):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return _luma_opencv(rgb)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit image as a uint8 RGB array of shape (H, W, 3).

    Gray and palette images are expanded to three channels; alpha is dropped (not composited onto a
    background), which is what evaluation on PNG test sets expects. 16-bit and float images raise
    ``ValueError`` for the reason given in :func:`read_gray`.
    """
    img = _open_image(path)
    _check_8bit_mode(img, path)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """The BT.601 'studio swing' luma used to report SR results, as float64 on the 0..255 scale.

    For uint8 R, G, B: ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255``, so Y lies in [16, 235]
    (black 16, white 235). This is MATLAB's ``rgb2ycbcr`` Y channel before MATLAB rounds it to uint8 for
    uint8 input; the Python SR evaluation code (BasicSR ``to_y_channel``, SwinIR's test script) uses this
    unrounded float value, and so do we. Round the result yourself if you need MATLAB's uint8 output.

    Only uint8 input of shape (H, W, 3) is accepted: a float image could be on a [0, 1] or a [0, 255]
    scale and guessing wrongly would silently give a wrong PSNR.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"rgb_to_y: img must be uint8 RGB, got dtype {img.dtype}; "
                         "quantise to uint8 first (the SR protocol evaluates 8-bit outputs)")
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"rgb_to_y: img must have shape (H, W, 3), got {img.shape}")
    rgb = img.astype(np.float64)
    weighted = 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]
    return 16.0 + weighted / 255.0


# --------------------------------------------------------------------------------------------------------------
# Listing image folders
# --------------------------------------------------------------------------------------------------------------
def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (plain string order, as ``sorted`` gives).

    A file counts as an image when its suffix is one of :data:`IMAGE_SUFFIXES`, compared
    case-insensitively (Set11 uses ``.tif``, other sets ``.PNG`` or ``.jpeg``). Sub-folders are not
    searched, and hidden files (name starting with '.', e.g. macOS ``._x.png`` resource forks) are skipped.
    A missing folder or a folder without images is an error: evaluating on zero images would otherwise
    produce an empty average that looks like a result.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: '{folder}'")
    if not folder.is_dir():
        raise NotADirectoryError(f"expected a folder of images, but '{folder}' is not a folder")
    images = sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found in '{folder}'")
    return images


# --------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------
#: The name of a temp file :func:`_atomic_write` creates beside ``target``: ``.<target name>.<12 hex>.tmp``.
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{12}\.tmp$")


def _create_temp_beside(target: Path) -> tuple[Path, int]:
    """Create a new, uniquely named temp file in ``target``'s folder and return (path, fd).

    The temp file must be in the same folder so that ``os.replace`` is a rename within one file system
    (atomic), not a copy. It is opened with mode 0o666 so the process umask gives the final file the
    same permissions a plain ``open(path, "w")`` would (``tempfile.mkstemp`` would force 0o600).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return temp, os.open(temp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temp file beside '{target}'")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); best effort, silently skipped where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers only ever see the old file or the complete new one.

    Data goes to a temp file beside the target, is flushed to disk, then renamed over the target with
    ``os.replace``. On any failure the temp file is removed and the old target is left untouched.
    Parent folders are created as needed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp, fd = _create_temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path`` (see :func:`_atomic_write`); returns the path written."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes: data must be bytes, got {type(data).__name__}")
    return _atomic_write(path, bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Atomically write ``text`` to ``path``, encoded with ``encoding``; newlines are written as given
    (no '\\n' → '\\r\\n' translation, so files are byte-identical on every platform)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text: text must be str, got {type(text).__name__}")
    return _atomic_write(path, text.encode(encoding))


def _to_uint8_image(array: np.ndarray) -> np.ndarray:
    """Validate a gray (H, W) or RGB (H, W, 3) image and bring it to uint8.

    uint8 passes unchanged. Floats are read as intensities in [0, 1]: clipped to that range, scaled by
    255 and rounded to nearest (ties to even, ``np.rint``). Other dtypes are refused, because an int
    array could be on any scale.
    """
    array = np.asarray(array)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise ValueError(f"write_png_atomic: array must be gray (H, W) or RGB (H, W, 3), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"write_png_atomic: array is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"write_png_atomic: array must be uint8 or float in [0, 1], got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError("write_png_atomic: float array contains NaN or inf")
    return np.rint(np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def write_png_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a gray or RGB image as PNG, atomically, creating parent folders; returns the path written.

    Accepts uint8 as is, or float intensities in [0, 1] (clipped, then rounded to uint8; see
    :func:`_to_uint8_image`). The PNG is encoded in memory first, so an encoding error never touches
    the target file.
    """
    pixels = np.ascontiguousarray(_to_uint8_image(array))
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # uint8 (H, W) -> 'L', (H, W, 3) -> 'RGB'
    return _atomic_write(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------------------------
# Guarding what the user owns
# --------------------------------------------------------------------------------------------------------------
def remove_stale_temps(folder: str | os.PathLike, owned: re.Pattern) -> list[Path]:
    """Remove the temp files a killed atomic write left in ``folder``, but only those whose target name matches
    ``owned`` (the caller's own files): a temp file of anything else is not ours to delete. Returns what went."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = TEMP_NAME.match(entry.name)
        if match and owned.fullmatch(match.group("target")) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def check_writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` if needed and prove it writable with a real (then removed) temp file, so that a folder that
    cannot take results fails before the work, not after it. ``what`` names the argument in errors."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{what} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temp, fd = _create_temp_beside(folder / "write-check")
        os.close(fd)
        temp.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise PermissionError(f"{what} {folder}: cannot write there ({reason})") from err
    return folder


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same real path (symbolic links resolved), or hard links of one file."""
    a, b = Path(a), Path(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_inputs(outputs: dict[str, str | os.PathLike], inputs: dict[str, str | os.PathLike]) -> None:
    """Refuse an output path that is one of the inputs (by real path): writing it would destroy the input.

    ``outputs`` and ``inputs`` map a label for messages (e.g. ``"--out"``, ``"--image"``) to a path; None values
    are skipped."""
    for out_label, out_path in outputs.items():
        if out_path is None:
            continue
        for in_label, in_path in inputs.items():
            if in_path is not None and same_file(out_path, in_path):
                raise ValueError(f"{out_label} {out_path}: is the input {in_label} {in_path}; writing it would "
                                 f"overwrite the input. Choose another output path")


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_file_name(name: str, what: str) -> str:
    """``name`` after checking it is a plain file-name component (letters, digits, ``. _ + -``; no folders, no
    ``..``), so that it cannot write outside the folder it is meant for."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what}: expected a plain name (letters, digits, '.', '_', '+', '-'; no '/' or '..'), "
                         f"got {name!r}")
    return name


def check_output_folder(folder: str | os.PathLike, planned, replaceable, what: str) -> Path:
    """Before any work: ``folder`` is (made) writable, and of the files ``planned`` there, those already present are
    all ``replaceable`` (written by an earlier run of the same command), so that nothing else is overwritten."""
    folder = check_writable_folder(folder, what)
    in_the_way = sorted(name + ("/" if (folder / name).is_dir() else "") for name in planned
                        if (folder / name).exists() or (folder / name).is_symlink())
    in_the_way = [name for name in in_the_way if name.endswith("/") or name not in replaceable]
    if in_the_way:
        shown = ", ".join(in_the_way[:8]) + (f" and {len(in_the_way) - 8} more" if len(in_the_way) > 8 else "")
        raise FileExistsError(f"{what} {folder}: already holds {shown}, which this command would overwrite and an "
                              f"earlier run of it did not write; choose another folder")
    return folder
