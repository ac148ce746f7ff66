"""The demo model: a small CNN on scikit-learn's 8x8 digits.

It ships inside scikit-learn (no download), trains in a few seconds on two
CPU cores and still shows everything the pipeline does: full-integer
quantization, the accuracy gate, self-test vectors and a drift baseline.
``variant`` gives a "retrained" model that differs from the first one, so a
second release really carries different bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import keras

__all__ = [
    "DIGITS_INPUT_SHAPE",
    "DIGITS_LABELS",
    "DigitsSplits",
    "build_digits_cnn",
    "load_digits_splits",
    "train_digits_cnn",
]

log = logging.getLogger(__name__)

DIGITS_INPUT_SHAPE = (8, 8, 1)
DIGITS_LABELS = tuple(str(i) for i in range(10))

#: Held-out sizes. The test set is 20% of the 1797 images; 200 calibration
#: images are plenty for int8 ranges and for drift quantiles.
_TEST_SIZE = 360
_CALIB_SIZE = 200
#: Pixel values in ``load_digits`` are integers 0..16.
_PIXEL_MAX = 16.0
#: Dense width of variant 0; each variant adds a little so retrains differ in shape too.
_DENSE_UNITS = 44
_DENSE_STEP = 4
_VARIANT_SEED_STRIDE = 7919


@dataclass(frozen=True)
class DigitsSplits:
    """Train / calibration / test splits, images ``(N, 8, 8, 1)`` float32 in [0, 1]."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_calib: npt.NDArray[np.float32]
    y_calib: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]

    @property
    def n_classes(self) -> int:
        return len(DIGITS_LABELS)


def load_digits_splits(seed: int = 0) -> DigitsSplits:
    """Load the digits and split them, stratified and deterministic for a given ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (np.asarray(data.images, dtype=np.float32) / _PIXEL_MAX)[..., np.newaxis]
    y = np.asarray(data.target, dtype=np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=_TEST_SIZE, stratify=y, random_state=seed
    )
    x_train, x_calib, y_train, y_calib = train_test_split(
        x_rest, y_rest, test_size=_CALIB_SIZE, stratify=y_rest, random_state=seed
    )
    return DigitsSplits(
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_calib=np.ascontiguousarray(x_calib),
        y_calib=np.ascontiguousarray(y_calib),
        x_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test),
    )


def build_digits_cnn(seed: int = 0, *, dense_units: int = _DENSE_UNITS) -> keras.Model:
    """Conv 3x3x16 -> Conv 3x3x32 -> max-pool -> dense -> softmax(10); ~28k parameters.

    Every initializer gets its own seed so building is deterministic without
    touching global random state.
    """
    import keras

    def init(offset: int) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=seed * 16 + offset)

    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(DIGITS_INPUT_SHAPE, name="image"),
            layers.Conv2D(16, 3, padding="same", activation="relu", kernel_initializer=init(0)),
            layers.Conv2D(32, 3, padding="same", activation="relu", kernel_initializer=init(1)),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(dense_units, activation="relu", kernel_initializer=init(2)),
            layers.Dense(len(DIGITS_LABELS), activation="softmax", kernel_initializer=init(3)),
        ],
        name="digits_cnn",
    )


def train_digits_cnn(
    splits: DigitsSplits,
    *,
    epochs: int = 15,
    seed: int = 0,
    variant: int = 0,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
) -> keras.Model:
    """Train the digits CNN; about 5 s on two cores and >= 95% test accuracy.

    Training resets Keras' global seeds (Python, NumPy, TensorFlow) so two runs
    with the same arguments give nearly the same weights; bit-identical
    results would need TensorFlow's global op-determinism switch, which would
    slow every other user of the process.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if variant < 0:
        raise ValueError(f"variant must be >= 0, got {variant}")
    import keras

    run_seed = seed + _VARIANT_SEED_STRIDE * variant
    keras.utils.set_random_seed(run_seed)
    model = build_digits_cnn(run_seed, dense_units=_DENSE_UNITS + _DENSE_STEP * variant)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        # XLA compilation costs more than it saves on a model this small.
        jit_compile=False,
    )
    started = time.perf_counter()
    model.fit(splits.x_train, splits.y_train, epochs=epochs, batch_size=batch_size, verbose=0)
    _, accuracy = model.evaluate(splits.x_test, splits.y_test, verbose=0)
    log.info(
        "trained digits CNN",
        extra={
            "variant": variant,
            "seed": run_seed,
            "epochs": epochs,
            "params": model.count_params(),
            "test_accuracy": round(float(accuracy), 4),
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    return model
