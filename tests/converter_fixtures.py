"""Session fixtures for the converter tests: the digits CNN (trained once in conftest) in every
source format the converter reads, and calibration/evaluation files made from the digits data.

Import the fixtures into a test module with ``from tests.converter_fixtures import *``. The
work is cached per path so importing them into several modules still saves each format once.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

__all__ = ["digits_h5", "digits_savedmodel", "digits_npz", "digits_source"]


@functools.lru_cache(maxsize=None)
def _resave(keras_path: str, target: str) -> Path:
    import keras
    model = keras.models.load_model(keras_path)
    if target.endswith(".h5"):
        model.save(target)
    else:
        model.export(target, verbose=False)
    return Path(target)


@functools.lru_cache(maxsize=None)
def _source(path: str):
    from converter.models import load_source
    return load_source(path)


@pytest.fixture(scope="session")
def digits_h5(digits_keras) -> Path:
    """The same trained digits CNN, saved in the legacy HDF5 format."""
    return _resave(str(digits_keras), str(digits_keras.with_name("digits.h5")))


@pytest.fixture(scope="session")
def digits_savedmodel(digits_keras) -> Path:
    """The same trained digits CNN, exported as a SavedModel directory (model.export)."""
    return _resave(str(digits_keras), str(digits_keras.with_name("digits_savedmodel")))


@pytest.fixture(scope="session")
def digits_source(digits_keras):
    """The .keras model loaded once with converter.models.load_source."""
    return _source(str(digits_keras))


@pytest.fixture(scope="session")
def digits_npz(digits, tmp_path_factory) -> tuple[Path, Path]:
    """(calibration .npz with the training split, evaluation .npz with the test split)."""
    x_train, y_train, x_test, y_test = digits
    directory = tmp_path_factory.mktemp("digits_data")
    cal, ev = directory / "calibration.npz", directory / "eval.npz"
    np.savez(cal, x=x_train, y=y_train)
    np.savez(ev, x=x_test, y=y_test)
    return cal, ev
