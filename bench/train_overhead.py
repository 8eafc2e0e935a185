"""Training-loop overhead: tpr's DeepSpeed worker step vs a plain PyTorch step, same model and batches.

Both sides train the same method (built from the same seed, so the same initial weights),
with the same AdamW parameter groups and LambdaLR schedule (``tpr_core.optim``), on the same
pre-collated batches (built once from the synthetic data with ``TrainDataset`` + ``collate``
and reused, so data loading is excluded from both):

- ``tpr``: the step body of ``pipelines.worker.loop._train_step``: the method inside the worker's
  ``EngineModule`` inside a real DeepSpeed engine (``deepspeed.initialize`` with the
  worker's ``ds_config``: ZeRO-0, fp32), in one process with a gloo process group of world
  size 1 and ``DS_ACCELERATOR=cpu``; ``engine(batch)``, the weighted sum of the terms,
  ``engine.backward``, ``engine.step`` and the worker's per-step bookkeeping (term values
  read back, step counter).
- ``plain``: ``method(batch)``, ``method.loss_terms``, the same weighted sum, ``zero_grad``,
  ``backward``, ``optimizer.step``, ``scheduler.step`` and ``float(loss)``.

Before timing, one step of each from the same initial weights on the same batch is
compared (loss and updated weights), so the two really compute the same training step.
Warm-up steps are excluded; then the two are timed in alternating rounds (A/B, B/A, ...)
so that drifting load on a shared machine hits both alike. Printed: mean and median wall
seconds per optimizer step of each, the median process CPU seconds per step (steadier on a
shared machine), and the ratios tpr / plain: of the means, of the medians, the median of the
per-round ratios, and of the CPU medians (aim: <= 1.15).

With ``--tpr-train`` it also runs a real ``tpr train`` (Ray Train, 1 worker, ZeRO-0, tiny)
on the same data and prints its per-step time from the worker's reported throughput;
that figure includes data loading (and Ray), so it is shown for information, not in the ratio.

    DS_ACCELERATOR=cpu python bench/train_overhead.py --rounds 30 --steps 1
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tpr_core.config import ExperimentConfig  # noqa: E402
from tpr_core.experiment import config_from_dict, load_config  # noqa: E402

CONFIG = REPO / "pipelines" / "configs" / "irra_synthetic_tiny.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_data(tmp: Path, identities: int, per_id: int, size: tuple[int, int]) -> tuple[str, str]:
    """Synthetic pedestrians in the CUHK-PEDES layout, prepared to Parquet; (raw, root)."""
    from tpr_core.data.prepare import prepare
    from tpr_core.data.synth import ensure_synthetic

    raw = ensure_synthetic(tmp / "raw", identities=identities, images_per_identity=per_id, size=size)
    prepare("cuhk-pedes", raw, tmp / "parquet")
    return str(raw), str(tmp / "parquet")


def bench_config(method: str, raw: str, root: str, args: argparse.Namespace) -> ExperimentConfig:
    """The method's tiny synthetic config, 1 worker, ZeRO-0, fp32, pointed at the bench data."""
    path = REPO / "pipelines" / "configs" / f"{method}_synthetic_tiny.yaml"
    return load_config(
        path if path.exists() else CONFIG,
        [
            f"data.root={root}",
            f"data.raw_root={raw}",
            f"data.synthetic.identities={args.identities}",
            f"data.synthetic.images_per_identity={args.images_per_identity}",
            "data.synthetic.size=[96, 32]",
            f"data.batch_size={args.batch_size}",
            "distributed.num_workers=1",
            "distributed.zero_stage=0",
            "distributed.precision=fp32",
            "distributed.grad_accum=1",
        ],
    )


