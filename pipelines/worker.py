"""The Ray Train worker loop: one DeepSpeed engine per rank, distributed evaluation,
checkpoints through ``ray.train.report``, MLflow from rank 0, resume after a restart.

A checkpoint folder (``epoch-NNNN/``) holds, merged from every rank:

    state/...                 DeepSpeed's files (each rank's ZeRO shard, ``latest``)
    trainer_state.json        epoch, global step, best val/R1 so far, MLflow run id
    rng/rank-R.pt             per-rank RNG states (tensors and ints only: weights_only)

The run's best checkpoint (by val/R1) is re-loaded at the end, evaluated on test, and
exported as a consolidated model folder (``tpr_core.export``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipelines.storage import is_uri, local_dir, upload_dir, write_bytes, write_text
from tpr_core.config import ExperimentConfig, derived_params, flatten
from tpr_core.eval.metrics import REPORTED_METRICS

_STATE_TAG = "state"
REDUCE_BUCKET_SIZE = 50_000_000  # elements per gradient reduction bucket (ZeRO 1-3)


class _Wrapped(nn.Module):
    """DeepSpeed wraps this: every use of the method (train step, image or text encoding)
    goes through ``forward`` so that ZeRO-3's parameter gathering hooks always fire.

    ``scope`` (``tpr_core.distributed``) is what the batch-level loss terms see: the global
    batch gathered from every rank (``loss.gather: global``) or this rank's share."""

    def __init__(self, method: nn.Module, scope: Any = None) -> None:
        super().__init__()
        from tpr_core.distributed import LOCAL

        self.method = method
        self.scope = LOCAL if scope is None else scope

    def forward(self, batch: dict[str, torch.Tensor], mode: str = "train") -> Any:
        if mode == "train":
            out = self.method(batch)
            return self.method.loss_terms(out, batch, self.scope)
        if mode == "image":
            return self.method.encode_image(batch["images"])
        if mode == "text":
            return self.method.encode_text(batch["text_ids"], batch["text_mask"])
        raise ValueError(f"unknown mode {mode!r}")


def initialize_engine(model: nn.Module, optimizer: Any, scheduler: Any, cfg: ExperimentConfig, micro_batch: int) -> Any:
    """``deepspeed.initialize`` with the worker's ``ds_config``; returns the engine.

    Works around a DeepSpeed 0.19 ZeRO-3 check that decides whether the optimizer's fp32 master
    partitions can be the parameter partitions themselves (fp32 training): it compares
    ``tensor.device`` with the accelerator's device *name*, a string, which never equals a
    ``torch.device`` in torch 2.x, so every rank kept a second fp32 copy of its partition
    (a quarter of its parameter + gradient + optimizer bytes). During the optimizer's set-up
    its ``device`` is given as a ``torch.device``, so the check sees what it means to.
    """
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3._create_fp32_partitions

    def create_fp32_partitions(self: Any) -> Any:
        name = self.device
        if isinstance(name, str):
            self.device = torch.device(name)
        try:
            return original(self)
        finally:
            self.device = name

    _skip_shm_comm_op()
    Stage3._create_fp32_partitions = create_fp32_partitions
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg, micro_batch),
            dist_init_required=False,
        )
    finally:
        Stage3._create_fp32_partitions = original
    return engine


