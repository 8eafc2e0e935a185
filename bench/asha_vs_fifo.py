"""Sweeps: ASHA early stopping vs the same search without it (FIFO), in one run.

Both sweeps go through ``pipelines.sweep.sweep`` (Ray Tune over real Ray Train + DeepSpeed
trials, MLflow on an embedded server) with the same base config (IRRA, synthetic tiny, 1
worker per trial), the same search space and search algorithm, the same seeds and the same
number of trials; they differ only in the space file's scheduler: ``{type: asha,
grace_period: 1, reduction_factor: 2}`` against ``{type: none}`` (Tune's FIFO scheduler).
With ``--search random`` (the default) both draw exactly the same trial configurations
(``BasicVariantGenerator`` seeded alike), so the difference is ASHA alone.

By default the bench starts one local Ray head of its own (``ray start --head``) and both
sweeps connect to it through ``RAY_ADDRESS``, as ``tpr sweep`` does on a cluster; each sweep
still starts and stops its own MLflow server and runs in its own runs folder. (With
``--ray per-sweep`` each sweep starts its own local Ray, as ``tpr sweep`` does on one
machine; ``pipelines.setup.init_ray`` then gives the job its own dashboard address, so Ray
Train's placement-group cleaner asks the right instance even when others run here.)
ASHA runs first, so any cold-start cost (page cache, first imports) falls on it rather than
on the baseline. Printed: wall time of each sweep,
trials finished / stopped, epochs trained in all, the best ``val/R1`` over all trials and
over the trials that ran to the end (the ones a sweep can promote), and the ratios (aim:
ASHA at most 0.6x the wall time with its best ``val/R1`` within 2 points).

    DS_ACCELERATOR=cpu python bench/asha_vs_fifo.py --trials 8 --epochs 8 --max-steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.setup import use_private_ray_token  # noqa: E402

# Token authentication on, stated before ray is imported: the head started here and this driver
# then agree on it. The user's token if there is one, else one for this run only, held in the
# environment (writing ~/.ray/auth_token would turn token authentication on for every later Ray use).
use_private_ray_token()

CONFIG = REPO / "pipelines" / "configs" / "irra_synthetic_tiny.yaml"

# IRRA's loss weights, mask ratio and temperature: wide enough that some trials are clearly
# worse than others (what early stopping is for).
PARAMS = {
    "loss.weights.id": {"uniform": [0.0, 2.0]},
    "loss.weights.mlm": {"uniform": [0.0, 2.0]},
    "loss.mlm_mask_ratio": {"quniform": [0.1, 0.4, 0.05]},
    "loss.temperature": {"loguniform": [0.01, 0.2]},
}


def write_space(path: Path, scheduler: dict[str, Any], search: str, samples: int) -> Path:
    path.write_text(
        "# bench/asha_vs_fifo.py search space\n"
        + yaml.safe_dump(
            {"metric": "best_val/R1", "mode": "max", "search": search, "samples": samples, "scheduler": scheduler,
             "params": PARAMS},
            sort_keys=False,
        )
    )
    return path


def make_data(tmp: Path, identities: int) -> tuple[str, str]:
    """Synthetic pedestrians (96x32) prepared to Parquet, shared by both sweeps; (raw, root)."""
    from tpr_core.data.prepare import prepare
    from tpr_core.data.synth import ensure_synthetic

    raw = ensure_synthetic(tmp / "raw", identities=identities, images_per_identity=4, seed=0, size=(96, 32))
    prepare("cuhk-pedes", raw, tmp / "parquet")
    return str(raw), str(tmp / "parquet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def own_ray_cluster(num_cpus: int, log_path: Path, timeout_s: float = 180.0) -> Iterator[str]:
    """A local Ray head of our own (``ray start --head --block``), its address in ``RAY_ADDRESS``.

    Both sweeps then connect to it the way ``tpr sweep`` connects to a cluster. Its processes
    carry ``RAY_ADDRESS`` too: Ray Train's placement-group cleaner looks the cluster up by
    address, and without it fails ("Found multiple active Ray instances") whenever another
    Ray instance runs on the same machine, so a trial stopped by ASHA would keep its CPU.
    The head has its own temp dir, so it never becomes the machine's default cluster
    (``/tmp/ray/ray_current_cluster``, which a plain ``ray.init()`` elsewhere would join).
    Stopped by SIGTERM to the ``ray start`` process (which shuts its own processes down),
    then SIGKILL to its process group (a session of its own) if anything is left.
    """
    import ray.util

    from pipelines.env import scoped_env

    ports = {k: _free_port() for k in ("port", "dashboard-port", "ray-client-server-port",
                                       "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                       "runtime-env-agent-port", "metrics-export-port")}
    ip = ray.util.get_node_ip_address()
    address = f"{ip}:{ports['port']}"
    temp_dir = tempfile.mkdtemp(prefix="tpr-bench-ray-")  # short: Ray's socket paths have a length limit
    # No graceful drain on SIGTERM (the default waits up to 30 s for leased workers).
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONUNBUFFERED="1", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "start", "--head", "--block", f"--node-ip-address={ip}", f"--num-cpus={num_cpus}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout_s
        url = f"http://127.0.0.1:{ports['dashboard-port']}/api/version"  # the dashboard binds loopback
        while True:  # up when ray start says so and the dashboard (the cleaner's state API) answers
            if proc.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
                raise RuntimeError(f"ray start exited with {proc.returncode}; the end of {log_path}:\n{tail}")
            if "Ray runtime started" in log_path.read_text(errors="replace"):
                try:
                    with urllib.request.urlopen(url, timeout=5):
                        break
                except urllib.error.HTTPError:  # e.g. 401: token authentication is on; it answers
                    break
                except OSError:
                    pass
            if time.time() > deadline:
                raise RuntimeError(f"the Ray head did not come up in {timeout_s:.0f}s; see {log_path}")
            time.sleep(2)
        with scoped_env(RAY_ADDRESS=address):
            yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: whatever ray start left behind
        proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_sweep(label: str, cfg: Any, space: Path, runs: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One sweep, timed from the call to its return (Ray and MLflow start and stop included)."""
    import ray

    from pipelines.sweep import sweep

    print(f"\n=== {label}: {args.trials} trials ===", flush=True)
    t0 = time.perf_counter()
    error = None
    out: dict[str, Any] = {}
    try:
        out = sweep(cfg, space, runs_dir=runs, samples=args.trials, max_concurrent=args.max_concurrent,
                    name=label, seed=args.seed)
    except Exception as e:  # report it precisely and go on to the other sweep
        error = f"{type(e).__name__}: {e}"
        print(f"[bench] {label} sweep failed: {error}", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - t0
    rows = out.get("trials", [])
    key = "best_val/R1"
    scores = [r[key] for r in rows if r.get(key) is not None]
    done = [r for r in rows if r.get("status") == "DONE"]
    return {
        "wall": wall,
        "error": error,
        "rows": rows,
        "best_all": max(scores) if scores else None,
        "best_done": out.get("best_metric"),
        "done": len(done),
        "stopped": sum(r.get("status") == "STOPPED" for r in rows),
        "errored": sum(r.get("status") == "ERROR" for r in rows),
        "epochs": sum(int(r["epochs"]) for r in rows if r.get("epochs") is not None),
    }


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8, help="the tiny config's own")
    parser.add_argument("--max-steps", type=int, default=20, help="train.max_steps_per_epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--identities", type=int, default=200, help="synthetic identities (70%% train)")
    parser.add_argument("--search", choices=["random", "optuna"], default="random")
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--reduction-factor", type=float, default=2.0)
    parser.add_argument("--max-concurrent", type=int, default=None, help="default: what the CPUs hold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ray", choices=["own", "per-sweep"], default="own",
        help="own: one Ray head started here for both sweeps (RAY_ADDRESS); per-sweep: each sweep starts "
        "its own local Ray as `tpr sweep` does (stopped trials leak their CPUs when another Ray instance "
        "runs on the machine)",
    )
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of our own Ray head")
    parser.add_argument("--keep", default=None, help="keep the runs under this folder (default: a temp dir)")
    args = parser.parse_args(argv)

    from tpr_core.experiment import load_config

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="tpr-bench-asha-") as tmpdir:
        tmp = Path(args.keep) if args.keep else Path(tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        raw, root = make_data(tmp / "data", args.identities)
        cfg = load_config(
            CONFIG,
            [
                f"data.root={root}", f"data.raw_root={raw}", f"data.synthetic.identities={args.identities}",
                "data.synthetic.size=[96, 32]", f"data.batch_size={args.batch_size}",
                "distributed.num_workers=1", f"train.epochs={args.epochs}", "train.eval_every=1",
                "train.checkpoint_every=1", f"train.max_steps_per_epoch={args.max_steps}", "train.log_every=5",
            ],
        )
        asha = {"type": "asha", "grace_period": args.grace_period, "reduction_factor": args.reduction_factor}
        results = {}
        with contextlib.ExitStack() as stack:
            if args.ray == "own":
                for attempt in range(3):  # on a loaded machine the head may time out while starting
                    try:
                        address = stack.enter_context(own_ray_cluster(args.num_cpus, tmp / "ray_head.log"))
                        break
                    except RuntimeError as e:
                        print(f"[bench] the Ray head did not start (attempt {attempt + 1}/3): {e}", flush=True)
                else:
                    raise SystemExit("could not start a Ray head")
                print(f"Ray head of our own at {address} ({args.num_cpus} CPUs)", flush=True)
            for label, scheduler in (("asha", asha), ("fifo", {"type": "none"})):
                space = write_space(tmp / f"space_{label}.yaml", scheduler, args.search, args.trials)
                results[label] = run_sweep(label, cfg, space, tmp / f"runs_{label}", args)

    print(f"\nsweeps: {args.trials} trials, {args.search} search, seed {args.seed}; IRRA tiny, 1 worker per "
          f"trial, {args.epochs} epochs x <= {args.max_steps} steps of {args.batch_size}, "
          f"{args.identities} synthetic identities; ASHA grace {args.grace_period}, "
          f"reduction {args.reduction_factor}")
    print(f"{'':6}{'wall s':>9}{'done':>6}{'stopped':>9}{'error':>7}{'epochs':>8}"
          f"{'best val/R1 all':>17}{'best val/R1 done':>18}")
    for label, r in results.items():
        print(f"{label:6}{r['wall']:9.0f}{r['done']:6d}{r['stopped']:9d}{r['errored']:7d}{r['epochs']:8d}"
              f"{_fmt(r['best_all']):>17}{_fmt(r['best_done']):>18}")
    a, f = results["asha"], results["fifo"]
    print(f"wall time ASHA / FIFO: {a['wall'] / f['wall']:.3f}x (aim <= 0.6x); "
          f"epochs trained ASHA / FIFO: {a['epochs'] / max(1, f['epochs']):.3f}x")
    if a["best_all"] is not None and f["best_all"] is not None:
        print(f"best val/R1 ASHA - FIFO: {a['best_all'] - f['best_all']:+.2f} points over all trials"
              + (f", {a['best_done'] - f['best_done']:+.2f} over finished trials"
                 if a["best_done"] is not None and f["best_done"] is not None else "")
              + " (aim: within 2 points)")
    for label, r in results.items():
        if r["error"]:
            print(f"{label} sweep error: {r['error']}")
        for row in r["rows"]:
            params = ", ".join(f"{k.split('.')[-1]}={row[k]:.3g}" for k in PARAMS if k in row)
            print(f"  {label} {row.get('trial', '')[:40]:40} {row.get('status', ''):8} epochs {row.get('epochs')} "
                  f"best val/R1 {_fmt(row.get('best_val/R1'))}  {params}")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