def build_batches(cfg: ExperimentConfig, tokenizer: Any, n: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """``n`` collated training batches of the worker's micro-batch size; (batches, num_classes)."""
    from tpr_core.data.dataset import TrainDataset, collate, load_split, train_identity_count
    from tpr_core.data.samplers import build_batch_sampler
    from tpr_core.models import method_spec

    train = load_split(cfg.data.root, "train")
    spec = method_spec(cfg.method)
    dataset = TrainDataset(
        train, tokenizer, tuple(cfg.model.image_size), cfg.model.text_length, augment=cfg.data.augment,
        views=spec.views, mlm_mask_ratio=cfg.loss.mlm_mask_ratio, text_aug_prob=cfg.data.text_aug_prob,
        seed=cfg.train.seed,
    )
    micro = cfg.data.batch_size  # 1 worker, grad_accum 1
    sampler = build_batch_sampler(
        cfg.data.sampler, np.asarray(train.pids), micro, cfg.data.instances_per_identity, 0, 1, cfg.train.seed
    )
    batches: list[dict[str, torch.Tensor]] = []
    epoch = 0
    while len(batches) < n:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for idx in sampler:
            batches.append(collate([dataset[i] for i in idx]))
            if len(batches) == n:
                break
        epoch += 1
    return batches, train_identity_count(train)


def init_process_group(backend: str = "gloo") -> None:
    """A group of world size 1, as a Ray Train worker has (before deepspeed.initialize): gloo on
    CPU, nccl on a GPU."""
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
    )
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=0, world_size=1)


