"""Data: synthetic generator, raw source formats (``formats``), the prepared Parquet dataset
(``prepare`` writes it, ``store`` owns its on-disk format and readers), torch datasets.

Batch contract (what a training DataLoader yields, what models consume), all tensors:

- ``images``       float (B, 3, H, W), normalised with CLIP mean/std
- ``text_ids``     long  (B, L) token ids: BOS, tokens, EOS, then ``pad_id``
- ``text_mask``    long  (B, L) 1 on real tokens (BOS..EOS), 0 on padding
- ``pids``         long  (B,) identity, contiguous from 0 within the split
- ``index``        long  (B,) row index in the split
- ``sample_seed``  long  (B,) training only: the seed of a sample's own randomness in the model
                   (UIT's dropped patches), from (seed, epoch, row) like the data's
- view ``mlm``:    ``mlm_ids`` (B, L) the masked caption, ``mlm_labels`` (B, L) original
                   id at predicted positions, -100 elsewhere
- view ``levels``: ``phrase_ids``/``phrase_mask`` (B, L) one comma chunk of the caption,
                   ``word_ids``/``word_mask`` (B, L) one attribute phrase of the caption
- view ``level_images``: ``phrase_images``/``word_images`` (B, 3, H, W) two more augmented
                   views of the image, for the phrase and word levels (IVT)
- view ``text_aug``: applied in place to ``text_ids`` (UIT caption pruning, training only)
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> submodule that defines it. Imported on first use, so that the light parts
# (``tpr_core.data.formats``, which the config schema reads) load without torch.
_EXPORTS = {
    "GalleryDataset": "dataset",
    "QueryDataset": "dataset",
    "SplitData": "dataset",
    "TrainDataset": "dataset",
    "collate": "dataset",
    "load_split": "dataset",
    "make_train_loader": "dataset",
    "train_identity_count": "dataset",
    "build_batch_sampler": "samplers",
    "Tokenizer": "tokenizer",
    "DatasetError": "store",
    "load_split_table": "store",
    "open_dataset": "store",
    "read_manifest": "store",
    "FORMATS": "formats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """A re-exported name, imported from its submodule."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    """Module attributes, re-exported names included."""
    return sorted({*globals(), *_EXPORTS})
