"""ZeRO sharding: per-worker bytes of parameters + gradients + optimizer state, base preset.

Compares 2 workers with ZeRO-3 against 1 worker with ZeRO-0, measured, not computed: for
each setting the ranks are launched as real processes (``torch.multiprocessing`` spawn,
gloo process group, ``DS_ACCELERATOR=cpu``), and each rank does what a tpr worker does
(``pipelines.worker``): builds the method from the config (``build_method``), wraps it in
``EngineModule``, builds the AdamW parameter groups and schedule (``tpr_core.optim``) and calls
``deepspeed.initialize`` with the worker's ``ds_config`` at the given stage. It then runs
two training steps on a tiny random batch (``--batch`` per rank at the config's image size
and text length) so that Adam's state exists, and counts the tensors it holds right after
the second backward (gradients still live, optimizer state already made), then again
after the second ``step``.

What is counted, per rank, as bytes of distinct storages (a storage shared by several
tensors, such as ZeRO's flat buffers and their per-parameter views, is counted once, in
the first category that reaches it, in the order below):

- ``params``: every parameter of the engine's module: its ``data`` when not empty (all of
  it with ZeRO-0; with ZeRO-3 only the small "persistent" parameters, kept whole on every
  rank) and, with ZeRO-3, its partition ``p.ds_tensor`` (views into the optimizer's flat
  partition buffer, which is therefore counted here).
- ``master``: ZeRO-3's fp32 master partitions (``fp32_partitioned_groups_flat``); in fp32
  on one device they are the same storage as the parameter partitions, so they add 0.
- ``grads``: ``p.grad`` of every module parameter that has one (all of them, full size,
  with ZeRO-0); with ZeRO-3 the gradient partition buffer
  (``grad_partitions_flat_buffer``), the master partitions' ``.grad`` and the averaged
  gradient partitions when present.
- ``optim``: every tensor in the torch optimizer's ``state`` (AdamW ``exp_avg``,
  ``exp_avg_sq``, ``step``); with ZeRO-3 that optimizer works on the partitions, so its
  state is the partitions' state.
- reported apart, not in the ratio: ``zero buffers``: ZeRO-3's gradient reduce buckets
  (``ipg_buckets[...].buffer``, ``reduce_bucket_size`` elements each, allocated whole at
  initialisation) and ``other``: every other live tensor the garbage collector can see
  (the batch, loss values, DeepSpeed's small bookkeeping tensors).

Also printed per rank: the resident set size (VmRSS) and its peak (VmHWM), each minus the
rank's resident size before any model was built (libraries, process group). The ratio is
per-worker (max over ranks) params + grads + optimizer state at 2 workers / ZeRO-3 over the
same at 1 worker / ZeRO-0 (aim: <= 0.6x).

The tokenizer is a stand-in with CLIP's vocabulary size (49,408 + the mask token) and the
classifier has CUHK-PEDES's 11,003 training identities, the sizes of the base preset's
real tables; no data, weights or tokenizer files are needed.

    DS_ACCELERATOR=cpu python bench/zero_memory.py --batch 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported, here and in the children
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CATEGORIES = ("params", "master", "grads", "optim")
APART = ("zero buffers", "other")
MIB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


class _Ledger:
    """Bytes of distinct storages by category; a storage is charged to the first category that adds it."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {c: 0 for c in (*CATEGORIES, *APART)}
        self.count: dict[str, int] = {c: 0 for c in (*CATEGORIES, *APART)}

    def add(self, category: str, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        if st.nbytes() == 0:
            return
        key = st.data_ptr()
        if key in self.seen:
            return
        self.seen.add(key)
        self.bytes[category] += st.nbytes()
        self.count[category] += 1


def count_held(engine: Any, stage: int) -> dict[str, Any]:
    """Bytes held by this rank, by category (see the module docstring)."""
    gc.collect()
    led = _Ledger()
    params = list(engine.module.parameters())
    zopt = engine.optimizer if stage > 0 else None
    for p in params:
        if p.data.numel() > 0:
            led.add("params", p.data)
        if getattr(p, "ds_tensor", None) is not None:
            led.add("params", p.ds_tensor)
    if zopt is not None:
        for t in getattr(zopt, "fp32_partitioned_groups_flat", []) or []:
            led.add("master", t)
        for t in getattr(zopt, "single_partition_of_fp32_groups", []) or []:  # ZeRO-1/2
            led.add("master", t)
    for p in params:
        if p.grad is not None:
            led.add("grads", p.grad)
    if zopt is not None:
        led.add("grads", getattr(zopt, "grad_partitions_flat_buffer", None))
        for t in getattr(zopt, "fp32_partitioned_groups_flat", []) or []:
            led.add("grads", t.grad)
        averaged = getattr(zopt, "averaged_gradients", None) or {}
        for group in averaged.values() if isinstance(averaged, dict) else averaged:
            for t in group or []:
                led.add("grads", t)
    torch_opt = zopt.optimizer if zopt is not None else engine.optimizer
    while not isinstance(torch_opt, torch.optim.Optimizer) and hasattr(torch_opt, "optimizer"):
        torch_opt = torch_opt.optimizer
    for state in torch_opt.state.values():
        for v in state.values():
            led.add("optim", v)
    if zopt is not None:
        for bucket in getattr(zopt, "ipg_buckets", {}).values():
            led.add("zero buffers", getattr(bucket, "buffer", None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated module attributes warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    led.add("other", obj)
            except ReferenceError:  # a dead weakref proxy
                continue
    return {"bytes": led.bytes, "tensors": led.count, **_proc_status()}


def _batch(cfg: Any, batch: int, vocab: int, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """A random batch in the contract's layout (``tpr_core.data``), with the MLM view."""
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.model.image_size
    length = cfg.model.text_length
    pad, bos, eos, mask_id = 0, 1, 2, vocab - 1
    ids = torch.full((batch, length), pad, dtype=torch.long)
    text_mask = torch.zeros(batch, length, dtype=torch.long)
    mlm_ids = ids.clone()
    labels = torch.full((batch, length), -100, dtype=torch.long)
    for b in range(batch):
        n = int(torch.randint(8, length - 1, (), generator=g))  # tokens between BOS and EOS
        body = torch.randint(4, vocab - 1, (n,), generator=g)
        ids[b, 0], ids[b, 1 : n + 1], ids[b, n + 1] = bos, body, eos
        text_mask[b, : n + 2] = 1
        mlm_ids[b] = ids[b]
        chosen = torch.randperm(n, generator=g)[: max(1, round(0.15 * n))] + 1
        labels[b, chosen] = ids[b, chosen]
        mlm_ids[b, chosen] = mask_id
    return {
        "images": torch.randn(batch, 3, h, w, generator=g),
        "text_ids": ids,
        "text_mask": text_mask,
        "pids": torch.randint(0, num_classes, (batch,), generator=g),
        "index": torch.arange(batch),
        "mlm_ids": mlm_ids,
        "mlm_labels": labels,
    }


def _rank_main(rank: int, world: int, stage: int, cfg_json: dict, args: dict, port: int, out_dir: str) -> None:
    """One rank: a tpr worker's setup, two training steps, then the count."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(int(args["threads"]))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed  # noqa: F401  (imported before the memory baseline)

    import tpr_core.models  # noqa: F401  (loads the model code before the baseline)
    from pipelines.worker.checkpoints import seed_all
    from pipelines.worker.engine import EngineModule, initialize_engine
    from tpr_core.experiment import config_from_dict
    from tpr_core.models import build_method, method_spec
    from tpr_core.optim import build_optimizer, build_scheduler

    baseline_rss = _proc_status()["VmRSS"]  # libraries and process group, before any model exists

    cfg = config_from_dict(cfg_json)
    seed_all(cfg.train.seed)
    tokenizer = SimpleNamespace(vocab_size=int(args["vocab"]))
    t0 = time.perf_counter()
    method = build_method(cfg, int(args["num_classes"]), tokenizer)
    n_params = sum(p.numel() for p in method.parameters())
    optimizer = build_optimizer(method, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 100, cfg.train.epochs)
    micro = cfg.data.batch_size // (world * cfg.distributed.grad_accum)
    engine = initialize_engine(EngineModule(method), optimizer, scheduler, cfg, micro)
    del method, optimizer, scheduler  # the engine holds what it needs
    engine.module.train()
    weights = cfg.loss.weights
    terms_names = list(method_spec(cfg.method).terms)
    counts = {}
    step_s = []
    for step in range(2):
        batch = _batch(cfg, micro, tokenizer.vocab_size, int(args["num_classes"]), seed=1000 * step + rank)
        t1 = time.perf_counter()
        terms = engine(batch)
        total = sum(weights[k] * terms[k] for k in terms_names)
        engine.backward(total)
        if step == 1:
            counts["after_backward"] = count_held(engine, stage)
        engine.step()
        step_s.append(time.perf_counter() - t1)
        del terms, total, batch
    counts["after_step"] = count_held(engine, stage)
    info = {
        "rank": rank, "world": world, "stage": stage, "n_params": n_params, "micro": micro,
        "preset": cfg.model.preset, "baseline_rss": baseline_rss,
        "setup_s": time.perf_counter() - t0 - sum(step_s), "step_s": step_s,
        "reduce_bucket_size": getattr(engine.optimizer, "reduce_bucket_size", None) if stage else None,
        **counts,
    }
    Path(out_dir, f"stage{stage}-world{world}-rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


def run_setting(cfg_json: dict, world: int, stage: int, args: argparse.Namespace, out_dir: str) -> list[dict]:
    """Spawn ``world`` ranks at ZeRO ``stage``; their reports, by rank."""
    import torch.multiprocessing as mp

    port = _free_port()
    mp.spawn(_rank_main, args=(world, stage, cfg_json, vars(args), port, out_dir), nprocs=world, join=True)
    return [json.loads(Path(out_dir, f"stage{stage}-world{world}-rank{r}.json").read_text()) for r in range(world)]


def setting_config(args: argparse.Namespace, world: int, stage: int) -> dict:
    from tpr_core.experiment import load_config

    cfg = load_config(
        args.config,
        [
            "model.pretrained=null",
            "distributed.use_gpu=false",
            "distributed.precision=fp32",
            f"distributed.num_workers={world}",
            f"distributed.zero_stage={stage}",
            "distributed.grad_accum=1",
            f"data.batch_size={args.batch * world}",
        ],
    )
    return cfg.model_dump(mode="json")


def _core(counts: dict) -> int:
    return sum(counts["bytes"][c] for c in CATEGORIES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "pipelines" / "configs" / "irra_cuhk_base.yaml"))
    parser.add_argument("--workers", type=int, default=2, help="workers of the sharded setting")
    parser.add_argument("--stage", type=int, default=3, help="ZeRO stage of the sharded setting")
    parser.add_argument("--batch", type=int, default=2, help="micro-batch per rank")
    parser.add_argument("--vocab", type=int, default=49409, help="text vocabulary (CLIP's 49,408 + mask)")
    parser.add_argument("--num-classes", type=int, default=11003, help="identities (CUHK-PEDES train)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    settings = [(1, 0), (args.workers, args.stage)]
    reports: dict[tuple[int, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tpr-bench-zero-") as out_dir:
        for world, stage in settings:
            t0 = time.perf_counter()
            reports[(world, stage)] = run_setting(setting_config(args, world, stage), world, stage, args, out_dir)
            print(f"ran {world} worker(s) with ZeRO-{stage} in {time.perf_counter() - t0:.0f}s", flush=True)

    first = reports[settings[0]][0]
    print(f"\nmodel: {Path(args.config).name}, preset {first['preset']}, {first['n_params'] / 1e6:.1f}M parameters "
          f"(fp32: {first['n_params'] * 4 / MIB:.0f} MiB); micro-batch {args.batch} per rank")
    header = f"{'setting':18}{'rank':>5}" + "".join(f"{c:>10}" for c in CATEGORIES) + f"{'TOTAL':>10}"
    header += "".join(f"{c:>14}" for c in APART) + f"{'RSS-base':>10}{'HWM-base':>10}"
    for when in ("after_backward", "after_step"):
        print(f"\nMiB held per rank, {when.replace('_', ' ')} of the 2nd step "
              "(TOTAL = params + master + grads + optim):")
        print(header)
        for (world, stage), reps in reports.items():
            for r in reps:
                c = r[when]
                row = f"{f'{world} worker ZeRO-{stage}':18}{r['rank']:>5}"
                row += "".join(f"{c['bytes'][k] / MIB:10.1f}" for k in CATEGORIES) + f"{_core(c) / MIB:10.1f}"
                row += "".join(f"{c['bytes'][k] / MIB:14.1f}" for k in APART)
                row += f"{(c['VmRSS'] - r['baseline_rss']) / MIB:10.0f}{(c['VmHWM'] - r['baseline_rss']) / MIB:10.0f}"
                print(row)
    base = _core(reports[settings[0]][0]["after_backward"])
    sharded = max(_core(r["after_backward"]) for r in reports[settings[1]])
    sharded_all = max(_core(r["after_backward"]) + r["after_backward"]["bytes"]["zero buffers"]
                      for r in reports[settings[1]])
    r0 = reports[settings[0]][0]
    hwm0 = r0["after_step"]["VmHWM"] - r0["baseline_rss"]
    hwm1 = max(r["after_step"]["VmHWM"] - r["baseline_rss"] for r in reports[settings[1]])
    w, s = settings[1]
    print(f"\nper-worker params + grads + optimizer state: {w} workers ZeRO-{s} {sharded / MIB:.1f} MiB vs "
          f"1 worker ZeRO-0 {base / MIB:.1f} MiB: ratio {sharded / base:.3f}x (aim <= 0.6x)")
    bucket = reports[settings[1]][0].get("reduce_bucket_size")
    print(f"counting ZeRO-{s}'s reduce buckets too (reduce_bucket_size {bucket} elements): "
          f"{sharded_all / MIB:.1f} MiB, ratio {sharded_all / base:.3f}x")
    print(f"peak resident set above the pre-model baseline (VmHWM - baseline): {w} workers ZeRO-{s} "
          f"{hwm1 / MIB:.0f} MiB vs 1 worker ZeRO-0 {hwm0 / MIB:.0f} MiB: ratio {hwm1 / hwm0:.3f}x (includes the "
          "full model each rank builds before partitioning, the touched part of the reduce buckets, activations)")
    for (world, stage), reps in reports.items():
        for r in reps:
            print(f"  {world} worker ZeRO-{stage} rank {r['rank']}: setup {r['setup_s']:.0f}s, steps "
                  + ", ".join(f"{x:.1f}s" for x in r["step_s"]))
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
