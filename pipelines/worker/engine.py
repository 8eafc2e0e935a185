"""The worker's DeepSpeed engine: the module it wraps, its config, and its set-up."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tpr_core.config import ExperimentConfig
from tpr_core.eval import Encoder

REDUCE_BUCKET_SIZE = 50_000_000  # elements per gradient reduction bucket (ZeRO 1-3)


class EngineModule(nn.Module):
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
    """DeepSpeed's config for ``cfg.distributed`` and a micro-batch of ``micro_batch`` rows."""
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
        # Said explicitly: DeepSpeed does not gather the partitioned weights for
        # save_16bit_model (never called here); the exported model's full weights are gathered
        # once at the end (pipelines.worker.export.consolidated_state_dict).
        conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    # Always written: without the key DeepSpeed clips at norm 1.0; 0.0 means no clipping.
    conf["gradient_clipping"] = float(cfg.optim.grad_clip)
    if d.precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif d.precision == "fp16":
        conf["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return conf


def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype the engine computes in (bf16, fp16 or fp32)."""
    if getattr(engine, "bfloat16_enabled", lambda: False)():
        return torch.bfloat16
    if getattr(engine, "fp16_enabled", lambda: False)():
        return torch.float16
    return torch.float32


def engine_encoder(engine: Any, device: torch.device) -> Encoder:
    """The engine as a ``tpr_core.eval`` encoder: ``engine(batch, mode=side)``, images cast
    to the engine's dtype, batches on ``device``."""
    dtype = engine_dtype(engine)

    def forward(batch: dict[str, torch.Tensor], side: str) -> torch.Tensor:
        if side == "image" and dtype != torch.float32:
            batch["images"] = batch["images"].to(dtype)
        return engine(batch, mode=side)

    return Encoder(engine.module, forward, device)
