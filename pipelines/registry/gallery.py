"""The gallery index of the serving model: the gallery images of a split, encoded once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.registry.common import manifest_hash


def build_gallery_index(exported: Any, data_root: str, split: str, out_path: str | Path) -> Path:
    """Encode the gallery images of a split and write the serving model's Parquet index.

    Columns: ``image_id`` int64, ``image_path`` string, ``pid`` int64 (split-local),
    ``orig_id`` int64 (dataset person id), ``embedding`` fixed_size_list<float32>[D]
    (L2-normalised). The schema metadata records split, data root and manifest hash.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch.nn.functional as F

    from tpr_core.data.dataset import GalleryDataset, load_split
    from tpr_core.data.store import load_split_table
    from tpr_core.eval import encode_dataset, module_encoder
    from tpr_core.progress import Progress

    cfg = exported.cfg
    data = load_split(data_root, split)
    gallery = GalleryDataset(data, tuple(cfg.model.image_size))
    with Progress(f"indexing the {split} gallery", len(gallery), "images") as progress:
        enc = encode_dataset(
            module_encoder(exported.model), gallery, "image", cfg.data.eval_batch_size, progress=progress
        )
    feats = F.normalize(enc.feats.float(), dim=1).cpu().numpy().astype(np.float32)  # (G, D)
    image_ids = enc.ids.cpu().numpy().astype(np.int64)
    # Gallery order is the split's unique-image order; look paths and source ids up by image id.
    pos = {int(i): u for u, i in enumerate(data.unique_image_ids)}
    first_row = np.searchsorted(data.image_rows, np.arange(data.num_images))
    paths = [data.image_path(int(first_row[pos[int(i)]])) for i in image_ids]
    ids_table = load_split_table(data_root, split, columns=["image_id", "orig_id"])
    orig_of = dict(
        zip(ids_table.column("image_id").to_pylist(), ids_table.column("orig_id").to_pylist(), strict=True)
    )
    dim = feats.shape[1]
    table = pa.table(
        {
            "image_id": pa.array(image_ids, pa.int64()),
            "image_path": pa.array(paths, pa.string()),
            "pid": pa.array(enc.pids.cpu().numpy().astype(np.int64), pa.int64()),
            "orig_id": pa.array([int(orig_of[int(i)]) for i in image_ids], pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), dim),
        }
    )
    meta = {"split": split, "data_root": str(data_root), "manifest_hash": manifest_hash(data_root) or ""}
    table = table.replace_schema_metadata({b"tpr.gallery": json.dumps(meta).encode()})
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out
