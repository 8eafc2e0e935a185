"""The registered retrieval model, defined from code (MLflow "models from code").

MLflow copies this file into the model and runs it at load time; the object handed to
``mlflow.models.set_model`` below is the model. Nothing is pickled: the weights are
safetensors, and the rest is YAML, JSON and Parquet.

Artifacts (``context.artifacts``)
    ``model``    an exported model folder (``tpr_core.export``): weights, config, tokenizer.
    ``gallery``  the gallery index, a Parquet file with one row per gallery image:
                 ``image_id`` int64, ``image_path`` string, ``pid`` int64 (split-local),
                 ``orig_id`` int64 (the dataset's person id), ``embedding``
                 fixed_size_list<float32>[D] (L2-normalised image feature).

Model config (``model_config`` when logging or loading)
    ``index_uri``  an index made by ``tpr index`` (local path or fs URI) ranked instead of the
                 gallery when a request names none.

Input
    A DataFrame with a ``text`` column (one query per row), or a plain list of strings; params
    ``{"top_k": int, "index_uri": str}`` (``top_k`` default 10, capped at the gallery size;
    ``index_uri`` default the model config's, else none: the gallery). An index must be one of
    images made by this model's weights (``tpr_core.index``), or the request is refused naming
    both models; its rows have no gallery ids, so ``image_ids`` and ``orig_ids`` are -1 unless
    it was made from a prepared dataset. The server reads any index path a request names that
    its process can read: serve on a trusted network. Every query must be a string
    with visible characters (``None``, bytes, numbers, lists and blank or invisible-only texts
    are refused, naming the row). A query is cut to ``MAX_QUERY_CHARS_PER_TOKEN`` characters per
    token of the model's text length before tokenizing: more can never reach the encoder, and a
    huge text would otherwise cost the tokenizer minutes and gigabytes.

Output
    One row per query, which serialises cleanly through ``/invocations`` as
    ``{"predictions": [{"text": ..., "image_ids": [...], ...}, ...]}``:
    ``text`` (the query), ``image_ids`` list<int64>, ``image_paths`` list<string>,
    ``orig_ids`` list<int64>, ``scores`` list<float64> (cosine similarity), best first.
    Ties are ordered by gallery position, as in ``tpr_core.eval.metrics``.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from tpr_core.data.text import is_blank

DEFAULT_TOP_K = 10
_TEXT_BATCH = 256
# A query token is never longer than this many characters, so text beyond
# text_length x this cannot change what the encoder sees.
MAX_QUERY_CHARS_PER_TOKEN = 64


def query_texts(model_input: Any, max_chars: int) -> list[str]:
    """The query strings of a request, each cut to ``max_chars``; a value that is not a string,
    or a blank one, is a ``ValueError`` naming its row."""
    if isinstance(model_input, pd.DataFrame):
        if "text" not in model_input.columns:
            raise ValueError(f"model input: field 'text' missing; columns are {list(model_input.columns)}")
        values = model_input["text"].tolist()
    elif isinstance(model_input, (list, tuple)):
        values = list(model_input)
    else:
        raise ValueError(
            f"model input must be a DataFrame with a 'text' column or a list of strings, "
            f"got {type(model_input).__name__}"
        )
    texts = []
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and value != value):  # pandas reads a null as NaN
            raise ValueError(f"model input row {row}: field 'text' is missing (null)")
        if not isinstance(value, str):
            raise ValueError(f"model input row {row}: field 'text' must be a string, got {type(value).__name__}")
        if is_blank(value):
            raise ValueError(f"model input row {row}: field 'text' is empty (no visible characters)")
        texts.append(value[:max_chars])
    return texts


class TPRRetrievalModel(mlflow.pyfunc.PythonModel):
    """Text -> top-k gallery images of a trained text-based person retrieval model."""

    def load_context(self, context: Any) -> None:
        """Load the exported model and the gallery index from the model's artifacts."""
        import pyarrow.parquet as pq
        import torch

        from tpr_core.export import load_exported

        self._exported = load_exported(context.artifacts["model"], device="cpu")
        table = pq.read_table(context.artifacts["gallery"])
        emb = table.column("embedding").combine_chunks()
        dim = emb.type.list_size
        flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        self._gallery = torch.from_numpy(flat.reshape(len(table), dim).copy())  # (G, D)
        self._image_ids = table.column("image_id").to_numpy()
        self._image_paths = np.asarray(table.column("image_path").to_pylist(), dtype=object)
        self._orig_ids = table.column("orig_id").to_numpy()
        meta = (table.schema.metadata or {}).get(b"tpr.gallery")
        self.gallery_info = json.loads(meta) if meta else {}
        config = getattr(context, "model_config", None) or {}
        self._default_index = str(config.get("index_uri") or "") or None
        self._indexes: dict[str, tuple[tuple[Any, ...], Any]] = {}

    def _index(self, uri: str) -> Any:
        """The index at ``uri``, checked against the served weights; read again when it changed."""
        from tpr_core.index import (
            ImageIndexError,
            check_same_model,
            load_index,
            read_index_meta,
            weights_digest,
        )

        meta = read_index_meta(uri)
        stamp = (meta.get("updated"), meta.get("rows"), meta.get("weights_sha256"))
        cached = self._indexes.get(uri)
        if cached is None or cached[0] != stamp:
            index = load_index(uri)
            check_same_model(index.meta, uri, "the served model", weights_digest(self._exported))
            if index.kind != "image":
                raise ImageIndexError(f"index {uri} holds captions; text queries need an index of images")
            if len(self._indexes) >= 4:  # a few indexes stay loaded; requests alternating more reload
                self._indexes.pop(next(iter(self._indexes)))
            cached = self._indexes[uri] = (stamp, index)
        return cached[1]

    @property
    def cfg(self) -> Any:
        """The resolved training config of the served model."""
        return self._exported.cfg

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Rank the gallery for every query text.

        Args:
            context: MLflow's model context (unused after loading).
            model_input: DataFrame with a ``text`` column, or a list of strings (see the module
                docstring for what a query must be).
            params: ``{"top_k": int, "index_uri": str}``.

        Returns:
            One row per query: ``text``, ``image_ids``, ``image_paths``, ``orig_ids``, ``scores``.
        """
        import torch

        from tpr_core.index import embed_texts
        from tpr_core.index import top_k as rank

        texts = query_texts(model_input, self.cfg.model.text_length * MAX_QUERY_CHARS_PER_TOKEN)
        top_k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        if top_k < 1:
            raise ValueError(f"param top_k must be >= 1, got {top_k}")
        index_uri = str((params or {}).get("index_uri") or "") or self._default_index
        if index_uri:
            index = self._index(index_uri)
            n = len(index)
            gallery, paths = index.embeddings, index.paths
            image_ids = index.image_ids if index.image_ids is not None else np.full(n, -1, dtype=np.int64)
            orig_ids = index.persons if index.persons is not None else np.full(n, -1, dtype=np.int64)
        else:
            gallery, paths, image_ids, orig_ids = self._gallery, self._image_paths, self._image_ids, self._orig_ids
        rows = []
        if texts:
            q = torch.cat(
                [embed_texts(self._exported, texts[s : s + _TEXT_BATCH]) for s in range(0, len(texts), _TEXT_BATCH)]
            )  # (Q, D), L2-normalised
            # Equal scores keep gallery order (lower index first).
            order, top = rank(q, gallery, top_k)  # (Q, k)
            for i, text in enumerate(texts):
                idx = order[i].numpy()
                rows.append(
                    {
                        "text": text,
                        "image_ids": [int(x) for x in image_ids[idx]],
                        "image_paths": [str(x) for x in paths[idx]],
                        "orig_ids": [int(x) for x in orig_ids[idx]],
                        "scores": [float(x) for x in top[i].tolist()],
                    }
                )
        return pd.DataFrame(rows, columns=["text", "image_ids", "image_paths", "orig_ids", "scores"])


mlflow.models.set_model(TPRRetrievalModel())
