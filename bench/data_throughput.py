"""Training-data throughput: Parquet shards + tensor transforms vs JPEG files + PIL.

Measures images per second decoded, augmented, tokenized and batched by a DataLoader:

- ``parquet``: ``TrainDataset`` over the prepared shards (image bytes in one arrow column,
  ``torchvision.io.decode_image``, uint8 tensor augmentations, one float conversion);
- ``pil``: the reference implementations' way: a folder of JPEG files opened one by one
  with ``PIL.Image.open(...).convert("RGB")`` and ``torchvision.transforms`` (Resize, flip,
  Pad + RandomCrop, ToTensor, Normalize, RandomErasing).

Same transforms, same tokenizer, same batch size, same number of loader workers, same
machine; the two are timed alternately, several rounds, and the ratio of medians printed.
The data is generated here: the synthetic generator (``tpr_core.data.synth.generate``)
when present, else plain JPEGs made with PIL; Parquet comes from
``tpr_core.data.prepare.prepare`` when present, else is written directly.

    python bench/data_throughput.py --identities 120 --workers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpr_core.data.dataset import TrainDataset, collate, load_split  # noqa: E402
from tpr_core.data.samplers import build_batch_sampler  # noqa: E402
from tpr_core.data.tokenizer import Tokenizer  # noqa: E402
from tpr_core.data.transforms import PILTransform  # noqa: E402

# The benchmark measures torchvision's decoder on purpose; its deprecation notice is noise here.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning
)


def _optional(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def make_raw(out: Path, identities: int, per_id: int, size: tuple[int, int], seed: int) -> Path:
    """A CUHK-PEDES-layout folder (reid_raw.json + imgs/), all in the train split."""
    generate = _optional("tpr_core.data.synth", "generate")
    if generate is not None:
        generate(
            out, identities=identities, images_per_identity=per_id, captions_per_image=2, seed=seed, size=size
        )
        return out
    rng = np.random.default_rng(seed)
    records = []
    (out / "imgs").mkdir(parents=True, exist_ok=True)
    for pid in range(1, identities + 1):
        for j in range(per_id):
            arr = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
            img = Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR)
            rel = f"{pid:05d}_{j}.jpg"
            img.save(out / "imgs" / rel, "JPEG", quality=90)
            records.append(
                {
                    "split": "train",
                    "id": pid,
                    "file_path": rel,
                    "captions": ["a person in a red shirt, blue jeans.", "the man wears black shoes."],
                }
            )
    (out / "reid_raw.json").write_text(json.dumps(records))
    return out


def make_parquet(raw: Path, out: Path) -> Path:
    """Prepared shards from the raw folder."""
    prepare = _optional("tpr_core.data.prepare", "prepare")
    if prepare is not None:
        prepare("cuhk-pedes", raw, out)
        return out
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = json.loads((raw / "reid_raw.json").read_text())
    rows = []
    pid_map = {i: k for k, i in enumerate(sorted({r["id"] for r in recs if r["split"] == "train"}))}
    for image_id, r in enumerate(recs):
        if r["split"] != "train":
            continue
        data = (raw / "imgs" / r["file_path"]).read_bytes()
        for j, c in enumerate(r["captions"]):
            rows.append(
                dict(
                    split="train",
                    pid=pid_map[r["id"]],
                    orig_id=r["id"],
                    image_id=image_id,
                    image_path=r["file_path"],
                    caption=c,
                    caption_index=j,
                    image=data,
                )
            )
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "part-00000.parquet")
    (out / "_manifest.json").write_text(
        json.dumps({"shards": [{"file": "part-00000.parquet", "split": "train"}]})
    )
    return out


class JpegFolderDataset(Dataset):
    """Baseline: one JPEG file opened per item with PIL, torchvision.transforms on PIL images."""

    def __init__(
        self, raw: Path, tokenizer: Tokenizer, image_size: tuple[int, int], text_length: int
    ) -> None:
        recs = [r for r in json.loads((raw / "reid_raw.json").read_text()) if r["split"] == "train"]
        pid_map = {i: k for k, i in enumerate(sorted({r["id"] for r in recs}))}
        self.items = [
            (str(raw / "imgs" / r["file_path"]), c, pid_map[r["id"]]) for r in recs for c in r["captions"]
        ]
        self.tokenizer, self.text_length = tokenizer, text_length
        self.transform = PILTransform(image_size, train=True, augment=True)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path, caption, pid = self.items[i]
        image = self.transform(Image.open(path).convert("RGB"))
        ids, mask = self.tokenizer.encode([caption], self.text_length)
        return {
            "images": image,
            "text_ids": ids[0],
            "text_mask": mask[0],
            "pids": torch.tensor(pid),
            "index": torch.tensor(i),
        }


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the loader workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_loader(loader: DataLoader, max_batches: int) -> tuple[float, float, int]:
    """(images per wall second after the first batch, images per CPU second overall, images).

    The wall rate leaves out worker start-up; the CPU rate counts every process's work
    (workers are joined before reading it), so it holds up on a machine shared with
    other jobs, where wall time depends on what else runs.
    """
    cpu0 = _cpu_seconds()
    it = iter(loader)
    first = next(it)["images"].shape[0]
    n, t0 = 0, time.perf_counter()
    for b, batch in enumerate(it):
        n += batch["images"].shape[0]
        if b + 1 >= max_batches:
            break
    wall = time.perf_counter() - t0
    del it  # joins the workers, so their CPU time is counted
    cpu = _cpu_seconds() - cpu0
    return n / wall, (n + first) / cpu, n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--identities", type=int, default=120)
    p.add_argument("--images-per-identity", type=int, default=4)
    p.add_argument("--source-size", default="384x128", help="HxW of the generated JPEGs")
    p.add_argument("--image-size", default="384x128", help="HxW fed to the model (model.image_size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for both")
    p.add_argument("--batches", type=int, default=25, help="timed batches per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)
    src = tuple(int(v) for v in args.source_size.lower().split("x"))
    size = tuple(int(v) for v in args.image_size.lower().split("x"))
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.dir or tmp)
        raw, prepared = work / "raw", work / "prepared"
        t = time.perf_counter()
        if not (raw / "reid_raw.json").exists():
            make_raw(raw, args.identities, args.images_per_identity, src, args.seed)
        if not prepared.exists():
            make_parquet(raw, prepared)
        print(f"data ready in {time.perf_counter() - t:.1f}s under {work}")

        data = load_split(prepared, "train")
        tok = Tokenizer.train([data.caption(i) for i in range(len(data))], vocab_size=2000, max_length=77)
        parquet_ds = TrainDataset(data, tok, size, 77, augment=True, seed=args.seed)
        jpeg_ds = JpegFolderDataset(raw, tok, size, 77)
        assert len(jpeg_ds) == len(parquet_ds), (len(jpeg_ds), len(parquet_ds))

        def loaders(epoch: int) -> dict[str, DataLoader]:
            sampler = build_batch_sampler("random", data.pids, args.batch_size, seed=args.seed)
            sampler.set_epoch(epoch)
            parquet_ds.set_epoch(epoch)
            kw = dict(num_workers=args.workers, collate_fn=collate)
            return {
                "parquet": DataLoader(parquet_ds, batch_sampler=sampler, **kw),
                "pil": DataLoader(jpeg_ds, batch_sampler=sampler, **kw),
            }

        max_batches = min(args.batches, len(data) // args.batch_size - 1)
        wall: dict[str, list[float]] = {"parquet": [], "pil": []}
        cpu: dict[str, list[float]] = {"parquet": [], "pil": []}
        for r in range(args.rounds):
            for name, loader in loaders(r).items():
                w, c, n = time_loader(loader, max_batches)
                wall[name].append(w)
                cpu[name].append(c)
                print(f"round {r}: {name:8s} {w:8.1f} img/s wall  {c:8.1f} img/CPU-s  ({n} images)")
        mw = {k: statistics.median(v) for k, v in wall.items()}
        mc = {k: statistics.median(v) for k, v in cpu.items()}
        print(
            f"\nrows={len(data)} images={data.num_images} source={src[0]}x{src[1]} -> {size[0]}x{size[1]} "
            f"batch={args.batch_size} workers={args.workers} cpus={os.cpu_count()} (medians of {args.rounds} rounds)"
        )
        print(f"wall:  parquet+tensor {mw['parquet']:8.1f} img/s    jpeg+PIL {mw['pil']:8.1f} img/s")
        print(f"CPU:   parquet+tensor {mc['parquet']:8.1f} img/CPU-s  jpeg+PIL {mc['pil']:8.1f} img/CPU-s")
        print(
            f"ratio parquet/PIL: {mw['parquet'] / mw['pil']:.2f}x wall, {mc['parquet'] / mc['pil']:.2f}x CPU"
        )


if __name__ == "__main__":
    main()
