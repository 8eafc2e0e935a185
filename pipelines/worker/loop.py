"""The Ray Train worker loop: :func:`train_loop` sets up, trains epoch by epoch (evaluating,
checkpointing and reporting as configured), then finishes with the best checkpoint: test
metrics, probe and exported model."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipelines import terminal
from pipelines.job import WorkerJob
from pipelines.storage import local_dir, write_bytes, write_text
from pipelines.worker.checkpoints import load_best, report_checkpoint, resume, save_checkpoint, seed_all
from pipelines.worker.engine import EngineModule, engine_dtype, initialize_engine
from pipelines.worker.evaluation import distributed_evaluate
from pipelines.worker.export import consolidated_state_dict, export_and_log, probe_embeddings
from pipelines.worker.tracker import Tracker
from tpr_core.config import ExperimentConfig
from tpr_core.eval.metrics import REPORTED_METRICS
from tpr_core.progress import Progress

# The running best of the run, in every report: the val/R1 of the epoch tpr will export so far
# (the best of the epochs that can be picked, see _end_epoch). It is what Ray Tune optimises,
# so Tune's best trial and tpr's best model agree.
BEST_METRIC = "best_val/R1"


@dataclass
class _Worker:
    """What one rank holds for a whole training.

    ``state`` is what a checkpoint's ``trainer_state.json`` saves: ``epoch`` and ``step`` done,
    ``best_r1`` and ``best_epoch`` so far (over the epochs the final export can pick, so a
    restored run continues the same running best), ``last_val`` (the latest validation
    metrics: every report carries them, as Tune and ASHA need the metric in each result; val/R1
    0 before the first validation) and ``mlflow_run_id``.
    """

    job: WorkerJob
    rank: int
    world: int
    device: torch.device
    tokenizer: Any
    val_data: Any
    num_classes: int
    term_names: list[str]
    engine: Any
    scheduler: Any
    sampler: Any
    dataset: Any
    loader: Any
    micro_per_epoch: int
    tracker: Tracker
    state: dict[str, Any]

    @property
    def cfg(self) -> ExperimentConfig:
        return self.job.cfg


def train_loop(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker; ``loop_config`` carries the
    :class:`~pipelines.job.WorkerJob` (``WorkerJob.loop_config``)."""
    terminal.configure_worker()
    w = _setup(WorkerJob.of(loop_config))
    last_epoch = _train_epochs(w)
    _finish(w, last_epoch)


