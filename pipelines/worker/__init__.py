"""The Ray Train worker: one DeepSpeed engine per rank, distributed evaluation, checkpoints
through ``ray.train.report``, MLflow from rank 0, resume after a restart.

Modules: ``loop`` (:func:`train_loop`: set-up, epochs, finish), ``engine`` (the DeepSpeed
engine and its config), ``checkpoints`` (save, report, resume, the best one, RNG state),
``evaluation`` (the encode-and-rank path of ``tpr_core.eval`` across ranks), ``tracker``
(the worker's MLflow run), ``export`` (test metrics, probe, exported model, pictures).

A checkpoint folder (``epoch-NNNN/``) holds, merged from every rank:

    state/...                 DeepSpeed's files (each rank's ZeRO shard, ``latest``)
    trainer_state.json        epoch, global step, best val/R1 so far, MLflow run id
    rng/rank-R.pt             per-rank RNG states (tensors and ints only: weights_only)

The run's best checkpoint (by val/R1) is re-loaded at the end, evaluated on test, and
exported as a consolidated model folder (``tpr_core.export``).
"""

from pipelines.worker.loop import train_loop

__all__ = ["train_loop"]
