"""TensorFlow's MultiWorkerMirroredStrategy under Keras 3: the strategy, and the two workarounds
`model.fit` needs to run under it. Imported only when a run has more than one worker.

Why `tf.distribute.MultiWorkerMirroredStrategy` and not `keras.distribution`: the Keras-3-native
distribution API (`keras.distribution.DataParallel`) is implemented for the JAX backend; its TensorFlow
backend (`keras/src/backend/tensorflow/distribution_lib.py`) is a DTensor prototype marked "DO NOT
USE" and has no multi-process launcher. MWMS is what TF_CONFIG-based launchers (the Indexed Job here,
JobSet, Kubeflow Trainer) drive, it all-reduces gradients with collective ops over gRPC, and Keras 3's
TensorFlow trainer honours it: a model built and compiled under `strategy.scope()` runs its train and
test steps through `strategy.run`, scales the loss by 1/replicas and sums gradients across workers.

Two Keras 3 bugs (keras-team/keras#20585, present in 3.15) stop `fit` under MWMS, each in a place
that only sees the shapes or the per-step logs:

- `_maybe_symbolic_build` reduces the first input batch across workers to learn its shapes, handing
  `strategy.reduce` an `(x, y)` tuple, which the collective path cannot convert. The workaround builds
  from this worker's local batch (the shapes are the same on every worker) without any collective.
- `reduce_per_replica` averages the per-step logs with `strategy.reduce("MEAN", v, axis=0)`, which is
  invalid for the scalar loss and metric values. The workaround reduces scalars with `axis=None`
  (the mean across replicas) and keeps `axis=0` for batched values, as Keras intends.

Both patches touch only a process that created the strategy, i.e. one that trains with workers > 1.
"""

from __future__ import annotations

import json
import os
from typing import Any

from contract.constants import TF_CONFIG_ENV
from training_job.distributed import WorkerContext

_PATCHED_ATTRIBUTE = "_mnist_mlops_multiworker_patch"


def create_strategy(worker: WorkerContext) -> Any:
    """Exports TF_CONFIG and creates the strategy. Must run before any other TensorFlow op: collective
    ops are configured when the eager context starts. The constructor starts this worker's gRPC server
    on its own address from the cluster list; the first collective waits for every worker."""
    assert worker.tf_config is not None, "create_strategy is for workers > 1"
    os.environ[TF_CONFIG_ENV] = json.dumps(worker.tf_config)
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    _patch_reduce_per_replica()
    return strategy


def distribute_input_options(dataset: Any) -> Any:
    """In-memory arrays have no files to shard: shard by DATA, i.e. every worker runs the same seeded
    pipeline and the global batches are split among the workers, element for element."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def prepare_model(model: Any, strategy: Any) -> None:
    """Replaces the model's `_maybe_symbolic_build` with one that builds from the local batch."""
    from keras.src import tree

    def maybe_symbolic_build(iterator: Any = None, data_batch: Any = None) -> None:
        if iterator is not None:
            for _, _, data in iterator:
                data_batch = tree.map_structure(
                    lambda value: strategy.experimental_local_results(value)[0], next(data)
                )
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build


def _patch_reduce_per_replica() -> None:
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica
    if getattr(original, _PATCHED_ATTRIBUTE, False):
        return

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):

            def mean(value: Any) -> Any:
                axis = 0 if value.shape.rank else None
                return strategy.reduce("MEAN", value, axis=axis)

            return tree.map_structure(mean, values)
        return original(values, strategy, reduction)

    setattr(reduce_per_replica, _PATCHED_ATTRIBUTE, True)
    trainer.reduce_per_replica = reduce_per_replica
