"""Evaluation speed and memory: tpr's chunked exact metrics vs a naive reference.

The naive reference evaluates the way the published reference implementations do: build
the full (Q, G) similarity matrix, then for every query argsort its whole row and read the
match positions, in a Python loop over queries (numpy). tpr's path scores chunks of
queries against the gallery and never holds the full matrix (``tpr_core.eval``).

Each method runs in its own subprocess on the same seeded features, so peak memory is
that process's own: the peak resident set size during the evaluation minus the resident
size just before it (Linux VmHWM, reset through /proc/self/clear_refs), and on CUDA the
peak allocated device memory. Times run from raw features to metrics: wall-clock, and
the process's CPU time (user + system, all threads), which is steadier on a shared machine.

Features are synthetic at the test-split sizes of CUHK-PEDES (6,156 captions x 3,074
images, 1,000 identities) and ICFG-PEDES (19,848 x 19,848, 1,000 identities), dimension
512. ``--features clustered`` (default) draws each identity a centre and adds per-sample
noise of varying strength, tuned so the metrics land near published values; ``random``
uses unrelated Gaussian features (chance-level metrics). ``tiny`` (1,200 x 600) is a quick
check of the script itself.

``--device cuda,cpu`` runs tpr's path (and the scores-only floor) on each device, so the GPU's
time and memory stand next to the CPU path's; ``--methods`` picks what runs and ``--json``
writes every run's figures (``bench/gpu_check.py`` reads them).

    python bench/eval_speed.py --sizes cuhk,icfg --device auto
    python bench/eval_speed.py --sizes icfg --device cuda,cpu --methods fast
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# (num_queries, num_images, num_ids) of the test splits, and a tiny one for a quick check.
SIZES = {"cuhk": (6156, 3074, 1000), "icfg": (19848, 19848, 1000), "tiny": (1200, 600, 100)}
# (image noise, caption noise, log-normal spread of the noise) for --features clustered.
NOISE = {"cuhk": (2.2, 2.6, 0.3), "icfg": (2.2, 2.8, 0.35), "tiny": (2.2, 2.6, 0.3)}
METHODS = ("naive", "fast", "scores")
LABELS = {"naive": "naive", "fast": "tpr", "scores": "scores only"}
DIM = 512
KS = (1, 5, 10)


def make_problem(size: str, features: str, seed: int = 0):
    """Seeded features and pids: several images per identity, one or more captions per image."""
    num_q, num_g, num_ids = SIZES[size]
    rng = np.random.default_rng(seed)
    # Images per identity vary (1 to a few dozen), as in the real splits.
    weights = rng.gamma(4.0, size=num_ids)
    per_id = 1 + rng.multinomial(num_g - num_ids, weights / weights.sum())
    gallery_pids = rng.permutation(np.repeat(np.arange(num_ids), per_id))
    # Every image gets num_q // num_g captions; a few get one more, to reach num_q.
    caption_image = np.concatenate(
        [np.repeat(np.arange(num_g), num_q // num_g), rng.choice(num_g, num_q % num_g, replace=False)]
    )
    query_pids = gallery_pids[caption_image]
    if features == "random":
        q = rng.standard_normal((num_q, DIM), dtype=np.float32)
        g = rng.standard_normal((num_g, DIM), dtype=np.float32)
        return q, g, query_pids, gallery_pids
    centres = rng.standard_normal((num_ids, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    img_noise, txt_noise, spread = NOISE[size]
    scale = np.float32(1 / np.sqrt(DIM))

    def noisy(pids: np.ndarray, noise: float) -> np.ndarray:
        strength = (noise * np.exp(spread * rng.standard_normal(len(pids)))).astype(np.float32)[:, None]
        return centres[pids] + strength * scale * rng.standard_normal((len(pids), DIM), dtype=np.float32)

    return noisy(query_pids, txt_noise), noisy(gallery_pids, img_noise), query_pids, gallery_pids


def naive_metrics(q: np.ndarray, g: np.ndarray, query_pids, gallery_pids, sort_kind: str) -> dict[str, float]:
    """Full similarity matrix, then one argsort per query row (the reference-implementation way)."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    sim = q @ g.T  # (Q, G), the whole matrix at once
    first, ap, inp = [], [], []
    for i in range(sim.shape[0]):
        order = np.argsort(-sim[i], kind=sort_kind)
        hits = np.flatnonzero(gallery_pids[order] == query_pids[i]) + 1  # 1-based match ranks
        if hits.size == 0:
            continue
        first.append(hits[0])
        ap.append(np.mean(np.arange(1, hits.size + 1) / hits))
        inp.append(hits.size / hits[-1])
    first = np.asarray(first)
    out = {f"R{k}": 100.0 * float(np.mean(first <= k)) for k in KS}
    out["mAP"] = 100.0 * float(np.mean(ap))
    out["mINP"] = 100.0 * float(np.mean(inp))
    return out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> None:
    """Run one method on one size and print one JSON line."""
    import torch

    from tpr_core.eval.metrics import REPORTED_METRICS

    q, g, qp, gp = make_problem(args.size, args.features, args.seed)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker == "fast":
        from tpr_core.eval import retrieval_metrics_from_features

        qt, gt, qpt, gpt = (torch.from_numpy(x) for x in (q, g, qp, gp))

        def run() -> dict[str, float]:
            return retrieval_metrics_from_features(
                qt, gt, qpt, gpt, ks=KS, chunk_size=args.chunk_size, device=device
            )

        if device == "cuda":  # warm up CUDA context and kernels outside the timing
            retrieval_metrics_from_features(qt[:64], gt, qpt[:64], gpt, ks=KS, device=device)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
    elif args.worker == "scores":
        # Floor of any exact method: the (Q, G) scores themselves, chunk by chunk, nothing else.
        import torch.nn.functional as F

        # On CPU the product is numpy's (the BLAS tpr's CPU path uses), with its own threads.
        qt, gt = (torch.from_numpy(x).to(device) for x in (q, g))

        def run() -> dict[str, float]:
            gn = F.normalize(gt, dim=1)
            block = torch.empty(args.chunk_size, gn.shape[0], device=device)
            for start in range(0, qt.shape[0], args.chunk_size):
                qc = F.normalize(qt[start : start + args.chunk_size], dim=1)
                if device == "cpu":
                    np.matmul(qc.numpy(), gn.numpy().T, out=block[: qc.shape[0]].numpy())
                else:
                    torch.mm(qc, gn.t(), out=block[: qc.shape[0]])
            return {}

    else:
        device = "cpu"

        def run() -> dict[str, float]:
            return naive_metrics(q, g, qp, gp, args.naive_sort)

    rss_before = _status_kib("VmRSS")
    exact_peak = _reset_peak_rss()
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    metrics = run()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu_seconds = _cpu_seconds() - cpu_start
    peak = _status_kib("VmHWM")
    result = {
        "method": args.worker,
        "size": args.size,
        "device": device,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_mib": peak / 1024,
        "extra_rss_mib": max(0, peak - rss_before) / 1024,
        "peak_is_exact": exact_peak,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "metrics": {k: metrics[k] for k in REPORTED_METRICS if k in metrics},
    }
    print(json.dumps(result))


