"""Text search of a registered retrieval model: ranked gallery images, and a grid to look at."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class SearchResult:
    """Ranked gallery images for one text query.

    Attributes:
        rows: best first, dicts with ``image_id``, ``image_path``, ``orig_id``, ``score``.
        grid: the retrieval grid written, or None.
        note: why no grid was written (or how its frames were coloured).
    """

    rows: list[dict[str, Any]]
    grid: Path | None = None
    note: str = ""


def search(
    text: str,
    model_uri: str,
    top_k: int = 10,
    out: str | Path | None = None,
    data_root: str | None = None,
    person: int | None = None,
) -> SearchResult:
    """Query a registered retrieval model (e.g. ``models:/NAME@champion``) with one text.

    Args:
        text: the description.
        model_uri: a retrieval model URI.
        top_k: images to return.
        out: write the retrieval grid (PNG) here; needs the gallery images (``data_root``).
        data_root: prepared dataset holding the gallery; default the one the index was built from.
        person: the dataset person id (``orig_id``) the text describes, if known: the grid frames
            then show matches (green) and mismatches (red). Without it, a text equal to a
            caption of the gallery split takes that caption's person; otherwise every frame is
            drawn as a match and the note says so.

    Returns:
        A :class:`SearchResult`.
    """
    import pandas as pd

    from pipelines.registry.artifacts import load_retrieval_model

    model = load_retrieval_model(model_uri)  # data only: no code from the artifact runs
    pred = model.predict(None, pd.DataFrame({"text": [text]}), params={"top_k": int(top_k)})
    first = pred.iloc[0]
    rows = [
        {"image_id": int(i), "image_path": str(p), "orig_id": int(o), "score": float(s)}
        for i, p, o, s in zip(
            first["image_ids"], first["image_paths"], first["orig_ids"], first["scores"], strict=True
        )
    ]
    result = SearchResult(rows)
    if out is None:
        return result

    from tpr_core.data.dataset import load_split
    from tpr_core.data.store import load_split_table
    from tpr_core.eval import retrieval_grid

    info = model.gallery_info or {}
    split = info.get("split", "test")
    root = data_root or info.get("data_root") or model.cfg.data.root
    try:
        data = load_split(root, split)
    except Exception as e:
        result.note = f"gallery images not readable from {root} split {split!r}: {e}"
        return result
    pos = {int(i): u for u, i in enumerate(data.unique_image_ids)}
    images = [data.image_bytes(pos[r["image_id"]]) for r in rows]
    if person is None:
        table = load_split_table(root, split, columns=["caption", "orig_id"])
        wanted = text.strip().lower()
        for cap, oid in zip(
            table.column("caption").to_pylist(), table.column("orig_id").to_pylist(), strict=True
        ):
            if cap.strip().lower() == wanted:
                person = int(oid)
                break
    if person is None:
        match = [True] * len(rows)
        result.note = "no known person for this text: every frame is drawn as a match"
    else:
        match = [r["orig_id"] == person for r in rows]
    result.grid = retrieval_grid([text], [images], [match], out, labels=[f"top-{len(rows)}"])
    return result
