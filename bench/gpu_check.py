"""The GPU check: one command that runs tpr's GPU-only paths on one machine and prints one table.

Rows, each in its own subprocess with its own timeout, all under one overall deadline (470 s,
so the whole check fits in 8 minutes with the start of the processes):

- ``env``: Python, torch and its CUDA build, the GPUs and their bf16 support, and the modules
  the other rows import (a missing one is named here, before the rows that need it fail).
- ``tests``: the CUDA-only tests (``pytest -m gpu`` over the test files that carry the mark).
- ``eval``: ``bench/eval_speed.py`` with tpr's exact metrics on the GPU and on the CPU path at
  ICFG-PEDES test size (19,848 x 19,848): time, peak memory, and that the metrics agree.
- ``train``: the base preset (IRRA, ``irra_cuhk_base.yaml`` without pretrained weights) in the
  worker's DeepSpeed step (``bench/train_overhead.py``'s ``TprStep``) on one GPU with ZeRO-2,
  N steps in bf16 and the same N steps in fp32 from the same weights on the same batches:
  samples per second, peak memory, and the loss at step N of the two against ``LOSS_TOLERANCE``.
- ``gather``: with two or more GPUs, ``bench/gather_cost.py`` with 2 Ray Train workers over NCCL:
  the global-batch gather (rows in rank order, gradients back to their rank), the global-batch
  loss against one process on the whole batch, and the step time with and without the gather.

A row that fails or runs out of time reads FAIL or TIMEOUT with its reason and the check goes
on; the exit code is 1 when any row did. The table is printed and, when ``$OUT`` is set (the
device machine collects that folder), written to ``$OUT/gpu_check.txt``.

``--dry-run`` runs the same rows on the CPU (no GPU visible) with the tiny preset, a few steps,
a small evaluation problem, and the gather row over gloo with 2 spawned processes instead of
Ray Train (a local Ray start alone takes 30-60 s on 2 cores); ``tests/test_gpu_check.py`` runs
it, so the script cannot rot.

    bash bench/gpu_check.sh            # on a GPU machine
    bash bench/gpu_check.sh --dry-run  # anywhere, about half a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ROWS = ("env", "tests", "eval", "train", "gather")
DEADLINE_S = 470.0
# |loss_bf16 - loss_fp32| / |loss_fp32| at step N. bf16 keeps 8 significant bits (relative
# rounding 2^-9, about 0.2%) on every activation; the loss sums terms whose logits are scaled by
# 1/temperature (50 for the base preset), so a 0.2% rounding of a similarity moves a logit by
# up to 0.1, and N steps of Adam from the two forwards add their drift. 2% leaves room for
# that and still catches a run whose bf16 path is broken (a wrong cast, an fp16-style overflow
# or lost gradient), which moves the loss by far more.
LOSS_TOLERANCE = 0.02
# The gathered loss of 2 ranks against one process on the whole batch, both in fp32
# (tests/tpr_core/test_global_batch.py holds the terms to 1e-5 on the CPU; GPU reductions
# add their own order of summation).
GATHER_TOLERANCE = 1e-4
# Import name -> distribution in pyproject.toml (None: a dependency of one listed there).
MODULES = {
    "torch": "torch", "numpy": None, "deepspeed": "deepspeed", "hjson": None, "pydantic": "pydantic",
    "yaml": "pyyaml", "pyarrow": "pyarrow", "PIL": "pillow", "tokenizers": "tokenizers",
    "transformers": "transformers", "timm": "timm", "ray": "ray", "pytest": "pytest",
}  # fmt: skip
# CUHK-PEDES's training identities: the base preset's classifier has this many rows.
BASE_IDENTITIES = 11003


@dataclass
class Row:
    """One row of the table."""

    name: str
    status: str  # ok, FAIL, TIMEOUT or SKIP
    lines: list[str]
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the row's processes (those their parents waited for)
    data: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- rows run in this file


def _env_row(dry_run: bool) -> dict[str, Any]:
    """Versions, devices and the modules the rows import; never raises on a missing module."""
    import importlib
    import platform

    out: dict[str, Any] = {"python": platform.python_version(), "missing": [], "versions": {}}
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure to import is what this row reports
            out["missing"].append(f"{name} ({type(e).__name__})")
            continue
        out["versions"][name] = getattr(mod, "__version__", "?")
    if "torch" in out["versions"]:
        import torch

        out["cuda_build"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
        out["gpus"] = torch.cuda.device_count()
        out["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(out["gpus"])]
        out["bf16"] = bool(out["gpus"] and torch.cuda.is_bf16_supported())
    return out


def _status_and_rss() -> tuple[Any, Any]:
    """bench/eval_speed.py's peak-RSS helpers (reset VmHWM, read /proc/self/status)."""
    sys.path.insert(0, str(REPO / "bench"))
    import eval_speed

    return eval_speed._reset_peak_rss, eval_speed._status_kib


