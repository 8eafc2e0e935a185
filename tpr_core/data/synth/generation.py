"""Writing the dataset folder: identities, splits, images and captions, sidecars, reuse checks.

The folder appears atomically (written beside it, then renamed) and records its generation
parameters in ``synth.json``, so a second call with the same parameters reuses it and one with
other parameters is an error that names the file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

from tpr_core.config import ConfigError
from tpr_core.data.synth.attributes import _rng, make_identities
from tpr_core.data.synth.captions import _tokens, describe
from tpr_core.data.synth.rendering import render_image

GENERATOR_VERSION = 1  # bump when the output for a given seed changes; stale folders then error
SPLITS = ("train", "val", "test")
_JPEG_QUALITY = 92


class SynthError(ConfigError):
    """The output folder holds something other than this synthetic dataset (names the file)."""


def _splits(identities: int, seed: int) -> dict[int, str]:
    """Identity-disjoint ~70/15/15 split; val and test get at least one identity each."""
    perm = _rng(seed, 4).permutation(identities) + 1
    n_test = max(1, round(0.15 * identities))
    n_val = max(1, round(0.15 * identities))
    split = {}
    for i, pid in enumerate(perm.tolist()):
        split[pid] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
    return split


def _id_width(identities: int) -> int:
    return max(4, len(str(identities)))


def _render_identity(job: tuple[Path, int, dict[str, Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """Render and write every image of one identity; returns its records with view info."""
    root, pid, attrs, p = job
    width = _id_width(p["identities"])
    size = tuple(p["size"])
    folder = root / "imgs" / "synth" / f"{pid:0{width}d}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for j in range(p["images_per_identity"]):
        img, info = render_image(attrs, _rng(p["seed"], 1, pid, j), size)  # type: ignore[arg-type]
        rel = f"synth/{pid:0{width}d}/{pid:0{width}d}_{j:02d}.jpg"
        img.save(root / "imgs" / rel, format="JPEG", quality=_JPEG_QUALITY, subsampling=0, optimize=False)
        crng = _rng(p["seed"], 2, pid, j)
        captions = [
            describe(attrs, crng, view=info["view"], hidden=info["hidden"])
            for _ in range(p["captions_per_image"])
        ]
        out.append({"file_path": rel, "captions": captions, "info": info})
    return out


def _render_all(
    jobs: list[tuple[Path, int, dict[str, Any], dict[str, Any]]], workers: int
) -> list[list[dict]]:
    """``_render_identity`` of every job, in job order, in ``workers`` processes."""
    if workers > 1 and "fork" in get_all_start_methods():
        # fork, as torch's DataLoader: spawn/forkserver would re-run an unguarded __main__ (a
        # script, a Ray worker) in every child. Children only touch numpy, PIL and files.
        # map() returns results in identity order whatever the scheduling.
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as ex:
            return list(ex.map(_render_identity, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    return [_render_identity(j) for j in jobs]


def _params(
    identities: int, images_per_identity: int, captions_per_image: int, seed: int, size: tuple[int, int]
) -> dict[str, Any]:
    """The generation parameters recorded in ``synth.json``."""
    return {
        "generator": "tpr_core.data.synth",
        "version": GENERATOR_VERSION,
        "identities": int(identities),
        "images_per_identity": int(images_per_identity),
        "captions_per_image": int(captions_per_image),
        "seed": int(seed),
        "size": [int(size[0]), int(size[1])],
    }


def _check_arguments(
    identities: int, images_per_identity: int, captions_per_image: int, size: tuple[int, int]
) -> tuple[int, int]:
    """Raise ValueError on arguments ``generate`` cannot honour; returns the size as ints."""
    if identities < 3:
        raise ValueError(f"identities must be >= 3 (one per split), got {identities}")
    if images_per_identity < 1 or captions_per_image < 1:
        raise ValueError(
            "images_per_identity and captions_per_image must be >= 1, got "
            f"{images_per_identity} and {captions_per_image}"
        )
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 8:
        raise ValueError(f"size must be at least 16x8 (HxW), got {h}x{w}")
    return h, w


def _check_existing(out: Path, params: dict[str, Any]) -> bool:
    """True when ``out`` already holds this dataset; raise when it holds something else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise SynthError(f"{out}: exists and is not a folder")
    meta, raw = out / "synth.json", out / "reid_raw.json"
    if not raw.exists():
        if any(out.iterdir()):
            raise SynthError(
                f"{out}: exists, is not empty and has no reid_raw.json; remove it or pick another --out"
            )
        return False  # an empty folder: generate into it
    if not meta.exists():
        raise SynthError(f"{meta}: missing; {out} holds a dataset not written by the synthetic generator")
    try:
        old = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SynthError(f"{meta}: unreadable ({e})") from None
    diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
    if diff:
        said = ", ".join(f"{k}: existing {o!r} vs requested {n!r}" for k, (o, n) in sorted(diff.items()))
        raise SynthError(
            f"{meta}: {out} was generated with other parameters ({said}); remove it or pick another --out"
        )
    return True