def _setup(job: WorkerJob) -> _Worker:
    """Data, method, optimizer, engine and loader of this rank; resumed from Ray Train's latest
    checkpoint when there is one."""
    import ray.train

    from tpr_core.data.dataset import TrainDataset, load_split, make_train_loader, train_identity_count
    from tpr_core.data.samplers import build_batch_sampler
    from tpr_core.data.tokenizer import Tokenizer
    from tpr_core.distributed import batch_scope
    from tpr_core.models import build_method, method_spec
    from tpr_core.optim import build_optimizer, build_scheduler

    cfg, d = job.cfg, job.cfg.distributed
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(d.cpus_per_worker)))
    device = torch.device("cuda", torch.cuda.current_device()) if d.use_gpu else torch.device("cpu")
    seed_all(cfg.train.seed)  # same init weights on every rank

    tokenizer = Tokenizer.load(local_dir(job.tokenizer_dir))
    train_data = load_split(cfg.data.root, "train")
    val_data = load_split(cfg.data.root, "val")
    num_classes = train_identity_count(train_data)
    spec = method_spec(cfg.method)
    method = build_method(cfg, num_classes, tokenizer)
    # param groups are built on `method`: in EngineModule its names are prefixed, its tensors the same
    optimizer = build_optimizer(method, cfg.optim)
    micro = cfg.data.batch_size // (world * d.grad_accum)
    sampler = build_batch_sampler(
        cfg.data.sampler, np.asarray(train_data.pids), micro, cfg.data.instances_per_identity,
        rank, world, cfg.train.seed,
    )
    micro_per_epoch = sampler.batches_per_epoch
    if cfg.train.max_steps_per_epoch:
        micro_per_epoch = min(micro_per_epoch, cfg.train.max_steps_per_epoch * d.grad_accum)
    steps_per_epoch = max(1, micro_per_epoch // d.grad_accum)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    engine = initialize_engine(EngineModule(method, batch_scope(cfg.loss.gather)), optimizer, scheduler, cfg, micro)
    dataset = TrainDataset(
        train_data, tokenizer, tuple(cfg.model.image_size), cfg.model.text_length, augment=cfg.data.augment,
        views=spec.views, mlm_mask_ratio=cfg.loss.mlm_mask_ratio, text_aug_prob=cfg.data.text_aug_prob,
        seed=cfg.train.seed,
    )
    loader = make_train_loader(dataset, sampler, num_workers=cfg.data.loader_workers, pin_memory=d.use_gpu)
    state = {"epoch": 0, "step": 0, "best_r1": -1.0, "best_epoch": None, "last_val": {"val/R1": 0.0}}
    resume(engine, state, rank)
    return _Worker(
        job=job, rank=rank, world=world, device=device, tokenizer=tokenizer, val_data=val_data,
        num_classes=num_classes, term_names=list(spec.terms), engine=engine, scheduler=scheduler,
        sampler=sampler, dataset=dataset, loader=loader, micro_per_epoch=steps_per_epoch * d.grad_accum,
        tracker=Tracker(rank == 0, job, resumed_epoch=state["epoch"]), state=state,
    )


def _train_epochs(w: _Worker) -> tuple[dict, str] | None:
    """Train the remaining epochs, reporting each to Ray Train (with a checkpoint every
    ``train.checkpoint_every``). The last epoch is not reported here: returns its metrics and
    checkpoint (a temporary folder) for :func:`_finish`, or None when no epoch was left."""
    import ray.train

    epochs = w.cfg.train.epochs
    for epoch in range(int(w.state["epoch"]), epochs):
        loss, throughput = _train_epoch(w, epoch)
        metrics, evaluated = _end_epoch(w, epoch + 1, throughput, loss)
        if epoch + 1 == epochs:
            # The last epoch goes out in one report with the final results. As a report of its
            # own, it gave a scheduler (ASHA with a rung on the last epoch) the chance to stop a
            # trial that had trained every epoch, before its test metrics and export.
            return metrics, save_checkpoint(w.engine, w.state, w.rank)
        if evaluated and (epoch + 1) % w.cfg.train.checkpoint_every == 0:
            report_checkpoint(metrics, save_checkpoint(w.engine, w.state, w.rank), epoch + 1)
        else:
            ray.train.report(metrics)
    return None


def _train_epoch(w: _Worker, epoch: int) -> tuple[float, float]:
    """One epoch of optimizer steps, logging the averaged loss terms every ``train.log_every``
    steps; returns the last micro-batch's loss and the epoch's samples per second (all ranks).
    Rank 0 shows a step counter within the epoch (:mod:`tpr_core.progress`)."""
    w.sampler.set_epoch(epoch)
    w.dataset.set_epoch(epoch)
    w.engine.module.train()
    t0 = time.perf_counter()
    sums = torch.zeros(len(w.term_names) + 1)  # total, then each term
    n_logged = samples = 0
    loss = float("nan")
    steps = w.micro_per_epoch // w.cfg.distributed.grad_accum
    progress = Progress(f"[tpr] epoch {epoch + 1}/{w.cfg.train.epochs}", steps, "steps", show=None if w.rank == 0 else False)
    for i, batch in enumerate(w.loader):
        if i >= w.micro_per_epoch:
            break
        values, rows = _train_step(w, batch)
        loss = float(values[0])
        samples += rows
        sums += values
        n_logged += 1
        if (i + 1) % w.cfg.distributed.grad_accum == 0:  # an optimizer step happened
            w.state["step"] += 1
            progress.advance()
            if w.state["step"] % w.cfg.train.log_every == 0:
                _log_train(w, sums / max(1, n_logged))
                sums.zero_()
                n_logged = 0
    progress.close()
    elapsed = time.perf_counter() - t0
    return loss, samples * w.world / max(elapsed, 1e-9)


def _train_step(w: _Worker, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Forward, backward and (every ``grad_accum`` micro-batches) an optimizer step on one
    micro-batch; returns (total, term...) values and the batch's row count."""
    from tpr_core.data.dataset import IMAGE_KEYS

    dtype = engine_dtype(w.engine)
    batch = {k: v.to(w.device, non_blocking=True) for k, v in batch.items()}
    if dtype != torch.float32:
        for key in IMAGE_KEYS:
            if key in batch:
                batch[key] = batch[key].to(dtype)
    terms = w.engine(batch)
    weights = w.cfg.loss.weights
    total = sum(weights[k] * terms[k] for k in w.term_names)
    w.engine.backward(total)
    w.engine.step()
    values = torch.tensor([float(total.detach())] + [float(terms[k].detach()) for k in w.term_names])
    return values, batch["pids"].shape[0]


def _log_train(w: _Worker, avg: torch.Tensor) -> None:
    """Log the (total, term...) averages of this rank, averaged over ranks, at the current step."""
    if w.world > 1:
        dist.all_reduce(avg)
        avg /= w.world
    m = {"train/loss": float(avg[0]), "train/lr": float(w.scheduler.get_last_lr()[0])}
    m.update({f"train/{k}": float(avg[j + 1]) for j, k in enumerate(w.term_names)})
    w.tracker.log(m, w.state["step"])


def _end_epoch(w: _Worker, epoch_done: int, throughput: float, loss: float) -> tuple[dict[str, Any], bool]:
    """Validate when due (every ``train.eval_every`` or ``checkpoint_every`` epochs, and the
    last), update the trainer state, log, print; returns the epoch's report and whether it
    validated."""
    cfg, state = w.cfg, w.state
    state["epoch"] = epoch_done
    evaluated = (
        epoch_done % cfg.train.eval_every == 0
        or epoch_done % cfg.train.checkpoint_every == 0
        or epoch_done == cfg.train.epochs
    )
    metrics: dict[str, Any] = {"epoch": epoch_done, "step": state["step"], "train/throughput": throughput}
    if evaluated:
        res = distributed_evaluate(w.engine, w.val_data, w.tokenizer, cfg, w.device)
        val = {f"val/{k}": float(res.metrics[k]) for k in REPORTED_METRICS}
        state["last_val"] = val
        # The epochs the export can pick (pipelines.worker.checkpoints.load_best): the checkpointed
        # ones and the last; of equal val/R1 the earliest.
        pickable = epoch_done % cfg.train.checkpoint_every == 0 or epoch_done == cfg.train.epochs
        if pickable and val["val/R1"] > state["best_r1"]:
            state["best_r1"], state["best_epoch"] = val["val/R1"], epoch_done
        w.tracker.log({**val, "train/throughput": throughput}, state["step"], kind="val")
    metrics.update(state["last_val"])
    metrics[BEST_METRIC] = max(float(state["best_r1"]), 0.0)
    state["mlflow_run_id"] = w.tracker.run_id
    if w.rank == 0:
        r1 = f"{metrics['val/R1']:.2f}" if evaluated else "-"
        terminal.log.info(
            f"[tpr] epoch {epoch_done}/{cfg.train.epochs} step {state['step']} "
            f"loss {loss:.4f} {throughput:.1f} samples/s val/R1 {r1} (best {metrics[BEST_METRIC]:.2f})"
        )
    return metrics, evaluated


def _finish(w: _Worker, last_epoch: tuple[dict, str] | None) -> None:
    """The best checkpoint's test metrics, probe and exported model; then the final report,
    which carries the last epoch's checkpoint when this run trained it."""
    import ray.train

    try:
        best_metrics = load_best(
            w.engine, last_epoch[0] if last_epoch else None, w.state["epoch"], w.job.model_dir
        )
        out = _final_results(w, best_metrics)
        if w.world > 1:
            dist.barrier()
        if last_epoch is None:  # resumed from the final checkpoint: nothing new to keep
            ray.train.report(out)
        else:
            report_checkpoint({**last_epoch[0], **out}, last_epoch[1], w.state["epoch"])
    except BaseException:
        if last_epoch is not None:  # not reported: nothing else will remove it
            shutil.rmtree(last_epoch[1], ignore_errors=True)
        raise


def _final_results(w: _Worker, best_metrics: dict) -> dict[str, Any]:
    """Test metrics, val top-k lists, probe and consolidated weights of the engine's (best)
    weights (all ranks); rank 0 exports, logs and writes them. Returns the final report."""
    from tpr_core.data.dataset import load_split

    cfg, job = w.cfg, w.job
    test_data = load_split(cfg.data.root, "test")
    test = distributed_evaluate(w.engine, test_data, w.tokenizer, cfg, w.device)
    val_best = distributed_evaluate(w.engine, w.val_data, w.tokenizer, cfg, w.device, topk=10)
    final = {f"test/{k}": float(test.metrics[k]) for k in REPORTED_METRICS}
    probe = probe_embeddings(w.engine, test_data, w.tokenizer, cfg, w.device)
    state_dict = consolidated_state_dict(w.engine, cfg.distributed.zero_stage)
    out: dict[str, Any] = {
        **w.state["last_val"], BEST_METRIC: max(float(w.state["best_r1"]), 0.0), "epoch": w.state["epoch"], **final,
        "best/epoch": best_metrics.get("epoch"), "best/val_R1": best_metrics.get("val/R1"),
        "model_dir": job.model_dir, "mlflow_run_id": w.tracker.run_id or "",
    }
    if w.rank == 0:
        model_id = export_and_log(
            job, state_dict, w.tokenizer, w.num_classes, {**best_metrics, **final}, val_best, w.val_data,
            w.tracker, test_step=w.state["step"],
        )
        w.tracker.finish(summary=_summary(best_metrics, final, model_id))
        write_text(job.result_path, json.dumps(out, indent=2))
        from safetensors.torch import save as to_safetensors

        write_bytes(job.probe_path, to_safetensors(probe))
        best_r1 = best_metrics.get("val/R1")
        terminal.log.info(
            f"[tpr] done: best val/R1 {best_r1 if best_r1 is None else f'{best_r1:.2f}'} "
            f"(epoch {best_metrics.get('epoch')}), test/R1 {final['test/R1']:.2f}, model {job.model_dir}"
        )
    return out


def _summary(best_metrics: dict, final: dict, model_id: str | None) -> str:
    """The end of the run's description: the best checkpoint's numbers and its logged model."""
    val = ", ".join(f"{k} {best_metrics[k]:.2f}" for k in (f"val/{m}" for m in REPORTED_METRICS) if k in best_metrics)
    test = ", ".join(f"{k} {final[k]:.2f}" for k in (f"test/{m}" for m in REPORTED_METRICS) if k in final)
    model = f" Logged model: models:/{model_id}." if model_id else ""
    return f"Best checkpoint: epoch {best_metrics.get('epoch')}; {val}; {test}.{model}"