def _skip_shm_comm_op() -> None:
    """On the CPU accelerator, tell DeepSpeed its shared-memory all-reduce op is unavailable.

    DeepSpeed's communication backend JIT-compiles that op (C++, g++ and ninja) the first time
    it starts on a machine: 33 s of a first ``tpr train`` here. Only DeepSpeed's
    ``inference_all_reduce`` uses it, and falls back to ``torch.distributed`` without it;
    training reduces through the process group (gloo) either way. DeepSpeed keeps its table of
    compatible ops in one module-level dict, which it documents as editable.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def ds_config(cfg: ExperimentConfig, micro_batch: int) -> dict[str, Any]:
    d = cfg.distributed
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": d.grad_accum,
        "zero_optimization": {"stage": d.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if d.zero_stage >= 1:
        # DeepSpeed's default bucket (5e8 elements, 1.9 GiB in fp32) is allocated whole under
        # ZeRO-3: more than all of the base model's gradients. 5e7 keeps reductions large.
        conf["zero_optimization"]["reduce_bucket_size"] = REDUCE_BUCKET_SIZE
    if d.zero_stage == 3:
        # Gather full weights on save so a ZeRO-3 checkpoint also carries consolidated weights.
        conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    # Always written: without the key DeepSpeed clips at norm 1.0; 0.0 means no clipping.
    conf["gradient_clipping"] = float(cfg.optim.grad_clip)
    if d.precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif d.precision == "fp16":
        conf["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return conf


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(tuple(s["python"][:1]) + (tuple(s["python"][1]),) + tuple(s["python"][2:]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


def _load_rng(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


# --------------------------------------------------------------------------- evaluation


def _equal_shard(n: int, rank: int, world: int) -> list[int]:
    """Positions for ``rank``: every rank gets ceil(n / world) (the last repeated as padding)
    so that all ranks run the same number of forwards (ZeRO-3 gathers collectively)."""
    per = math.ceil(n / world)
    return [min(i * world + rank, n - 1) for i in range(per)]


@torch.no_grad()
def _encode(engine: Any, dataset: Any, mode: str, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import DataLoader

    from tpr_core.data.dataset import collate

    feats, index = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        if mode == "image" and engine_dtype(engine) != torch.float32:
            batch["images"] = batch["images"].to(engine_dtype(engine))
        f = engine(batch, mode=mode)
        feats.append(f.float().cpu())
        index.append(batch["index"].cpu())
    if not feats:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(index)


def engine_dtype(engine: Any) -> torch.dtype:
    if getattr(engine, "bfloat16_enabled", lambda: False)():
        return torch.bfloat16
    if getattr(engine, "fp16_enabled", lambda: False)():
        return torch.float16
    return torch.float32


def _gather(t: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """All ranks' (features, positions) -> features in position order (padding dropped)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        parts = [(t, idx)]
    else:
        parts = [None] * world
        dist.all_gather_object(parts, (t, idx))
    out = torch.zeros(n, parts[0][0].shape[1])
    for f, i in parts:
        out[i] = f
    return out


