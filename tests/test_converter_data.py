"""Calibration/evaluation data: .npz, .npy and image folders, and one-line errors naming the problem."""

from __future__ import annotations

import numpy as np
import pytest

from converter.data import load_dataset
from converter.errors import DataError

SHAPE = (1, 8, 8, 1)


def _npz(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _error(path, shape=SHAPE, **kwargs) -> str:
    with pytest.raises(DataError) as exc:
        load_dataset(path, shape, purpose="calibration", **kwargs)
    message = str(exc.value)
    assert "\n" not in message and str(path) in message and "calibration" in message
    return message


def test_npz_with_labels_and_a_bounded_reproducible_sample(digits, tmp_path):
    x, y = digits[0], digits[1]
    path = _npz(tmp_path, x=x, y=y)
    full = load_dataset(path, SHAPE, purpose="calibration")
    assert full.x.dtype == np.float32 and full.x.shape == x.shape and full.y.dtype == np.int64
    assert len(full) == full.total == len(x)
    sample = load_dataset(path, SHAPE, purpose="calibration", limit=100, seed=3)
    again = load_dataset(path, SHAPE, purpose="calibration", limit=100, seed=3)
    assert len(sample) == 100 and sample.total == len(x)
    np.testing.assert_array_equal(sample.x, again.x)
    assert "100 of" in sample.describe()
    # Samples keep their labels: every sampled row is a row of the original with the same label.
    rows = {x[i].tobytes(): int(y[i]) for i in range(len(x))}
    assert all(rows[sample.x[i].tobytes()] == sample.y[i] for i in range(100))


def test_npy_without_labels(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).random((5, 8, 8, 1)).astype(np.float64))
    data = load_dataset(path, SHAPE, purpose="evaluation")
    assert data.y is None and data.x.dtype == np.float32 and data.x.shape == (5, 8, 8, 1)


def test_integer_images_are_cast_without_rescaling(tmp_path):
    x = np.full((3, 8, 8, 1), 200, dtype=np.uint8)
    data = load_dataset(_npz(tmp_path, x=x), SHAPE, purpose="calibration")
    assert data.x.dtype == np.float32 and float(data.x.max()) == 200.0


def test_wrong_shape_says_expected_and_got(tmp_path):
    message = _error(_npz(tmp_path, x=np.zeros((4, 8, 8), np.float32)))
    assert "'x'" in message and "(4, 8, 8)" in message and "(N, 8, 8, 1)" in message


def test_strings_and_objects_are_rejected(tmp_path):
    strings = tmp_path / "strings.npy"
    np.save(strings, np.array([["a"] * 8] * 8, dtype=str)[None, ..., None])
    assert "non-numeric" in _error(strings)
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([{"a": 1}, None], dtype=object))
    assert "Python objects" in _error(objects)


def test_nan_and_inf_are_counted_with_the_first_index(tmp_path):
    x = np.zeros((4, 8, 8, 1), np.float32)
    x[1, 2, 3, 0] = np.nan
    x[3, 0, 0, 0] = np.inf
    message = _error(_npz(tmp_path, x=x))
    assert "2 NaN or infinite" in message and "(1, 2, 3, 0)" in message


def test_empty_data(tmp_path):
    assert "empty" in _error(_npz(tmp_path, x=np.zeros((0, 8, 8, 1), np.float32)))


def test_label_problems(tmp_path):
    x = np.zeros((4, 8, 8, 1), np.float32)
    assert "3 labels but 'x' has 4" in _error(_npz(tmp_path, "a.npz", x=x, y=np.arange(3)))
    assert "must be integers" in _error(_npz(tmp_path, "b.npz", x=x, y=np.array([0.5, 1, 2, 3])))


def test_missing_x_lists_the_arrays_found(tmp_path):
    assert "found: images" in _error(_npz(tmp_path, images=np.zeros((2, 8, 8, 1))))


def test_missing_file_and_unknown_format(tmp_path):
    assert "no such file" in _error(tmp_path / "absent.npz")
    csv = tmp_path / "data.csv"
    csv.write_text("1,2,3\n")
    assert "unsupported data format" in _error(csv)


def _image(path, size, color, mode="RGB"):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    _image(tmp_path / "imgs" / "dog" / "1.png", (32, 20), (255, 255, 255))
    _image(tmp_path / "imgs" / "cat" / "1.jpg", (16, 16), (0, 0, 0))
    _image(tmp_path / "imgs" / "cat" / "2.png", (10, 12), (255, 0, 0))
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image, ignored")
    gray = load_dataset(tmp_path / "imgs", SHAPE, purpose="calibration")
    assert gray.classes == ["cat", "dog"]          # sorted sub-folder names -> class indices
    assert gray.y.tolist() == [0, 0, 1]
    assert gray.x.shape == (3, 8, 8, 1) and gray.x.dtype == np.float32
    assert gray.x[2].min() == pytest.approx(1.0) and gray.x[0].max() == pytest.approx(0.0)
    rgb = load_dataset(tmp_path / "imgs", (1, 4, 6, 3), purpose="calibration")
    assert rgb.x.shape == (3, 4, 6, 3)
    np.testing.assert_allclose(rgb.x[1, 0, 0], [1.0, 0.0, 0.0])


def test_flat_image_folder_has_no_labels_and_respects_the_limit(tmp_path):
    for i in range(5):
        _image(tmp_path / f"{i}.png", (8, 8), i * 40, mode="L")
    data = load_dataset(tmp_path, SHAPE, purpose="calibration", limit=2)
    assert data.y is None and len(data) == 2 and data.total == 5


def test_unreadable_image_is_named(tmp_path):
    _image(tmp_path / "ok.png", (8, 8), 0, mode="L")
    (tmp_path / "broken.png").write_bytes(b"definitely not a png")
    message = _error(tmp_path)
    assert "broken.png" in message and "cannot be read" in message
