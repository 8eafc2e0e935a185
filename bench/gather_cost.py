"""What the global batch costs: seconds per training step with ``loss.gather=global`` against
``local``, 2 workers, tiny preset, CPU or GPU; and the bytes each rank sends per step at base size.

Two processes in a gloo group (``--device cuda``: NCCL, one GPU each), spawned here or started
as two Ray Train workers (``--launcher ray``: a local Ray instance, the pipeline's
``ray_configs``), each with two real DeepSpeed
engines (the worker's ``initialize_engine``, ZeRO-2, fp32) over the same initial weights: one
whose batch-level terms see the gathered global batch, one that sees its own share. Both train
on the same pre-collated batches (the global batch of ``--batch-size`` split in two), built once
from the synthetic data, so data loading is excluded. After warm-up steps the two are timed in
alternating rounds (global/local, local/global, ...), every step started together on both ranks
(a barrier), so that drifting load hits both alike. Printed: the median seconds per step of
each and their ratio (aim: the gather costs at most 10% of a step, ratio <= 1.10).

Before the timing, two checks that the global batch is what the process group delivers: a
gather of known rows (every rank's rows, in rank order) whose backward must hand each rank
exactly its rows' summed gradient (on NCCL that is a reduce-scatter, a path gloo never takes),
and the global engine's first loss, averaged over the ranks, against one process computing the
same method on the whole batch (relative difference printed; ``--json`` writes it all).

The byte count runs one forward of each method's base preset (the shipped ``*_cuhk_base.yaml``
sizes) with a scope that records what ``loss_terms`` gathers, and scales it to a rank's share of
the config's global batch at ``--bytes-workers`` workers: the all-gather sends each rank's rows
to the others (ring: (N - 1) x its share), and the backward returns the gradient of the gathered
floats (NCCL reduce-scatter: (N - 1) x its share; gloo all-reduces the whole gathered gradient,
about twice that).

    DS_ACCELERATOR=cpu python bench/gather_cost.py --method fmfa --rounds 20
    python bench/gather_cost.py --method irra --device cuda --launcher ray --skip-bytes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _overhead_module() -> Any:
    """bench/train_overhead.py's data helpers (synthetic data, collated batches)."""
    spec = importlib.util.spec_from_file_location("_train_overhead", REPO / "bench" / "train_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _rank(rank: int, port: int, cfg_json: dict, tok_dir: str, batches_path: str, num_classes: int,
          args: argparse.Namespace, out: str) -> None:
    """A spawned rank: its own process group (gloo, or NCCL on GPU ``rank``), then the bench."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=2)
    try:
        _bench_rank(rank, torch.device("cuda", rank) if cuda else torch.device("cpu"), cfg_json, tok_dir,
                    batches_path, num_classes, args, out)
    finally:
        dist.destroy_process_group()


def _ray_rank(config: dict[str, Any]) -> None:
    """A Ray Train worker: Ray Train has set up the process group (NCCL with GPUs) and the device."""
    import ray.train
    import ray.train.torch

    _bench_rank(ray.train.get_context().get_world_rank(), ray.train.torch.get_device(), **config)


def _check_gather(rank: int, device: torch.device) -> bool:
    """Known rows through ``GlobalBatch``: rank r sends two rows of r + 1; every rank must see
    them in rank order, and the backward of sum_i (i * row_i) must give rank r (world x i) for
    its own rows i (each rank computes the same loss; the gather sums their gradients)."""
    import torch.distributed as dist

    from tpr_core.distributed import GlobalBatch

    world = dist.get_world_size()
    x = torch.full((2, 3), float(rank + 1), device=device, requires_grad=True)
    gathered = GlobalBatch()(x)
    want = torch.arange(1, world + 1, device=device, dtype=x.dtype).repeat_interleave(2)[:, None].expand(-1, 3)
    weights = torch.arange(2 * world, device=device, dtype=x.dtype)[:, None]
    (gathered * weights).sum().backward()
    ok = torch.equal(gathered.detach(), want) and torch.equal(x.grad, world * weights[2 * rank : 2 * rank + 2].expand(-1, 3))
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def _reference_loss(cfg: Any, num_classes: int, tok: Any, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """One process, the same initial weights, the whole global batch, no gather."""
    from pipelines.worker.checkpoints import seed_all
    from tpr_core.distributed import LOCAL
    from tpr_core.models import build_method, method_spec

    seed_all(cfg.train.seed)
    method = build_method(cfg, num_classes, tok).to(device)
    method.train()
    with torch.no_grad():
        terms = method.loss_terms(method(batch), batch, LOCAL)
    return float(sum(cfg.loss.weights[k] * terms[k] for k in method_spec(cfg.method).terms))


def _bench_rank(rank: int, device: torch.device, cfg_json: dict, tok_dir: str, batches_path: str,
                num_classes: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    from pipelines.worker.checkpoints import seed_all
    from pipelines.worker.engine import EngineModule, initialize_engine
    from tpr_core.data.tokenizer import Tokenizer
    from tpr_core.distributed import batch_scope
    from tpr_core.experiment import config_from_dict
    from tpr_core.models import build_method, method_spec
    from tpr_core.optim import build_optimizer, build_scheduler

    torch.set_num_threads(args.threads)
    cfg = config_from_dict(cfg_json)
    tok = Tokenizer.load(tok_dir)
    batches = [{k: v.to(device) for k, v in b.items()} for b in torch.load(batches_path, weights_only=True)]
    micro = cfg.data.batch_size // 2
    mine = [{k: v[rank * micro : (rank + 1) * micro] for k, v in b.items()} for b in batches]
    terms = list(method_spec(cfg.method).terms)
    gather_exact = _check_gather(rank, device)
    engines = {}
    for mode in ("global", "local"):
        seed_all(cfg.train.seed)
        method = build_method(cfg, num_classes, tok)
        opt = build_optimizer(method, cfg.optim)
        sched = build_scheduler(opt, cfg.optim, len(batches), cfg.train.epochs)
        engines[mode] = initialize_engine(EngineModule(method, batch_scope(mode)), opt, sched, cfg, micro)

    # The global engine's first loss (before any step), averaged over the ranks as the loop logs it.
    with torch.no_grad():
        first = engines["global"](mine[0])
        loss_global = torch.stack([sum(cfg.loss.weights[k] * first[k] for k in terms)]).float()
    dist.all_reduce(loss_global)
    loss_global /= dist.get_world_size()
    reference = _reference_loss(cfg, num_classes, tok, batches[0], device) if rank == 0 else float("nan")

    def step(mode: str, i: int) -> float:
        e = engines[mode]
        dist.barrier()
        t0 = time.perf_counter()
        out_terms = e(mine[i % len(mine)])
        total = sum(cfg.loss.weights[k] * out_terms[k] for k in terms)
        e.backward(total)
        e.step()
        float(total.detach())
        return time.perf_counter() - t0

    for i in range(args.warmup):
        for mode in ("global", "local"):
            step(mode, i)
    times: dict[str, list[float]] = {"global": [], "local": []}
    i = 0
    for r in range(args.rounds):
        order = ("global", "local") if r % 2 == 0 else ("local", "global")
        for mode in order:
            for _ in range(args.steps):
                times[mode].append(step(mode, i))
                i += 1
    if rank == 0:
        torch.save({**{k: torch.tensor(v) for k, v in times.items()}, "gather_exact": torch.tensor(gather_exact),
                    "loss_global": loss_global.cpu().reshape(()), "loss_reference": torch.tensor(reference),
                    "backend": dist.get_backend()}, out)  # fmt: skip


class _Recorder:
    """A scope that gathers nothing and records the per-row bytes of what it is given."""

    world_size = 1

    def __init__(self) -> None:
        self.float_bytes = 0
        self.int_bytes = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        per_row = t[0].numel() * t.element_size()
        if t.is_floating_point():
            self.float_bytes += per_row
        else:
            self.int_bytes += per_row
        return t

    def many(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self(t) for t in tensors)

    def mean(self, total: torch.Tensor, count: Any) -> torch.Tensor:
        return total / max(int(count), 1)


def _base_bytes(method: str, workers: int) -> tuple[int, int, int, int]:
    """(global batch, float bytes per row, int bytes per row, rows per rank) at base size."""
    from tpr_core.experiment import load_config
    from tpr_core.models import build_method

    cfg = load_config(REPO / "pipelines" / "configs" / f"{method}_cuhk_base.yaml",
                      ["model.pretrained=null", "distributed.num_workers=1"]
                      + (["model.pretrained_text=null"] if method == "ivt" else []))

    class Tok:
        vocab_size, pad_id, bos_id, eos_id, mask_id = 49409, 0, 1, 2, 49408

    model = build_method(cfg, 10, Tok())
    model.train()
    h, w = cfg.model.image_size
    n, length = 2, cfg.model.text_length
    ids = torch.randint(3, 1000, (n, length))
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones(n, length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    batch = {"images": torch.randn(n, 3, h, w), "text_ids": ids, "text_mask": mask, "pids": torch.arange(n),
             "mlm_ids": ids, "mlm_labels": labels, "phrase_ids": ids, "phrase_mask": mask, "word_ids": ids,
             "word_mask": mask, "phrase_images": torch.randn(n, 3, h, w), "word_images": torch.randn(n, 3, h, w),
             "sample_seed": torch.arange(n)}
    rec = _Recorder()
    with torch.no_grad():
        model.loss_terms(model(batch), batch, rec)
    g = cfg.data.batch_size // cfg.distributed.grad_accum
    return g, rec.float_bytes, rec.int_bytes, g // workers


def _launch(args: argparse.Namespace, two: Any, tmp: Path, num_classes: int, out: Path) -> None:
    """The two ranks: spawned here, or as Ray Train workers on a local Ray instance."""
    rank_args = (two.model_dump(mode="json"), str(tmp / "tok"), str(tmp / "batches.pt"), num_classes, args, str(out))
    if args.launcher == "spawn":
        import torch.multiprocessing as mp

        mp.spawn(_rank, args=(_overhead_module()._free_port(), *rank_args), nprocs=2, join=True)
        return
    import ray
    from ray.train.torch import TorchTrainer

    from pipelines.setup import RunPaths, init_ray, ray_configs

    started = not ray.is_initialized()
    init_ray(num_cpus=None if args.device == "cuda" else 2)
    try:
        # The pipeline's ScalingConfig (NCCL when use_gpu) and RunConfig (the workers' environment).
        scaling, run = ray_configs(two, RunPaths(tmp, str(tmp / "ray"), "gather-cost"))
        names = ("cfg_json", "tok_dir", "batches_path", "num_classes", "args", "out")
        result = TorchTrainer(_ray_rank, train_loop_config=dict(zip(names, rank_args, strict=True)),
                              scaling_config=scaling, run_config=run).fit()
        if result.error is not None:
            raise result.error
    finally:
        if started:
            ray.shutdown()


def time_gather(args: argparse.Namespace) -> dict[str, Any]:
    """Both checks and the timed steps of global and local; the figures as a dict."""
    ov = _overhead_module()
    with tempfile.TemporaryDirectory(prefix="tpr-bench-gather-") as tmpdir:
        tmp = Path(tmpdir)
        raw, root = ov.make_data(tmp, args.identities, args.images_per_identity, (96, 32))
        cfg = ov.bench_config(args.method, raw, root, args)
        from tpr_core.data.dataset import load_split
        from tpr_core.data.tokenizer import Tokenizer

        train = load_split(root, "train")
        tok = Tokenizer.train([train.caption(i) for i in range(len(train))], vocab_size=4096,
                              max_length=cfg.model.text_length)
        tok.save(tmp / "tok")
        batches, num_classes = ov.build_batches(cfg, tok, args.batches)
        torch.save(batches, tmp / "batches.pt")
        two = cfg.model_copy(deep=True)
        two.distributed.num_workers = 2
        two.distributed.zero_stage = 2
        two.distributed.use_gpu = args.device == "cuda"
        out = tmp / "times.pt"
        _launch(args, two, tmp, num_classes, out)
        res = torch.load(out, weights_only=True)
    g, lo = statistics.median(res["global"].tolist()), statistics.median(res["local"].tolist())
    ref, got = float(res["loss_reference"]), float(res["loss_global"])
    return {
        "method": args.method, "device": args.device, "launcher": args.launcher, "backend": res["backend"],
        "world": 2, "batch_size": args.batch_size, "steps_timed": len(res["global"]), "global_s": g, "local_s": lo,
        "ratio": g / lo, "gather_exact": bool(res["gather_exact"]), "loss_global": got, "loss_reference": ref,
        "loss_rel_diff": abs(got - ref) / max(abs(ref), 1e-12),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="fmfa", help="registered method (its *_synthetic_tiny.yaml)")
    parser.add_argument("--identities", type=int, default=60)
    parser.add_argument("--images-per-identity", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (2 workers x half)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="timed steps of each per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: NCCL, one GPU per rank")
    parser.add_argument("--launcher", default="spawn", choices=["spawn", "ray"], help="ray: 2 Ray Train workers")
    parser.add_argument("--json", type=Path, help="also write the timing figures to this file")
    parser.add_argument("--bytes-workers", type=int, default=8)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-bytes", action="store_true")
    args = parser.parse_args(argv)
    os.environ["DS_ACCELERATOR"] = args.device  # before any rank imports deepspeed

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f}; {args.threads} torch thread(s) per worker")
    if not args.skip_timing:
        r = time_gather(args)
        print(f"\n{args.method} tiny, 2 workers x {args.batch_size // 2} ({r['launcher']}, {r['backend']}), ZeRO-2, "
              f"{args.device}; {r['steps_timed']} timed steps of each, alternating")
        print(f"  gather of known rows and their gradients: {'exact' if r['gather_exact'] else 'WRONG'}")
        print(f"  first loss, global batch over 2 ranks {r['loss_global']:.6f}, one process on the whole batch "
              f"{r['loss_reference']:.6f} (relative difference {r['loss_rel_diff']:.1e})")
        print(f"  loss.gather=global  {r['global_s']:.4f} s/step (median)")
        print(f"  loss.gather=local   {r['local_s']:.4f} s/step (median)")
        print(f"  ratio global / local: {r['ratio']:.3f}x (aim <= 1.10x)")
        if args.json:
            args.json.write_text(json.dumps(r, indent=1))

    if args.skip_bytes:
        return
    n = args.bytes_workers
    print(f"\nbytes each rank sends per step for the gathered terms, base preset, fp32, {n} workers:")
    print(f"{'method':8}{'global batch':>14}{'rows/rank':>11}{'float B/row':>13}{'gather':>12}{'backward':>12}")
    for method in ("irra", "fmfa", "uit", "ivt"):
        g_batch, fb, ib, rows = _base_bytes(method, n)
        gather = (n - 1) * rows * (fb + ib)
        backward = (n - 1) * rows * fb
        print(f"{method:8}{g_batch:14d}{rows:11d}{fb:13d}{gather / 2**20:10.2f}MiB{backward / 2**20:10.2f}MiB")
    print("(bf16 halves the float part; the backward column is NCCL's reduce-scatter, gloo sends about twice it)")


if __name__ == "__main__":
    main()