def distributed_evaluate(
    engine: Any, split_data: Any, tokenizer: Any, cfg: ExperimentConfig, device: torch.device, topk: int = 0
) -> dict[str, Any]:
    """Every rank encodes its share of the gallery and the queries; features are gathered and
    the metrics computed once and shared. Returns the metrics (and top-k lists if asked)."""
    from tpr_core.data.dataset import GalleryDataset, QueryDataset
    from tpr_core.eval.metrics import rank_gallery_from_features

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    was_training = engine.module.training
    engine.module.eval()
    try:
        n_img, n_txt = split_data.num_images, len(split_data)
        gal = GalleryDataset(split_data, tuple(cfg.model.image_size), positions=_equal_shard(n_img, rank, world))
        qry = QueryDataset(split_data, tokenizer, cfg.model.text_length, positions=_equal_shard(n_txt, rank, world))
        bs = max(1, cfg.data.eval_batch_size // max(1, world))
        img_f, img_i = _encode(engine, gal, "image", bs, device)
        txt_f, txt_i = _encode(engine, qry, "text", bs, device)
        img_all = _gather(img_f, img_i, n_img)
        txt_all = _gather(txt_f, txt_i, n_txt)
    finally:
        engine.module.train(was_training)
    result: list[Any] = [None]
    if rank == 0:
        gal_pids = torch.as_tensor(np.asarray(split_data.image_pids))
        q_pids = torch.as_tensor(np.asarray(split_data.pids))
        ranks = rank_gallery_from_features(txt_all, img_all, q_pids, gal_pids, return_topk=topk)
        res: dict[str, Any] = ranks.metrics()
        if topk:
            res["topk_indices"] = ranks.topk_indices.cpu().numpy()
            res["cmc"] = ranks.cmc(50)
        result = [res]
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


# --------------------------------------------------------------------------- the loop


class _Tracker:
    """MLflow from rank 0 only; other ranks hold a no-op."""

    def __init__(self, enabled: bool, cfg: ExperimentConfig, config: dict[str, Any], resumed_run_id: str | None):
        # The URI travels in the loop config: a worker started by a Tune trial does not
        # inherit the environment of the process that started the tracking server.
        if config.get("tracking_uri"):
            os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]
        self.enabled = enabled and bool(os.environ.get("MLFLOW_TRACKING_URI"))
        self.run_id: str | None = None
        self.skip_until: dict[str, int] = {}
        if not self.enabled:
            return
        from pipelines import tracking

        self.t = tracking
        tags = {
            "method": cfg.method,
            "dataset_manifest_hash": config.get("manifest_hash", ""),
            "git_commit": config.get("git_commit", ""),
            "ray_run_name": config["run_name"],
            "tpr.model_dir": config["model_dir"],
            **config.get("extra_tags", {}),
        }
        self.run_id = tracking.start_or_resume_run(
            cfg.tracking.experiment,
            run_key=config["run_name"],
            run_name=config["run_name"],
            tags=tags,
            parent_run_id=config.get("parent_run_id"),
        )
        tracking.log_params_flat(self.run_id, {**flatten(cfg.model_dump(mode="json")), **derived_params(cfg)})
        last = tracking.last_logged_step(self.run_id, "train/loss")
        if last is not None:
            self.skip_until["train"] = last
        last_val = tracking.last_logged_step(self.run_id, "val/R1")
        if last_val is not None:
            self.skip_until["val"] = last_val

    def log(self, metrics: dict[str, float], step: int, kind: str = "train") -> None:
        if not self.enabled:
            return
        if step <= self.skip_until.get(kind, -1):
            return  # already logged before a restart: no duplicated steps
        self.t.log_metrics(self.run_id, metrics, step=step)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.t.log_artifact(self.run_id, path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.t.set_terminated(self.run_id, status)


def train_loop(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (``train_loop_config`` is ``config``)."""
    import ray.train

    from tpr_core.data.dataset import (
        IMAGE_KEYS,
        TrainDataset,
        load_split,
        make_train_loader,
        train_identity_count,
    )
    from tpr_core.data.samplers import build_batch_sampler
    from tpr_core.data.tokenizer import Tokenizer
    from tpr_core.experiment import config_from_dict
    from tpr_core.models import build_method, method_spec
    from tpr_core.optim import build_optimizer, build_scheduler

    cfg = config_from_dict(config["cfg"], "<train_loop_config>")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.distributed.use_gpu else torch.device("cpu")
    _seed_all(cfg.train.seed)  # same init weights on every rank

    tokenizer = Tokenizer.load(local_dir(config["tokenizer_dir"]))
    train_data = load_split(cfg.data.root, "train")
    val_data = load_split(cfg.data.root, "val")
    num_classes = train_identity_count(train_data)
    spec = method_spec(cfg.method)
    method = build_method(cfg, num_classes, tokenizer)
    from tpr_core.distributed import batch_scope

    model = _Wrapped(method, batch_scope(cfg.loss.gather))
    optimizer = build_optimizer(method, cfg.optim)
    # param groups were built on `method`; names in _Wrapped are prefixed but the tensors are the same

    d = cfg.distributed
    micro = cfg.data.batch_size // (world * d.grad_accum)
    sampler = build_batch_sampler(
        cfg.data.sampler, np.asarray(train_data.pids), micro, cfg.data.instances_per_identity,
        rank, world, cfg.train.seed,
    )
    micro_per_epoch = sampler.batches_per_epoch
    if cfg.train.max_steps_per_epoch:
        micro_per_epoch = min(micro_per_epoch, cfg.train.max_steps_per_epoch * d.grad_accum)
    steps_per_epoch = max(1, micro_per_epoch // d.grad_accum)
    micro_per_epoch = steps_per_epoch * d.grad_accum
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    engine = initialize_engine(model, optimizer, scheduler, cfg, micro)
    dtype = engine_dtype(engine)
    dataset = TrainDataset(
        train_data, tokenizer, tuple(cfg.model.image_size), cfg.model.text_length, augment=cfg.data.augment,
        views=spec.views, mlm_mask_ratio=cfg.loss.mlm_mask_ratio, text_aug_prob=cfg.data.text_aug_prob,
        seed=cfg.train.seed,
    )
    loader = make_train_loader(dataset, sampler, num_workers=cfg.data.loader_workers, pin_memory=d.use_gpu)

    # last_val: every report carries the latest validation metrics (Tune and ASHA need the
    # metric in each result); 0 before the first validation.
    state = {"epoch": 0, "step": 0, "best_r1": -1.0, "best_epoch": None, "last_val": {"val/R1": 0.0}}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as cdir:
            engine.load_checkpoint(os.path.join(cdir, _STATE_TAG), tag=_STATE_TAG)
            state.update(json.loads(Path(cdir, "trainer_state.json").read_text()))
            rng_file = Path(cdir, "rng", f"rank-{rank}.pt")
            if rng_file.exists():
                _set_rng_state(_load_rng(rng_file))
        if rank == 0:
            print(f"[tpr] resumed from checkpoint at epoch {state['epoch']} (step {state['step']})", flush=True)

    tracker = _Tracker(rank == 0, cfg, config, None)
    weights = cfg.loss.weights
    term_names = list(spec.terms)

    start_epoch = int(state["epoch"])
    last_epoch = None  # (metrics, checkpoint dir) of the last epoch, when this run trained it
    for epoch in range(start_epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        engine.module.train()
        t0 = time.perf_counter()
        sums = torch.zeros(len(term_names) + 1)
        n_logged = 0
        samples = 0
        for i, batch in enumerate(loader):
            if i >= micro_per_epoch:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if dtype != torch.float32:
                for key in IMAGE_KEYS:
                    if key in batch:
                        batch[key] = batch[key].to(dtype)
            terms = engine(batch)
            total = sum(weights[k] * terms[k] for k in term_names)
            engine.backward(total)
            engine.step()
            samples += batch["pids"].shape[0]
            vals = torch.tensor([float(total.detach())] + [float(terms[k].detach()) for k in term_names])
            sums += vals
            n_logged += 1
            if (i + 1) % d.grad_accum == 0:  # an optimizer step happened
                state["step"] += 1
                if state["step"] % cfg.train.log_every == 0:
                    avg = sums / max(1, n_logged)
                    if world > 1:
                        dist.all_reduce(avg)
                        avg /= world
                    sums.zero_()
                    n_logged = 0
                    m = {"train/loss": float(avg[0]), "train/lr": float(scheduler.get_last_lr()[0])}
                    m.update({f"train/{k}": float(avg[j + 1]) for j, k in enumerate(term_names)})
                    tracker.log(m, state["step"])
        elapsed = time.perf_counter() - t0
        throughput = samples * world / max(elapsed, 1e-9)
        epoch_done = epoch + 1
        state["epoch"] = epoch_done
        last = epoch_done == cfg.train.epochs
        do_eval = epoch_done % cfg.train.eval_every == 0 or epoch_done % cfg.train.checkpoint_every == 0 or last
        metrics: dict[str, Any] = {"epoch": epoch_done, "step": state["step"], "train/throughput": throughput}
        if do_eval:
            res = distributed_evaluate(engine, val_data, tokenizer, cfg, device)
            val = {f"val/{k}": float(res[k]) for k in REPORTED_METRICS}
            metrics.update(val)
            state["last_val"] = val
            if val["val/R1"] > state["best_r1"]:
                state["best_r1"], state["best_epoch"] = val["val/R1"], epoch_done
            tracker.log({**val, "train/throughput": throughput}, state["step"], kind="val")
        if not do_eval:
            metrics.update(state["last_val"])
        if rank == 0:
            r1 = f"{metrics['val/R1']:.2f}" if do_eval else "-"
            print(
                f"[tpr] epoch {epoch_done}/{cfg.train.epochs} step {state['step']} "
                f"loss {float(total.detach()):.4f} {throughput:.1f} samples/s val/R1 {r1}",
                flush=True,
            )
        state["mlflow_run_id"] = tracker.run_id
        if last:
            # The last epoch goes out in one report with the final results (below). As a report
            # of its own, it gave a scheduler (ASHA with a rung on the last epoch) the chance to
            # stop a trial that had trained every epoch, before its test metrics and export.
            last_epoch = (metrics, _save_checkpoint(engine, state, rank))
            break
        if do_eval and epoch_done % cfg.train.checkpoint_every == 0:
            _report_checkpoint(metrics, _save_checkpoint(engine, state, rank), epoch_done)
        else:
            ray.train.report(metrics)
        if config.get("fail_at_epoch") == epoch_done and rank == world - 1 and not Path(config["fail_marker"]).exists():
            # Test hook: kill this worker process once (the marker makes it one-shot).
            Path(config["fail_marker"]).write_text("killed")
            os._exit(1)

    # ---- the end: best checkpoint -> test metrics and the exported model
    try:
        # The engine holds the last epoch's weights; an earlier checkpoint replaces them only when
        # its val/R1 is strictly higher (of equal ones, the earliest epoch wins).
        best = _best_checkpoint(ray.train)
        if last_epoch is not None and (best is None or last_epoch[0]["val/R1"] > best[1]["val/R1"]):
            best_metrics = last_epoch[0]
        elif best is not None:
            best_metrics = best[1]
            if best[1].get("epoch") != state["epoch"]:
                with best[0].as_directory() as cdir:
                    engine.load_checkpoint(
                        os.path.join(cdir, _STATE_TAG), tag=_STATE_TAG,
                        load_optimizer_states=False, load_lr_scheduler_states=False,
                    )
        else:
            raise RuntimeError(f"run {config['model_dir']}: no trained epoch and no checkpoint to evaluate")
        test_data = load_split(cfg.data.root, "test")
        test = distributed_evaluate(engine, test_data, tokenizer, cfg, device)
        val_best = distributed_evaluate(engine, val_data, tokenizer, cfg, device, topk=10)
        final = {f"test/{k}": float(test[k]) for k in REPORTED_METRICS}
        probe = _probe_embeddings(engine, test_data, tokenizer, cfg, device)
        state_dict = _consolidated_state_dict(engine, d.zero_stage)
        out: dict[str, Any] = {
            **state["last_val"], "epoch": state["epoch"], **final, "best/epoch": best_metrics.get("epoch"), "best/val_R1": best_metrics.get("val/R1"),
            "model_dir": config["model_dir"], "mlflow_run_id": tracker.run_id or "",
        }
        if rank == 0:
            _export_and_log(cfg, config, state_dict, tokenizer, num_classes, best_metrics, final, val_best, val_data, tracker)
            tracker.log(final, state["step"], kind="test")
            tracker.finish()
            write_text(config["result_path"], json.dumps(out, indent=2))
            if config.get("probe_path"):
                from safetensors.torch import save as to_safetensors

                write_bytes(config["probe_path"], to_safetensors(probe))
            print(
                f"[tpr] done: best val/R1 {best_metrics.get('val/R1')} (epoch {best_metrics.get('epoch')}), "
                f"test/R1 {final['test/R1']:.2f}, model {config['model_dir']}",
                flush=True,
            )
        if world > 1:
            dist.barrier()
        if last_epoch is None:  # resumed from the final checkpoint: nothing new to keep
            ray.train.report(out)
        else:
            _report_checkpoint({**last_epoch[0], **out}, last_epoch[1], state["epoch"])
    except BaseException:
        if last_epoch is not None:  # not reported: nothing else will remove it
            shutil.rmtree(last_epoch[1], ignore_errors=True)
        raise


def _save_checkpoint(engine: Any, state: dict, rank: int) -> str:
    """This rank's share of a checkpoint (engine, RNG, and on rank 0 the trainer state) in a new
    temporary directory (all ranks must call: ZeRO saves collectively)."""
    tmp = tempfile.mkdtemp(prefix=f"tpr-ckpt-r{rank}-")
    try:
        engine.save_checkpoint(os.path.join(tmp, _STATE_TAG), tag=_STATE_TAG)
        Path(tmp, "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), Path(tmp, "rng", f"rank-{rank}.pt"))
        if rank == 0:
            Path(tmp, "trainer_state.json").write_text(json.dumps(state))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _report_checkpoint(metrics: dict, tmp: str, epoch: int) -> None:
    """Report ``metrics`` with the checkpoint in ``tmp`` (from :func:`_save_checkpoint`), then remove ``tmp``."""
    import ray.train

    try:
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"epoch-{epoch:04d}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _best_checkpoint(train_api: Any) -> tuple[Any, dict] | None:
    reported = train_api.get_all_reported_checkpoints()
    best = None
    for rc in reported:
        r1 = rc.metrics.get("val/R1")
        if r1 is None:
            continue
        if best is None or r1 > best[1]["val/R1"]:
            best = (rc.checkpoint, rc.metrics)
    return best


@torch.no_grad()
def _probe_embeddings(engine: Any, data: Any, tokenizer: Any, cfg: ExperimentConfig, device: torch.device) -> dict:
    """The engine's embeddings of a fixed probe (first 8 test images and captions), so a test
    can check that the exported model, loaded in one process, gives the same ones."""
    from tpr_core.data.dataset import GalleryDataset, QueryDataset, collate

    was = engine.module.training
    engine.module.eval()
    try:
        g = GalleryDataset(data, tuple(cfg.model.image_size), positions=range(min(8, data.num_images)))
        q = QueryDataset(data, tokenizer, cfg.model.text_length, positions=range(min(8, len(data))))
        gb = collate([g[i] for i in range(len(g))])
        qb = collate([q[i] for i in range(len(q))])
        gin = {k: v.to(device) for k, v in gb.items()}
        gin["images"] = gin["images"].to(engine_dtype(engine))
        img = engine(gin, mode="image").float().cpu()
        txt = engine({k: v.to(device) for k, v in qb.items()}, mode="text").float().cpu()
    finally:
        engine.module.train(was)
    return {"images": gb["images"].float().contiguous(), "image_feats": img.contiguous(),
            "text_ids": qb["text_ids"].contiguous(), "text_mask": qb["text_mask"].contiguous(),
            "text_feats": txt.contiguous()}


def _consolidated_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights of the method on rank 0 (all ranks must call: ZeRO-3 gathers)."""
    module = engine.module.method
    rank = dist.get_rank() if dist.is_initialized() else 0
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
        return sd
    if rank != 0:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def _export_and_log(
    cfg: ExperimentConfig, config: dict, state_dict: dict, tokenizer: Any, num_classes: int,
    best_metrics: dict, final: dict, val_best: dict, val_data: Any, tracker: _Tracker,
) -> None:
    from tpr_core.config import dump_config
    from tpr_core.eval.pictures import choose_queries, recall_curve, retrieval_grid
    from tpr_core.export import save_exported

    metrics = {k: v for k, v in {**best_metrics, **final}.items() if isinstance(v, (int, float))}
    extra = {
        "dataset_manifest_hash": config.get("manifest_hash", ""), "run_name": config["run_name"],
        "data_root": cfg.data.root, "git_commit": config.get("git_commit", ""),
    }
    with tempfile.TemporaryDirectory() as tmp:
        # A runs dir on object storage: the export is written here, then uploaded.
        local_model = Path(tmp, "model") if is_uri(config["model_dir"]) else config["model_dir"]
        save_exported(local_model, state_dict, cfg, tokenizer, metrics, num_classes, extra=extra)
        if is_uri(config["model_dir"]):
            upload_dir(local_model, config["model_dir"])
        if not tracker.enabled:
            return
        cpath = Path(tmp, "config.yaml")
        cpath.write_text(dump_config(cfg))
        tracker.artifact(cpath)
        try:
            pics = Path(tmp, "pictures")
            pics.mkdir()
            _pictures(val_best, val_data, pics, choose_queries, retrieval_grid, recall_curve)
            for png in sorted(pics.glob("*.png")):
                tracker.artifact(png, "pictures")
        except Exception as e:  # pictures must never fail a finished training
            print(f"[tpr] warning: could not draw pictures: {e}", flush=True)
        tracker.artifact(local_model, "model")


def _pictures(res: dict, data: Any, out: Path, choose_queries, retrieval_grid, recall_curve) -> None:
    topk = res.get("topk_indices")
    if topk is not None:
        topk = np.asarray(topk)
        qs = choose_queries(len(data), 6, seed=0)
        gal_pids = np.asarray(data.image_pids)
        q_pids = np.asarray(data.pids)
        captions = [data.caption(int(q)) for q in qs]
        images = [[data.image_bytes(int(g)) for g in topk[q][:10]] for q in qs]
        match = [[bool(gal_pids[g] == q_pids[q]) for g in topk[q][:10]] for q in qs]
        retrieval_grid(captions, images, match, out / "retrieval_grid.png")
    if res.get("cmc") is not None:
        recall_curve(res["cmc"], out / "recall_at_k.png")