def _train_config(root: str, raw: str, batch_size: int, cuda: bool) -> Any:
    """The base preset on one GPU (or, in a dry run, the tiny preset on the CPU), ZeRO-2."""
    from tpr_core.experiment import load_config

    common = [
        f"data.root={root}", f"data.batch_size={batch_size}", "data.loader_workers=0",
        "distributed.num_workers=1", f"distributed.use_gpu={str(cuda).lower()}", "distributed.zero_stage=2",
        "distributed.grad_accum=1",
    ]  # fmt: skip
    if cuda:
        return load_config(REPO / "pipelines/configs/irra_cuhk_base.yaml", [*common, "model.pretrained=null"])
    return load_config(
        REPO / "pipelines/configs/irra_synthetic_tiny.yaml",
        [*common, f"data.raw_root={raw}", "data.synthetic.size=[96, 32]"],
    )


def _train_one(ov: Any, cfg: Any, precision: str, classes: int, tok: Any, batches: list, steps: int,
               warmup: int) -> dict[str, Any]:  # fmt: skip
    """``steps`` worker steps of a fresh engine in ``precision``: losses, samples/s, peak memory."""
    import gc

    import torch

    reset_peak, status_kib = _status_and_rss()
    cuda = cfg.distributed.use_gpu
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.distributed.precision = precision
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss0 = status_kib("VmRSS")
    reset_peak()
    step = ov.TprStep(run_cfg, classes, tok, steps_per_epoch=steps)
    params = sum(p.numel() for p in step.method.parameters())
    losses, secs = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        losses.append(step(batches[i % len(batches)], i))  # reads the loss back: the step is done
        secs.append(time.perf_counter() - t0)
    out = {
        "precision": precision,
        "device": str(step.device),
        "params": params,
        "losses": losses,
        "samples_per_s": len(secs[warmup:]) * cfg.data.batch_size / sum(secs[warmup:]),
        "peak_host_mib": max(0, status_kib("VmHWM") - rss0) / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
    step.engine.destroy()
    del step
    return out


def _train_row(args: argparse.Namespace) -> dict[str, Any]:
    """bf16 against fp32 over the same steps, same initial weights and batches (see the module doc)."""
    sys.path.insert(0, str(REPO / "bench"))
    import torch
    import train_overhead as ov

    from tpr_core.data.dataset import load_split
    from tpr_core.data.tokenizer import Tokenizer

    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch")
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)) if cuda else 1)
    with tempfile.TemporaryDirectory(prefix="tpr-gpu-check-") as tmp:
        ids, per_id = (60, 4) if cuda else (16, 4)
        raw, root = ov.make_data(Path(tmp), ids, per_id, (96, 32))
        cfg = _train_config(root, raw, args.batch_size, cuda)
        train = load_split(root, "train")
        vocab = 49408 if cfg.model.preset == "base" else 4096  # as pipelines.setup.ensure_tokenizer
        tok = Tokenizer.train([train.caption(i) for i in range(len(train))], vocab_size=vocab,
                              max_length=cfg.model.text_length)
        batches, num_classes = ov.build_batches(cfg, tok, min(args.steps, 8))
    classes = BASE_IDENTITIES if cfg.model.preset == "base" else num_classes
    ov.init_process_group("nccl" if cuda else "gloo")
    runs = {p: _train_one(ov, cfg, p, classes, tok, batches, args.steps, args.warmup) for p in ("bf16", "fp32")}
    lb, lf = runs["bf16"]["losses"], runs["fp32"]["losses"]
    rel = [abs(b - f) / max(abs(f), 1e-12) for b, f in zip(lb, lf, strict=True)]
    return {
        "method": cfg.method, "preset": cfg.model.preset, "zero_stage": cfg.distributed.zero_stage,
        "batch_size": cfg.data.batch_size, "steps": args.steps, "warmup": args.warmup, "classes": classes,
        "vocab": tok.vocab_size, "image_size": list(cfg.model.image_size), "runs": runs,
        "loss_rel_diff": rel[-1], "loss_rel_diff_step1": rel[0], "loss_rel_diff_max": max(rel),
        "tolerance": LOSS_TOLERANCE, "finite": all(math.isfinite(x) for x in lb + lf),
    }  # fmt: skip


# --------------------------------------------------------------------------- the driver


