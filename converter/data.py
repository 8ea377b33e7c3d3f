"""Calibration and evaluation data: .npz (arrays ``x`` and optionally ``y``), .npy, or a folder of images.

Data is checked before TensorFlow sees it, because the converter's own errors on bad
calibration data are deep stack traces. Every DataError is one line naming the file and the
array (or image) and saying what was expected and what was found.

Scaling: numeric arrays are used as they are. Integer ``x`` (uint8 images, say) is cast to
float32 *without* rescaling, so it must already be in the range the model was trained on.
Images from a folder are the exception: they are decoded with Pillow, resized to the model's
height x width, converted to its channel count (L for 1 channel, RGB for 3) and scaled to
[0, 1] float32, the usual Keras preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class Dataset:
    """Model-ready samples. ``total`` is how many the source held before a ``limit`` was applied."""

    x: np.ndarray                 # float32, shape (N, *input_shape[1:])
    y: np.ndarray | None          # int64 labels, shape (N,), or None
    source: str
    total: int = 0
    classes: list[str] | None = None   # sub-folder names, index = label, for image folders

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def describe(self) -> str:
        """For reports: '200 of 1437 samples from data.npz (random sample, seed 0)'."""
        n = len(self)
        if self.total and self.total != n:
            return f"{n} of {self.total} samples from {self.source} (random sample)"
        return f"{n} samples from {self.source}"


def load_dataset(path: str | Path, input_shape: tuple[int, ...], *, purpose: str,
                 limit: int | None = None, seed: int = 0) -> Dataset:
    """Load and check data for a model whose input is ``input_shape`` (batch first).

    ``purpose`` ("calibration", "evaluation") goes into error messages. ``limit`` draws a
    random sample of at most that many items (seeded, so a rerun uses the same samples).
    """
    path = Path(path)
    where = f"{purpose} data {path}"
    if not path.exists():
        raise DataError(f"{where}: no such file or directory")
    if limit is not None and limit < 1:
        raise DataError(f"{where}: the sample limit must be at least 1, got {limit}")
    if path.is_dir():
        return _load_image_folder(path, where, input_shape, limit, seed)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y = _load_npz(path, where)
    elif suffix == ".npy":
        x, y = _load_array(path, where, "x"), None
    else:
        raise DataError(f"{where}: unsupported data format {suffix or '(no suffix)'!r}; "
                        "expected .npz (arrays x and y), .npy, or a folder of images")
    x, y = check_arrays(x, y, input_shape, where)
    total = len(x)
    index = _sample(total, limit, seed)
    if index is not None:
        x = x[index]
        y = y[index] if y is not None else None
    return Dataset(x=np.ascontiguousarray(x, dtype=np.float32), y=y, source=str(path), total=total)


def _sample(total: int, limit: int | None, seed: int) -> np.ndarray | None:
    if limit is None or limit >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))


def _load_npz(path: Path, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if "x" not in names:
                raise DataError(f"{where}: no array named 'x' (found: {', '.join(names) or 'none'}); "
                                "save the inputs as x (and the labels as y)")
            x = _read_member(archive, "x", where)
            y = _read_member(archive, "y", where) if "y" in names else None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{where}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    return x, y


def _read_member(archive, name: str, where: str) -> np.ndarray:
    try:
        return archive[name]
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataError(f"{where}: array {name!r} holds Python objects, not numbers") from None
        raise DataError(f"{where}: array {name!r} cannot be read ({exc})") from None
    except Exception as exc:
        raise DataError(f"{where}: array {name!r} cannot be read ({type(exc).__name__}: {exc})") from None


def _load_array(path: Path, where: str, name: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataError(f"{where}: array {name!r} holds Python objects, not numbers") from None
        raise DataError(f"{where}: not a readable .npy file ({exc})") from None
    except Exception as exc:
        raise DataError(f"{where}: not a readable .npy file ({type(exc).__name__}: {exc})") from None


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def check_arrays(x: np.ndarray, y: np.ndarray | None, input_shape: tuple[int, ...],
                 where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate x (and y) against the model input; returns x as float32 and y as int64.

    Pure (no I/O) so the rules can be tested on arrays directly.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise DataError(f"{where}: array 'x' has dtype {x.dtype} (non-numeric); expected numbers (float or int)")
    expected = tuple(input_shape[1:])
    if x.ndim != len(input_shape) or tuple(x.shape[1:]) != expected:
        raise DataError(f"{where}: array 'x' has shape {_fmt_shape(x.shape)}, "
                        f"expected {_fmt_shape(('N', *expected))} to match the model input")
    if x.shape[0] == 0:
        raise DataError(f"{where}: array 'x' is empty (0 samples)")
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x)
        count = int(bad.sum())
        if count:
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataError(f"{where}: array 'x' has {count} NaN or infinite value(s), the first at index {first}")
    if y is not None:
        y = np.asarray(y)
        if y.dtype.kind not in "iu":
            raise DataError(f"{where}: array 'y' has dtype {y.dtype}; labels must be integers (class indices)")
        if y.ndim != 1:
            raise DataError(f"{where}: array 'y' has shape {_fmt_shape(y.shape)}; "
                            "expected one integer label per sample, shape (N,)")
        if len(y) != len(x):
            raise DataError(f"{where}: array 'y' has {len(y)} labels but 'x' has {len(x)} samples")
        y = y.astype(np.int64)
    return x.astype(np.float32, copy=False), y


def _load_image_folder(path: Path, where: str, input_shape: tuple[int, ...],
                       limit: int | None, seed: int) -> Dataset:
    if len(input_shape) != 4 or input_shape[3] not in (1, 3):
        raise DataError(f"{where}: a folder of images needs a model input of shape (N, H, W, 1 or 3), "
                        f"the model takes {_fmt_shape(('N', *input_shape[1:]))}")
    top = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    labelled = [(f.name, sorted(p for p in f.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
                for f in folders]
    labelled = [(name, files) for name, files in labelled if files]
    if top and labelled:
        raise DataError(f"{where}: has images both at the top level ({top[0].name}) and in sub-folders; "
                        "put every image in a class sub-folder, or none")
    if labelled:
        classes = [name for name, _ in labelled]
        items = [(file, label) for label, (_, files) in enumerate(labelled) for file in files]
    else:
        classes = None
        items = [(file, None) for file in top]
    if not items:
        raise DataError(f"{where}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    total = len(items)
    index = _sample(total, limit, seed)
    if index is not None:
        items = [items[i] for i in index]
    height, width, channels = input_shape[1:]
    x = np.stack([_read_image(file, where, height, width, channels) for file, _ in items])
    y = np.array([label for _, label in items], dtype=np.int64) if classes else None
    return Dataset(x=x, y=y, source=str(path), total=total, classes=classes)


def _read_image(file: Path, where: str, height: int, width: int, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(file) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((width, height), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: image {file} cannot be read ({type(exc).__name__}: {exc})") from None
    return array[..., None] if channels == 1 else array
