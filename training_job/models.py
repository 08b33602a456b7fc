"""The CNN architectures a TrainingRun can name.

`baseline` and `enhanced` are the design's three-run experiment, layer for layer. `residual-bn` is
ours: batch-normalised convolutions with a residual block, built to clear 99.3% within 5 epochs on a
2-core CPU, where compute rather than accuracy is the scarce thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import layers

from contract.spec import Architecture, Hyperparameters, Optimizer

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def build_baseline() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE, name="image"),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities"),
        ],
        name="baseline",
    )


def build_enhanced() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE, name="image"),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities"),
        ],
        name="enhanced",
    )


def _conv_bn(
    inputs: Any, filters: int, kernel: int, padding: str = "same", synchronized: bool = False
) -> Any:
    # No bias: the batch normalisation's shift makes it redundant.
    x = layers.Conv2D(filters, kernel, padding=padding, use_bias=False)(inputs)
    x = layers.BatchNormalization(synchronized=True)(x) if synchronized else layers.BatchNormalization()(x)
    return layers.ReLU()(x)


def build_residual_bn(synchronized_batch_norm: bool = False) -> keras.Model:
    """`synchronized_batch_norm` (multi-worker training only) normalises with the statistics of the
    global batch, all-reduced across the workers, instead of each worker's share: the same layer
    outputs, and so the same gradients, as one worker taking the whole batch. It adds no weights."""
    sync = synchronized_batch_norm
    # Spatial size shrinks early (5x5 valid conv, then pooling) so the residual block and the 64-filter
    # convolution run on 12x12 and 10x10 maps: about 3.6 M multiply-adds an image, 45 k parameters.
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = _conv_bn(inputs, 32, 5, padding="valid", synchronized=sync)  # 24x24
    x = layers.MaxPooling2D()(x)  # 12x12
    shortcut = x
    x = _conv_bn(x, 32, 3, synchronized=sync)
    x = layers.Add()([x, shortcut])
    x = _conv_bn(x, 64, 3, padding="valid", synchronized=sync)  # 10x10
    x = layers.MaxPooling2D()(x)  # 5x5
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="residual_bn")


BUILDERS: dict[Architecture, Callable[[], keras.Model]] = {
    Architecture.BASELINE: build_baseline,
    Architecture.ENHANCED: build_enhanced,
    Architecture.RESIDUAL_BN: build_residual_bn,
}


def build_model(architecture: Architecture, synchronized_batch_norm: bool = False) -> keras.Model:
    if architecture is Architecture.RESIDUAL_BN:
        return build_residual_bn(synchronized_batch_norm)
    return BUILDERS[architecture]()


def build_optimizer(hyper: Hyperparameters, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = hyper.learning_rate
    if hyper.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            hyper.learning_rate, decay_steps=max(1, steps_per_epoch * hyper.epochs), alpha=0.01
        )
    optimizers: dict[Optimizer, Callable[[], keras.optimizers.Optimizer]] = {
        Optimizer.ADAM: lambda: keras.optimizers.Adam(learning_rate),
        Optimizer.ADAMW: lambda: keras.optimizers.AdamW(learning_rate),
        Optimizer.SGD: lambda: keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True),
        Optimizer.RMSPROP: lambda: keras.optimizers.RMSprop(learning_rate),
    }
    return optimizers[hyper.optimizer]()