def _python_env(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    env["DS_ACCELERATOR"] = "cpu" if dry_run else "cuda"
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the same rows, on the CPU, even on a GPU machine
    return env


def _run(cmd: list[str], timeout: float, env: dict[str, str]) -> tuple[int | None, str, str, float, float]:
    """Run ``cmd`` in its own process group; on timeout the whole group is killed (rc None).

    Returns (rc, stdout, stderr, wall seconds, CPU seconds of the process and of the children
    it waited for: spawned ranks yes, Ray's own daemons no)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fo, stderr=fe, text=True, start_new_session=True)
        end, timed_out = time.monotonic() + max(timeout, 1.0), False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > end:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait
        if timed_out:
            try:  # what the row left running in its group (a rank, a Ray daemon) goes too
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    rc = None if timed_out else proc.returncode
    return rc, out, err, time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def _reason(out: str, err: str) -> str:
    """The last line that says what went wrong (an exception's last line, else the last line)."""
    lines = [ln.strip() for ln in (err + "\n" + out).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|SystemExit)\b|^error:", ln)]
    return (errors or lines or ["no output"])[-1][:300]


def _gpu_test_files() -> list[str]:
    """Test files that carry ``@pytest.mark.gpu`` (found by reading them, so new ones join)."""
    tests = sorted((REPO / "tests").rglob("test_*.py"))
    return [str(p.relative_to(REPO)) for p in tests if "pytest.mark.gpu" in p.read_text(encoding="utf-8")]


def _pytest_counts(out: str) -> dict[str, int]:
    summary = [ln for ln in out.splitlines() if re.search(r"\b(passed|failed|skipped|error|deselected)\b", ln)]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary[-1] if summary else ""):
        counts[what.rstrip("s") if what.startswith("error") else what] += int(n)
    return counts


def _row_specs(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    """Command, timeout and JSON file of each row."""
    py, me, dry = sys.executable, str(Path(__file__).resolve()), args.dry_run
    flag = ["--dry-run"] if dry else []
    specs = {
        "env": {"cmd": [py, me, "--row", "env", *flag], "timeout": 60},
        "tests": {"cmd": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "gpu",
                          *_gpu_test_files()], "timeout": 60 if dry else 150},
        "eval": {"cmd": [py, "bench/eval_speed.py", "--sizes", "tiny" if dry else "icfg", "--methods", "fast",
                         "--device", "cpu,cpu" if dry else "cuda,cpu"], "timeout": 60 if dry else 150},
        "train": {"cmd": [py, me, "--row", "train", "--steps", str(args.steps), "--warmup", str(args.warmup),
                          "--batch-size", str(args.batch_size), *flag], "timeout": 90 if dry else 240},
        "gather": {"cmd": [py, "bench/gather_cost.py", "--method", "irra", "--skip-bytes",
                           "--device", "cpu" if dry else "cuda", "--launcher", "spawn" if dry else "ray",
                           *(["--identities", "16", "--batch-size", "16", "--batches", "2", "--warmup", "0",
                              "--rounds", "1", "--steps", "1"] if dry else
                             ["--batch-size", "64", "--batches", "4", "--warmup", "2", "--rounds", "4"])],
                   "timeout": 90 if dry else 200},
    }  # fmt: skip
    for name, spec in specs.items():
        spec["json"] = tmp / f"{name}.json"
        if name != "tests":
            spec["cmd"] += ["--json", str(spec["json"])]
    return specs


def _summarise(name: str, data: dict[str, Any], out: str, dry: bool) -> tuple[str, list[str]]:
    """Status and text lines of a row whose command finished."""
    if name == "env":
        v = data["versions"]
        gpus = ", ".join(data.get("gpu_names", [])) or "no GPU visible"
        lines = [f"python {data['python']}, torch {v.get('torch', '-')} (CUDA build {data.get('cuda_build')}); "
                 f"{data.get('gpus', 0)} GPU(s): {gpus}; bf16 {'yes' if data.get('bf16') else 'no'}",
                 f"deepspeed {v.get('deepspeed', '-')}, ray {v.get('ray', '-')}, pydantic {v.get('pydantic', '-')}"]
        bad = []
        if data["missing"]:
            bad.append("missing: " + ", ".join(data["missing"]))
        if not dry and not data.get("cuda_available"):
            bad.append("no CUDA device visible to torch")
        return ("FAIL", bad + lines) if bad else ("ok", lines)
    if name == "tests":
        c = data
        text = ", ".join(f"{n} {k}" for k, n in c.items() if n) or "nothing ran"
        # On a GPU machine a skipped CUDA test means CUDA was not usable; in a dry run it is expected.
        good = c["failed"] == c["error"] == 0 and (c["passed"] > 0 or (dry and c["skipped"] > 0))
        return ("ok" if good else "FAIL"), [f"pytest -m gpu: {text} ({', '.join(_gpu_test_files())})"]
    if name == "eval":
        size, s = next(iter(data["sizes"].items()))
        runs = list(s["runs"].values())
        dev, cpu = runs[0], runs[-1]
        cuda_mem = f"device peak {dev['cuda_peak_mib']:.0f} MiB, " if dev["cuda_peak_mib"] is not None else ""
        lines = [
            f"{size} {s['queries']} x {s['gallery']}: {dev['device']} {dev['seconds']:.2f} s ({cuda_mem}host "
            f"+{dev['extra_rss_mib']:.0f} MiB); CPU path {cpu['seconds']:.2f} s (host +{cpu['extra_rss_mib']:.0f} MiB)",
            f"{cpu['seconds'] / dev['seconds']:.2f}x the CPU path's speed; metrics "
            f"{'agree' if s['metrics_agree'] else 'DISAGREE'} (max |diff| {s['metrics_max_abs_diff']:.1e} points)",
        ]
        return ("ok" if s["metrics_agree"] else "FAIL"), lines
    if name == "train":
        r, b, f = data, data["runs"]["bf16"], data["runs"]["fp32"]

        def mem(x: dict) -> str:
            return f"peak {x['peak_cuda_mib']:.0f} MiB" if x["peak_cuda_mib"] is not None else \
                f"peak host +{x['peak_host_mib']:.0f} MiB"  # fmt: skip

        lines = [
            f"{r['method']} {r['preset']} ({b['params'] / 1e6:.1f}M params), ZeRO-{r['zero_stage']}, batch "
            f"{r['batch_size']} at {r['image_size'][0]}x{r['image_size'][1]}, {r['steps']} steps on {b['device']}",
            f"bf16 {b['samples_per_s']:.1f} samples/s, {mem(b)}; fp32 {f['samples_per_s']:.1f} samples/s, {mem(f)}",
            f"loss at step {r['steps']}: bf16 {b['losses'][-1]:.4f}, fp32 {f['losses'][-1]:.4f}, relative diff "
            f"{r['loss_rel_diff']:.2e} (tolerance {r['tolerance']:g}; step 1 {r['loss_rel_diff_step1']:.2e})",
        ]
        good = r["finite"] and r["loss_rel_diff"] <= r["tolerance"] and b["samples_per_s"] > 0
        return ("ok" if good else "FAIL"), lines
    # gather
    g = data
    lines = [
        f"{g['world']} {g['launcher']} workers over {g['backend']} on {g['device']}: gather rows and gradients "
        f"{'exact' if g['gather_exact'] else 'WRONG'}; global-batch loss {g['loss_global']:.6f} against one "
        f"process {g['loss_reference']:.6f} (relative {g['loss_rel_diff']:.1e}, tolerance {GATHER_TOLERANCE:g})",
        f"step global {g['global_s']:.3f} s, local {g['local_s']:.3f} s: {g['ratio']:.2f}x",
    ]
    good = g["gather_exact"] and g["loss_rel_diff"] <= GATHER_TOLERANCE
    return ("ok" if good else "FAIL"), lines


def _run_row(name: str, spec: dict[str, Any], args: argparse.Namespace, deadline: float) -> Row:
    left = deadline - time.monotonic()
    if left < 5:
        return Row(name, "TIMEOUT", [f"not started: the overall deadline ({args.deadline:g} s) was reached"])
    timeout = min(spec["timeout"], left)
    rc, out, err, secs, cpu = _run(spec["cmd"], timeout, _python_env(args.dry_run))
    row = Row(name, "FAIL", [], secs, cpu)
    if rc is None:
        row.status, row.lines = "TIMEOUT", [f"killed after {timeout:.0f} s; last output: {_reason(out, err)}"]
        return row
    if name == "tests":
        row.data = _pytest_counts(out)
        if rc not in (0, 1, 5):  # 1: tests failed (counted); 5: nothing collected (counted)
            row.lines = [f"pytest exit {rc}: {_reason(out, err)}"]
            return row
    elif rc != 0 or not spec["json"].is_file():
        row.lines = [f"exit {rc}: {_reason(out, err)}"]
        return row
    else:
        row.data = json.loads(spec["json"].read_text())
    try:
        row.status, row.lines = _summarise(name, row.data, out, args.dry_run)
    except (KeyError, TypeError, ValueError, StopIteration, ZeroDivisionError) as e:
        row.lines = [f"unreadable result ({type(e).__name__}: {e})"]
    return row


def format_table(rows: list[Row], dry_run: bool) -> str:
    mode = "dry run (CPU, tiny preset, gloo)" if dry_run else "GPU run"
    head = f"tpr GPU check, {mode}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    out = [head, f"{'check':8}{'status':9}{'wall s':>7}{'CPU s':>7}  result"]
    for r in rows:
        lines = r.lines or [""]
        out.append(f"{r.name:8}{r.status:9}{r.seconds:7.1f}{r.cpu_seconds:7.1f}  {lines[0]}")
        out += [f"{'':33}{ln}" for ln in lines[1:]]
    failed = [r.name for r in rows if r.status in ("FAIL", "TIMEOUT")]
    out.append(f"result: {'FAILED: ' + ', '.join(failed) if failed else 'every row ok or skipped'}")
    return "\n".join(out)


def run_check(args: argparse.Namespace) -> int:
    """Every wanted row, one at a time (a GPU run: the rows would disturb each other's figures)
    or, with ``--jobs 2``, two at a time, the heaviest first (the dry run's default)."""
    from concurrent.futures import ThreadPoolExecutor

    deadline = time.monotonic() + args.deadline
    wanted = [r for r in ROWS if r in args.rows.split(",")]
    done: dict[str, Row] = {}
    with tempfile.TemporaryDirectory(prefix="tpr-gpu-check-") as tmp:
        specs = _row_specs(args, Path(tmp))

        def run(name: str) -> Row:
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            return _run_row(name, specs[name], args, deadline)

        if args.jobs > 1:
            heavy_first = sorted(wanted, key=lambda n: -specs[n]["timeout"])
            with ThreadPoolExecutor(args.jobs) as pool:
                done = dict(zip(heavy_first, pool.map(run, heavy_first), strict=True))
        else:
            gpus = 0
            for name in wanted:
                if name == "gather" and not args.dry_run and gpus < 2:
                    done[name] = Row(name, "SKIP", [f"needs 2 GPUs for 2 NCCL workers; {gpus} visible"])
                    continue
                done[name] = run(name)
                if name == "env":
                    gpus = int(done[name].data.get("gpus") or 0)
    rows = [done[n] for n in wanted]
    table = format_table(rows, args.dry_run)
    print(table)
    targets = [args.out] if args.out else ([Path(os.environ["OUT"]) / "gpu_check.txt"] if os.environ.get("OUT") else [])
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    return 1 if any(r.status in ("FAIL", "TIMEOUT") for r in rows) else 0


def missing_specs() -> list[str]:
    """pyproject.toml's requirement strings of the modules that do not import (never torch: its
    CUDA build belongs to the machine); for ``gpu_check.sh`` to install before a real run."""
    import importlib.util

    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    specs = []
    for name, dist in MODULES.items():
        if name == "torch" or importlib.util.find_spec(name) is not None:
            continue
        found = re.search(rf'"({re.escape(dist)}(\[[^\]]*\])?[=<>!~][^"]*)"', text) if dist else None
        specs.append(found.group(1) if found else (dist or name))
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same rows on the CPU, tiny preset")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for all rows together")
    parser.add_argument("--steps", type=int, help="training steps per precision (default 20; dry run 3)")
    parser.add_argument("--warmup", type=int, help="steps left out of samples/s (default 3; dry run 1)")
    parser.add_argument("--batch-size", type=int, help="training batch (default 64, the base config's; dry run 8)")
    parser.add_argument("--jobs", type=int, help="rows run at a time (default 1; dry run 2: no GPU figures to spoil)")
    parser.add_argument("--out", type=Path, help="also write the table here (default $OUT/gpu_check.txt)")
    parser.add_argument("--json", type=Path, help="write the rows (or, with --row, the row's figures) as JSON")
    parser.add_argument("--missing", action="store_true", help="print the pyproject specs of missing modules")
    parser.add_argument("--row", choices=["env", "train"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.dry_run else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    args.batch_size = args.batch_size or (8 if args.dry_run else 64)
    args.jobs = args.jobs or (2 if args.dry_run else 1)
    if args.jobs > 1 and not args.dry_run and "gather" in args.rows.split(","):
        parser.error("--jobs above 1 on a real run: the gather row needs the env row's GPU count first")
    if args.missing:
        print(" ".join(missing_specs()))
        return 0
    if args.row:
        data = _env_row(args.dry_run) if args.row == "env" else _train_row(args)
        text = json.dumps(data, indent=1)
        if args.json:
            args.json.write_text(text)
        else:
            print(text)
        return 0
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