def _records(
    results: list[list[dict[str, Any]]], split: dict[int, str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The CUHK-PEDES records (``reid_raw.json``) and the view sidecar of every identity's images.

    ``results[i]`` holds the images of identity ``i + 1``.
    """
    raw, views = [], {}
    for pid, recs in zip(range(1, len(split) + 1), results, strict=True):
        for r in recs:
            raw.append(
                {
                    "split": split[pid],
                    "captions": r["captions"],
                    "file_path": r["file_path"],
                    "id": pid,
                    "processed_tokens": [_tokens(c) for c in r["captions"]],
                }
            )
            views[r["file_path"]] = r["info"]
    return raw, views


def _write(
    tmp: Path, attrs: dict[int, dict[str, Any]], split: dict[int, str], params: dict[str, Any], workers: int
) -> list[dict[str, Any]]:
    """Write the whole dataset into ``tmp``, ``synth.json`` last; returns the CUHK-PEDES records."""
    tmp.mkdir()
    jobs = [(tmp, pid, attrs[pid], params) for pid in range(1, len(attrs) + 1)]
    raw, views = _records(_render_all(jobs, workers), split)
    (tmp / "reid_raw.json").write_text(json.dumps(raw))
    (tmp / "attributes.json").write_text(json.dumps({str(k): v for k, v in attrs.items()}, indent=1))
    (tmp / "views.json").write_text(json.dumps(views, indent=1))
    (tmp / "synth.json").write_text(json.dumps(params, indent=1, sort_keys=True))  # last: marks complete
    return raw


def _summary(out: Path, raw: list[dict[str, Any]], reused: bool, seconds: float) -> dict[str, Any]:
    ids: dict[str, set[int]] = {s: set() for s in SPLITS}
    images = dict.fromkeys(SPLITS, 0)
    captions = dict.fromkeys(SPLITS, 0)
    for r in raw:
        ids[r["split"]].add(r["id"])
        images[r["split"]] += 1
        captions[r["split"]] += len(r["captions"])
    return {
        "path": str(out),
        "reused": reused,
        "identities": {s: len(ids[s]) for s in SPLITS},
        "images": images,
        "captions": captions,
        "seconds": round(seconds, 2),
    }


def generate(
    out: str | os.PathLike,
    identities: int = 300,
    images_per_identity: int = 4,
    captions_per_image: int = 2,
    seed: int = 0,
    size: tuple[int, int] = (384, 128),
    workers: int | None = None,
) -> dict[str, Any]:
    """Write (or reuse) a synthetic dataset in the CUHK-PEDES layout.

    The folder appears atomically: it is written to ``OUT.tmp-<pid>`` and renamed. If ``out``
    already holds a dataset generated with the same parameters it is reused as is.

    Args:
        out: Output folder.
        identities: Number of identities (ids 1..N), at least 3 (one per split).
        images_per_identity: Images per identity.
        captions_per_image: Captions per image.
        seed: Generator seed; the same arguments give the same bytes.
        size: Image (height, width) in pixels, at least 16x8.
        workers: Processes rendering images (default: 2, or 1 for small sets); the output does
            not depend on it.

    Returns:
        A printable summary: path, reused, and identities / images / captions per split.

    Raises:
        SynthError: ``out`` exists with other parameters or holds something else.
        ValueError: Bad arguments.
    """
    start = time.perf_counter()
    out = Path(out)
    h, w = _check_arguments(identities, images_per_identity, captions_per_image, size)
    params = _params(identities, images_per_identity, captions_per_image, seed, (h, w))
    if _check_existing(out, params):
        raw = json.loads((out / "reid_raw.json").read_text())
        return _summary(out, raw, True, time.perf_counter() - start)
    if workers is None:
        small = identities * images_per_identity * h * w < 200 * 384 * 128
        workers = 1 if small else min(2, os.cpu_count() or 1)

    attrs = make_identities(identities, seed)
    split = _splits(identities, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        raw = _write(tmp, attrs, split, params, workers)
        try:
            os.rename(tmp, out)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError:
            # Another process finished the same folder first: keep theirs if it matches.
            if _check_existing(out, params):
                shutil.rmtree(tmp, ignore_errors=True)
                return _summary(out, raw, True, time.perf_counter() - start)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _summary(out, raw, False, time.perf_counter() - start)


def ensure_synthetic(
    out: str | os.PathLike,
    identities: int = 300,
    images_per_identity: int = 4,
    captions_per_image: int = 2,
    seed: int = 0,
    size: tuple[int, int] = (384, 128),
) -> Path:
    """Generate the dataset at ``out`` unless it is already there with the same parameters.

    Args:
        out: Output folder.
        identities: Number of identities.
        images_per_identity: Images per identity.
        captions_per_image: Captions per image.
        seed: Generator seed.
        size: Image (height, width).

    Returns:
        ``out`` as a Path (holding reid_raw.json and imgs/).

    Raises:
        SynthError: ``out`` exists with other parameters or holds something else.
    """
    generate(
        out,
        identities=identities,
        images_per_identity=images_per_identity,
        captions_per_image=captions_per_image,
        seed=seed,
        size=size,
    )
    return Path(out)