class TprStep:
    """The worker's step: the method in ``EngineModule`` in a DeepSpeed engine with the worker's
    ``ds_config`` for ``cfg`` (here ZeRO-0, fp32), on the engine's device (DeepSpeed moves the
    method to its accelerator: the CPU, or this rank's GPU)."""

    def __init__(self, cfg: ExperimentConfig, num_classes: int, tokenizer: Any, steps_per_epoch: int) -> None:
        from pipelines.worker.engine import EngineModule, engine_dtype, initialize_engine
        from tpr_core.models import build_method, method_spec
        from tpr_core.optim import build_optimizer, build_scheduler

        torch.manual_seed(cfg.train.seed)
        method = build_method(cfg, num_classes, tokenizer)
        optimizer = build_optimizer(method, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
        micro = cfg.data.batch_size // (cfg.distributed.num_workers * cfg.distributed.grad_accum)
        self.engine = initialize_engine(EngineModule(method), optimizer, scheduler, cfg, micro)
        self.engine.module.train()
        self.dtype = engine_dtype(self.engine)
        self.weights = cfg.loss.weights
        self.terms = list(method_spec(cfg.method).terms)
        self.grad_accum = cfg.distributed.grad_accum
        self.sums = torch.zeros(len(self.terms) + 1)
        self.step_count = 0
        self.samples = 0
        self.device = torch.device(self.engine.device)

    @property
    def method(self) -> torch.nn.Module:
        return self.engine.module.method

    def __call__(self, batch: dict[str, torch.Tensor], i: int) -> float:
        from tpr_core.data.dataset import IMAGE_KEYS

        # The body of pipelines.worker.loop._train_step.
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.dtype != torch.float32:
            for key in IMAGE_KEYS:
                if key in batch:
                    batch[key] = batch[key].to(self.dtype)
        terms = self.engine(batch)
        total = sum(self.weights[k] * terms[k] for k in self.terms)
        self.engine.backward(total)
        self.engine.step()
        self.samples += batch["pids"].shape[0]
        vals = torch.tensor([float(total.detach())] + [float(terms[k].detach()) for k in self.terms])
        self.sums += vals
        if (i + 1) % self.grad_accum == 0:  # an optimizer step happened
            self.step_count += 1
        return float(vals[0])


class PlainStep:
    """A plain single-process PyTorch step over the same method, optimizer and schedule."""

    def __init__(
        self, cfg: ExperimentConfig, num_classes: int, tokenizer: Any, steps_per_epoch: int, clip: float = 0.0
    ) -> None:
        from tpr_core.models import build_method, method_spec
        from tpr_core.optim import build_optimizer, build_scheduler

        torch.manual_seed(cfg.train.seed)
        self.clip = float(clip)
        self.method = build_method(cfg, num_classes, tokenizer)
        self.method.train()
        self.optimizer = build_optimizer(self.method, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
        self.weights = cfg.loss.weights
        self.terms = list(method_spec(cfg.method).terms)
        self.device = torch.device("cpu")

    def __call__(self, batch: dict[str, torch.Tensor], i: int) -> float:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        terms = self.method.loss_terms(self.method(batch), batch)
        total = sum(self.weights[k] * terms[k] for k in self.terms)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(total.detach())


def check_same_step(
    tpr: TprStep, plain: PlainStep, batch: dict[str, torch.Tensor]
) -> tuple[float, float, float, float]:
    """One step of each from the same weights on the same batch.

    Returns:
        (loss tpr, loss plain, max |w_tpr - w_plain| after the step, max |update| of tpr).
    """
    w0 = [p.detach().clone() for p in tpr.method.parameters()]
    for p, q in zip(tpr.method.parameters(), plain.method.parameters(), strict=True):
        if not torch.equal(p, q):
            raise RuntimeError("the two models do not start from the same weights (seeding differs)")
    la = tpr(batch, 0)
    lb = plain(batch, 0)
    with torch.no_grad():
        pairs = zip(tpr.method.parameters(), plain.method.parameters(), strict=True)
        diff = max(float((p - q).abs().max()) for p, q in pairs)
        moved = max(float((p - w).abs().max()) for p, w in zip(tpr.method.parameters(), w0, strict=True))
    if moved == 0.0:
        raise RuntimeError("the tpr step did not change the weights")
    return la, lb, diff, moved


def timed_rounds(
    steppers: dict[str, Any], batches: list[dict[str, torch.Tensor]], rounds: int, steps: int, warmup: int,
    verbose: bool = False,
) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """Seconds per step of each stepper, warm-up excluded, in alternating-order rounds.

    Returns:
        (wall seconds per step by name, process CPU seconds per step by name, per-round ratio of
        median wall times first / second name).
    """
    names = list(steppers)
    cursor = {n: 0 for n in names}

    def run(name: str, k: int, wall: list[float] | None, cpu: list[float] | None) -> None:
        for _ in range(k):
            i = cursor[name]
            batch = batches[i % len(batches)]
            t0, c0 = time.perf_counter(), time.process_time()
            steppers[name](batch, i)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            cursor[name] += 1
            if wall is not None and cpu is not None:
                wall.append(dt)
                cpu.append(dc)

    for n in names:
        run(n, warmup, None, None)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    round_ratios = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            run(n, steps, wall[n], cpu[n])
        med = {n: statistics.median(wall[n][-steps:]) for n in names}
        round_ratios.append(med[names[0]] / med[names[1]])
        if verbose:
            line = "  ".join(f"{n} {med[n]:.4f}" for n in order)
            print(f"  round {r + 1}/{rounds} ({' -> '.join(order)}): median s/step {line}; "
                  f"ratio {round_ratios[-1]:.3f}", flush=True)
    return wall, cpu, round_ratios


def real_tpr_train(cfg: ExperimentConfig, tmp: Path, epochs: int, steps_per_epoch: int) -> list[float]:
    """A real ``tpr train`` run (Ray Train, 1 worker); the worker's per-epoch seconds per step."""
    import ray

    from pipelines.setup import init_ray
    from pipelines.train import fit, prepare_run

    run_cfg = cfg.model_copy(deep=True)
    run_cfg = config_from_dict(
        {
            **run_cfg.model_dump(mode="json"),
            "train": {
                **run_cfg.train.model_dump(mode="json"), "epochs": epochs, "eval_every": epochs,
                "checkpoint_every": epochs, "max_steps_per_epoch": steps_per_epoch,
            },
        }
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # no MLflow: the worker's tracker is a no-op
    started = not ray.is_initialized()
    try:
        paths, job = prepare_run(run_cfg, tmp / "runs", "overhead")
        run_cfg = job.cfg
        init_ray(num_cpus=2)
        result = fit(paths, job)
        if result.error is not None:
            raise result.error
        df = result.metrics_dataframe
        thr = [float(v) for v in df["train/throughput"].dropna().tolist()][:epochs]
        return [run_cfg.data.batch_size / t for t in thr]
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


def _summary(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.median(xs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="irra", help="registered method (its *_synthetic_tiny.yaml config)")
    parser.add_argument("--identities", type=int, default=60)
    parser.add_argument("--images-per-identity", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="micro-batch (1 worker, grad_accum 1)")
    parser.add_argument("--batches", type=int, default=20, help="pre-collated batches, reused by both")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each before the rounds")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=1, help="timed steps of each per round")
    parser.add_argument("--verbose", action="store_true", help="print every round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker has cpus_per_worker)")
    parser.add_argument("--tpr-train", action="store_true", help="also time a real `tpr train` (Ray, 1 worker)")
    parser.add_argument("--tpr-train-epochs", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"torch threads {args.threads}")
    with tempfile.TemporaryDirectory(prefix="tpr-bench-overhead-") as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        raw, root = make_data(tmp, args.identities, args.images_per_identity, (96, 32))
        cfg = bench_config(args.method, raw, root, args)
        from tpr_core.data.dataset import load_split
        from tpr_core.data.tokenizer import Tokenizer

        train = load_split(root, "train")
        tokenizer = Tokenizer.train(
            [train.caption(i) for i in range(len(train))], vocab_size=4096, max_length=cfg.model.text_length
        )
        batches, num_classes = build_batches(cfg, tokenizer, args.batches)
        print(f"data: {len(train)} train pairs, {num_classes} identities; {len(batches)} batches of "
              f"{cfg.data.batch_size} at {tuple(cfg.model.image_size)}, text {cfg.model.text_length} "
              f"(built in {time.perf_counter() - t0:.1f}s)")

        init_process_group()
        tpr = TprStep(cfg, num_classes, tokenizer, steps_per_epoch=len(batches))
        # The plain loop does the same math as the engine: DeepSpeed clips gradients at its
        # configured norm, and its default (1.0) applies when ds_config sets none.
        clip = float(tpr.engine.gradient_clipping())
        if clip != cfg.optim.grad_clip:
            print(f"note: the engine clips gradients at norm {clip} while optim.grad_clip is {cfg.optim.grad_clip} "
                  "(DeepSpeed's default applies when ds_config sets no gradient_clipping); the plain loop "
                  "clips at the engine's norm so both compute the same step")
        plain = PlainStep(cfg, num_classes, tokenizer, steps_per_epoch=len(batches), clip=clip)
        n_params = sum(p.numel() for p in plain.method.parameters())
        print(f"model: {cfg.method} preset {cfg.model.preset}, {n_params / 1e6:.2f}M parameters; "
              f"DeepSpeed engine: ZeRO-{tpr.engine.zero_optimization_stage()}, optimizer "
              f"{type(tpr.engine.optimizer).__name__}")
        la, lb, dw, moved = check_same_step(tpr, plain, batches[0])
        print(f"same step check (same init, same batch): loss tpr {la:.6f} plain {lb:.6f}; "
              f"max |w_tpr - w_plain| after the step {dw:.2e} (largest update {moved:.2e})")

        wall, cpu, round_ratios = timed_rounds(
            {"tpr": tpr, "plain": plain}, batches, args.rounds, args.steps, args.warmup, args.verbose
        )
        mean_a, med_a = _summary(wall["tpr"])
        mean_b, med_b = _summary(wall["plain"])
        cpu_a, cpu_b = statistics.median(cpu["tpr"]), statistics.median(cpu["plain"])
        print()
        print(f"{'':24}{'mean s/step':>12}{'median s/step':>15}{'median CPU s/step':>19}{'steps':>7}")
        print(f"{'tpr (DeepSpeed ZeRO-0)':24}{mean_a:12.4f}{med_a:15.4f}{cpu_a:19.4f}{len(wall['tpr']):7d}")
        print(f"{'plain PyTorch':24}{mean_b:12.4f}{med_b:15.4f}{cpu_b:19.4f}{len(wall['plain']):7d}")
        print(f"ratio tpr / plain: wall mean {mean_a / mean_b:.3f}x, wall median {med_a / med_b:.3f}x, "
              f"median of per-round ratios {statistics.median(round_ratios):.3f}x, "
              f"CPU-time median {cpu_a / cpu_b:.3f}x (aim <= 1.15x)")
        q1, _, q3 = statistics.quantiles(round_ratios, n=4) if len(round_ratios) > 1 else (0.0, 0.0, 0.0)
        print(f"per-round ratios: quartiles {q1:.3f} / {q3:.3f}, min {min(round_ratios):.3f}, "
              f"max {max(round_ratios):.3f} over {len(round_ratios)} rounds of {args.steps} step(s) each")

        if args.tpr_train:
            print("\nreal `tpr train` (Ray Train, 1 worker, ZeRO-0; includes data loading and Ray):")
            per_epoch = real_tpr_train(cfg, tmp, args.tpr_train_epochs, steps_per_epoch=len(batches))
            for e, s in enumerate(per_epoch, 1):
                print(f"  epoch {e}: {s:.4f} s/step ({s / med_b:.3f}x the plain in-process median)")
        load = os.getloadavg()
        print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
