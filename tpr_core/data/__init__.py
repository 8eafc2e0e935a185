"""Data: synthetic generator, raw-format readers, Parquet shards, torch datasets.

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

from tpr_core.data.dataset import (
    GalleryDataset,
    QueryDataset,
    SplitData,
    TrainDataset,
    collate,
    load_split,
    make_train_loader,
    train_identity_count,
)
from tpr_core.data.samplers import build_batch_sampler
from tpr_core.data.tokenizer import Tokenizer

__all__ = [
    "GalleryDataset",
    "QueryDataset",
    "SplitData",
    "Tokenizer",
    "TrainDataset",
    "build_batch_sampler",
    "collate",
    "load_split",
    "make_train_loader",
    "train_identity_count",
]