def run_method(method: str, size: str, device: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", method, "--size", size, "--features", args.features,
        "--device", device, "--chunk-size", str(args.chunk_size), "--naive-sort", args.naive_sort,
        "--seed", str(args.seed),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} on {size} ({device}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def planned_runs(methods: list[str], devices: list[str]) -> list[tuple[str, str]]:
    """(method, device) pairs: the naive reference on the CPU, tpr's path and the scores-only
    floor on each requested device."""
    return [(m, "cpu") if m == "naive" else (m, d) for m in methods for d in (devices[:1] if m == "naive" else devices)]


def run_keys(plan: list[tuple[str, str]]) -> list[str]:
    """A name per planned run: ``naive``, ``fast@cuda``...; a device named twice (``cpu,cpu``:
    run-to-run spread) gets ``#2`` on its second run."""
    keys: list[str] = []
    for m, d in plan:
        key = m if m == "naive" else f"{m}@{d}"
        n = sum(1 for k in keys if k.split("#")[0] == key)
        keys.append(key if n == 0 else f"{key}#{n + 1}")
    return keys


def summarise(size: str, best: dict[str, dict], peak: dict[str, float]) -> dict:
    """Print one size's figures and return them (for ``--json``): every run, the speed-ups of
    tpr's path against the naive reference and between devices, and how far the metrics agree."""
    num_q, num_g, _ = SIZES[size]
    print(f"\n== {size}: {num_q} queries x {num_g} gallery ==")
    for key, r in best.items():
        cuda = f", CUDA peak {r['cuda_peak_mib']:.0f} MiB" if r["cuda_peak_mib"] is not None else ""
        print(
            f"  {LABELS[r['method']]:11s} [{r['device']}] {r['seconds']:7.2f} s wall ({r['cpu_seconds']:6.2f} s CPU)  "
            f"peak RSS +{peak[key]:5.0f} MiB (process {r['peak_rss_mib']:.0f} MiB){cuda}"
        )
    if any(r["method"] == "scores" for r in best.values()):
        print("  (scores only: chunked similarity, no ranking; a floor for any exact method on this device)")
    fast = [k for k, r in best.items() if r["method"] == "fast"]
    if "naive" in best:
        naive = best["naive"]
        for k in fast:
            f = best[k]
            print(
                f"  speed-up naive/tpr [{f['device']}]: {naive['seconds'] / f['seconds']:.2f}x wall, "
                f"{naive['cpu_seconds'] / f['cpu_seconds']:.2f}x CPU time; peak memory tpr/naive "
                f"(host RSS increase): {peak[k] / max(peak['naive'], 1e-9):.3f}"
            )
    for k in fast[1:]:
        a, b = best[fast[0]], best[k]
        print(f"  tpr [{a['device']}] against tpr [{b['device']}]: {b['seconds'] / a['seconds']:.2f}x faster (wall)")
    scored = [k for k, r in best.items() if r["metrics"]]
    diff = 0.0
    if len(scored) > 1:
        ref = best[scored[0]]["metrics"]
        diff = max(abs(best[k]["metrics"][m] - v) for k in scored[1:] for m, v in ref.items())
        print("  metrics: " + "; ".join(
            f"{k} " + ", ".join(f"{m} {v:.3f}" for m, v in best[k]["metrics"].items()) for k in scored
        ))  # fmt: skip
        print(f"  max |difference|: {diff:.2e} percentage points ({'agree' if diff < 1e-2 else 'DISAGREE'})")
    return {
        "queries": num_q, "gallery": num_g, "metrics_max_abs_diff": diff, "metrics_agree": diff < 1e-2,
        "runs": {k: {**r, "extra_rss_mib": peak[k]} for k, r in best.items()},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="cuhk,icfg", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument(
        "--device", default="auto", help="for tpr's path: auto, cpu or cuda, or several comma-separated (cuda,cpu)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--json", type=Path, help="also write every run's figures to this file")
    parser.add_argument("--features", default="clustered", choices=["clustered", "random"])
    parser.add_argument("--chunk-size", type=int, default=2048, help="queries per chunk (tpr's path)")
    parser.add_argument(
        "--naive-sort", default="quicksort", choices=["quicksort", "stable"],
        help="argsort kind of the reference (quicksort: what reference code uses; stable: same tie rule as tpr)",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(SIZES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sizes, methods, devices = (
        [s.strip() for s in v.split(",") if s.strip()] for v in (args.sizes, args.methods, args.device)
    )
    for name, got, known in (("sizes", sizes, SIZES), ("methods", methods, METHODS),
                             ("device", devices, ("auto", "cpu", "cuda"))):  # fmt: skip
        unknown = [s for s in got if s not in known]
        if unknown or not got:
            parser.error(f"--{name}: unknown {unknown or got}; choose from {', '.join(known)}")

    print(f"features={args.features} dim={DIM} chunk_size={args.chunk_size} naive_sort={args.naive_sort}")
    report = {"features": args.features, "dim": DIM, "chunk_size": args.chunk_size, "sizes": {}}
    for size in sizes:
        plan = planned_runs(methods, devices)
        runs = {
            key: [run_method(m, size, d, args) for _ in range(max(1, args.repeat))]
            for key, (m, d) in zip(run_keys(plan), plan, strict=True)
        }
        best = {k: min(r, key=lambda x: x["seconds"]) for k, r in runs.items()}
        peak = {k: max(x["extra_rss_mib"] for x in r) for k, r in runs.items()}
        report["sizes"][size] = summarise(size, best, peak)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
