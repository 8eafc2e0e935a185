"""Torch datasets over the prepared Parquet shards: training pairs, evaluation gallery and queries.

:func:`load_split` reads one split through :mod:`tpr_core.data.store` (a local path, or an fs
URI such as ``s3://bucket/tpr/cuhk`` by the same code) into a :class:`SplitData`: the per-row
columns as numpy / arrow arrays, and the encoded images once per unique image in a single
arrow binary array. Local shards are read through memory maps. Nothing is a Python list
of objects, so DataLoader workers forked from the process share these buffers
copy-on-write without touching them (a list of ``bytes`` would be copied page by page as
reference counts change).

Every item is a dict keyed like the batch contract (``tpr_core.data``), except that its
image is still uint8 (3, H, W) with its random-erasing box beside it: :func:`collate`
normalises the whole batch at once into the batch buffer (a float image per sample would be
4x the memory traffic). Always batch items with :func:`collate`. Training randomness (augmentation, MLM masking, caption
pruning, level choice) comes from a generator seeded by (seed, epoch, row), so a sample
is the same whichever worker makes it and a resumed epoch repeats it exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from tpr_core.data.store import DatasetError, open_prepared
from tpr_core.data.tokenizer import Tokenizer
from tpr_core.data.transforms import ImageTransform, decode_image_bytes, normalize_batch
from tpr_core.data.views import mask_tokens, phrase_chunks, prune_caption, word_phrases

REQUIRED_COLUMNS = ("split", "pid", "image_id", "image_path", "caption", "caption_index", "image")
KNOWN_VIEWS = ("mlm", "text_aug", "levels", "level_images")
ERASE_KEY = "_erase"  # item key of the random-erasing box, consumed by collate
# View ``level_images``: IVT pairs its phrase and word levels each with an augmented view of
# its own of the image (``images`` goes with the sentence).
LEVEL_IMAGE_KEYS = ("phrase_images", "word_images")
IMAGE_KEYS = ("images", *LEVEL_IMAGE_KEYS)
_META_COLUMNS = ["pid", "image_id", "image_path", "caption", "caption_index"]
_MAX_BINARY = 2**31 - 1 - 2**20  # a pa.binary array addresses at most 2 GiB


def _erase_key(image_key: str) -> str:
    return ERASE_KEY if image_key == "images" else f"{ERASE_KEY}:{image_key}"


# ------------------------------------------------------------------------------ reading


@dataclass
class SplitData:
    """One split of a prepared dataset, held in memory as flat arrays.

    Rows (image, caption pairs) are ordered by (pid, image_id, caption_index); ``index`` of a
    row is its position in that order. Unique images are ordered by first appearance.

    Attributes:
        root, split: where it came from.
        pids: int64 (N,) identity per row, contiguous from 0 within the split.
        image_ids: int64 (N,) image per row.
        image_rows: int64 (N,) position of the row's image in ``images``.
        captions: arrow string array (N,).
        image_paths: arrow string array (N,).
        images: arrow binary array (U,) encoded image bytes, one per unique image.
        image_pids: int64 (U,) identity per unique image.
        unique_image_ids: int64 (U,) image id per unique image.
    """

    root: str
    split: str
    pids: np.ndarray
    image_ids: np.ndarray
    image_rows: np.ndarray
    captions: pa.Array
    image_paths: pa.Array
    images: pa.Array
    image_pids: np.ndarray
    unique_image_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.pids)

    @property
    def num_images(self) -> int:
        return len(self.unique_image_ids)

    @property
    def num_identities(self) -> int:
        return len(np.unique(self.pids))

    def caption(self, i: int) -> str:
        return self.captions[i].as_py()

    def image_path(self, i: int) -> str:
        return self.image_paths[i].as_py()

    def image_bytes(self, u: int) -> bytes:
        """Encoded bytes of unique image ``u``."""
        return self.images[u].as_py()


def load_split(root: str | os.PathLike[str], split: str) -> SplitData:
    """Read one split of a prepared dataset (local path or fs URI).

    Args:
        root: folder written by ``tpr data prepare`` (``_manifest.json`` + Parquet shards).
        split: ``train``, ``val`` or ``test``.

    Raises:
        DatasetError: no such folder, no manifest (or one of another version), a missing shard,
            no shards or no rows in the split, a missing column, a null field; the message
            names the path (and file / field).
    """
    prepared = open_prepared(root, mmap=True)  # local shards are memory-mapped
    files = prepared.shard_files(split)
    if not files:
        splits = sorted({s["split"] for s in prepared.manifest["shards"]})
        raise DatasetError(f"{prepared.root}: split {split!r} has no shards; splits present: {splits}")
    dataset = ds.dataset(files, format="parquet", filesystem=prepared.fs)
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise DatasetError(f"{files[0]}: missing field {missing[0]!r} (columns: {dataset.schema.names})")
    where = pc.field("split") == split
    where_text = f"{prepared.root}: split {split!r}"
    meta = _read_rows(dataset, where, where_text)
    pids = meta.column("pid").to_numpy().astype(np.int64)
    image_ids = meta.column("image_id").to_numpy().astype(np.int64)

    # Unique images in order of first appearance; image_rows maps rows to them.
    first = np.ones(len(image_ids), dtype=bool)
    first[1:] = image_ids[1:] != image_ids[:-1]
    unique_ids = image_ids[first]
    vals, counts = np.unique(unique_ids, return_counts=True)
    if (counts > 1).any():
        dup = int(vals[counts > 1][0])
        raise DatasetError(f"{where_text}: field 'image_id' {dup} appears under two pids")
    images = _read_images(dataset, where, unique_ids, where_text)
    if images.null_count:
        bad = int(np.flatnonzero(images.is_null().to_numpy(zero_copy_only=False))[0])
        path = meta.column("image_path")[int(np.flatnonzero(first)[bad])]
        raise DatasetError(f"{where_text} image {path}: field 'image' is null")
    return SplitData(
        root=prepared.root,
        split=split,
        pids=pids,
        image_ids=image_ids,
        image_rows=(np.cumsum(first) - 1).astype(np.int64),
        captions=meta.column("caption").combine_chunks(),
        image_paths=meta.column("image_path").combine_chunks(),
        images=images,
        image_pids=pids[first],
        unique_image_ids=unique_ids,
    )


def _read_rows(dataset: ds.Dataset, where: pc.Expression, where_text: str) -> pa.Table:
    """The split's per-row columns (no image), in (pid, image_id, caption_index) order."""
    meta = dataset.to_table(columns=_META_COLUMNS, filter=where)
    if meta.num_rows == 0:
        raise DatasetError(f"{where_text} has no rows")
    # A canonical order, whatever the shard layout.
    order = pc.sort_indices(
        meta, sort_keys=[("pid", "ascending"), ("image_id", "ascending"), ("caption_index", "ascending")]
    )
    meta = meta.take(order)
    for name in ("caption", "image_path"):
        col = meta.column(name)
        if col.null_count:
            bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{where_text} row {bad}: field {name!r} is null")
    return meta


def _read_images(
    dataset: ds.Dataset, where: pc.Expression, unique_ids: np.ndarray, where_text: str
) -> pa.Array:
    """The encoded bytes of each image in ``unique_ids``, in that order, one copy each.

    The image column is streamed and only an image's first row kept: a row per caption repeats
    the bytes.
    """
    sorter = np.argsort(unique_ids, kind="stable")
    found_pos: list[np.ndarray] = []
    found_bytes: list[pa.Array] = []
    seen = np.zeros(len(unique_ids), dtype=bool)
    for batch in dataset.to_batches(columns=["image_id", "image"], filter=where):
        ids = batch.column(0).to_numpy().astype(np.int64)
        pos = sorter[np.searchsorted(unique_ids, ids, sorter=sorter)]
        uniq, first_k = np.unique(pos, return_index=True)
        new = ~seen[uniq]  # images met for the first time
        seen[uniq[new]] = True
        take = np.zeros(len(ids), dtype=bool)
        take[first_k[new]] = True
        if take.any():
            found_pos.append(pos[take])
            found_bytes.append(batch.column(1).filter(pa.array(take)))
    if not seen.all():
        raise DatasetError(f"{where_text}: image bytes missing for some images")
    positions = np.concatenate(found_pos)
    if sum(a.nbytes for a in found_bytes) > _MAX_BINARY:
        found_bytes = [a.cast(pa.large_binary()) for a in found_bytes]
    return pa.concat_arrays(found_bytes).take(pa.array(np.argsort(positions, kind="stable")))


def train_identity_count(split_data: SplitData) -> int:
    """Number of distinct identities: the identity classifier's class count."""
    return split_data.num_identities


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous share ``rank`` of ``range(n)``: sizes differ by at most one, the first ranks larger."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _sample_state(seed: int, epoch: int, index: int) -> int:
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ epoch) ^ index)


def _sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one sample, from (seed, epoch, row): independent of worker and order."""
    g = torch.Generator()
    g.manual_seed(_sample_state(seed, epoch, index) & (2**63 - 1))
    return g


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed a model draws one sample's own randomness from (UIT's dropped patches), from
    (seed, epoch, row) like the data's: a sample is masked the same way whatever the number of
    workers and wherever it sits in the batch. Distinct from the data generator's seed."""
    return _splitmix64(_sample_state(seed, epoch, index) ^ 0x5EED) & (2**63 - 1)


class _CaptionTokens:
    """Every caption's token ids (no BOS/EOS), tokenized once, as flat numpy arrays.

    Flat arrays rather than a list of lists, so forked workers share them without copying.
    """

    def __init__(self, tokenizer: Tokenizer, captions: pa.Array) -> None:
        bodies = [tokenizer.tokenize(c) for c in captions.to_pylist()]
        self.offsets = np.zeros(len(bodies) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in bodies], out=self.offsets[1:])
        self.flat = np.fromiter((t for b in bodies for t in b), dtype=np.int64, count=int(self.offsets[-1]))

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]


def _decode_error(data: SplitData, row: int, e: Exception) -> DatasetError:
    return DatasetError(
        f"{data.root}: split {data.split!r} row {row} ({data.image_path(row)}): field 'image': cannot decode: {e}"
    )


def _choice(items: Sequence[str], g: torch.Generator) -> str:
    return items[int(torch.randint(len(items), (), generator=g))]


# ------------------------------------------------------------------------------ datasets


class TrainDataset(Dataset):
    """(image, caption) rows of a split for training, with the views a method asks for.

    An item has the contract's keys (``images``, ``text_ids``, ``text_mask``, ``pids``,
    ``index``; ``mlm_ids``/``mlm_labels`` with view ``mlm``; ``phrase_*``/``word_*`` with
    view ``levels``) without the batch dimension, ``images`` as uint8 plus the erasing box;
    :func:`collate_train` stacks them and normalises the images.

    Args:
        split_data: from :func:`load_split`.
        tokenizer: caption tokenizer.
        image_size: (H, W), ``model.image_size``.
        text_length: L, ``model.text_length``.
        augment: ``data.augment``.
        views: subset of ``("mlm", "text_aug", "levels")`` (the method spec's views).
        mlm_mask_ratio: ``loss.mlm_mask_ratio``.
        text_aug_prob: ``data.text_aug_prob``; with view ``text_aug`` a caption is pruned to
            its nouns, adjectives and pronouns with this probability, before tokenization.
        seed: base seed of the per-sample generators.

    Call :meth:`set_epoch` before each epoch's iterator is made (workers not persistent).
    """

    def __init__(
        self,
        split_data: SplitData,
        tokenizer: Tokenizer,
        image_size: tuple[int, int],
        text_length: int,
        augment: bool = True,
        views: tuple[str, ...] = (),
        mlm_mask_ratio: float = 0.15,
        text_aug_prob: float = 0.0,
        seed: int = 0,
    ) -> None:
        unknown = [v for v in views if v not in KNOWN_VIEWS]
        if unknown:
            raise ValueError(f"unknown batch view {unknown[0]!r}; known views: {list(KNOWN_VIEWS)}")
        self.data = split_data
        self.tokenizer = tokenizer
        self.text_length = int(text_length)
        self.transform = ImageTransform(image_size, train=True, augment=augment)
        self.views = tuple(views)
        self.mlm_mask_ratio = float(mlm_mask_ratio)
        self.text_aug_prob = float(text_aug_prob)
        self.seed = int(seed)
        self.epoch = 0
        self._tokens = _CaptionTokens(tokenizer, split_data.captions)

    def set_epoch(self, epoch: int) -> None:
        """Epoch whose randomness the items use (the sampler has its own ``set_epoch``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.encode([text], self.text_length)
        return ids[0], mask[0]  # (L,), (L,)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        g = _sample_generator(self.seed, self.epoch, i)
        level_images = "level_images" in self.views
        try:
            raw: Any = self.data.image_bytes(int(self.data.image_rows[i]))
            if level_images:
                raw = decode_image_bytes(raw)  # decoded once for the three views
            image, erase = self.transform.geometric(raw, g)
        except RuntimeError as e:
            raise _decode_error(self.data, i, e) from e
        pruned = None
        if "text_aug" in self.views and self.text_aug_prob > 0:
            if float(torch.rand((), generator=g)) < self.text_aug_prob:
                pruned = prune_caption(self.data.caption(i))
        if pruned is None:
            ids, mask = self.tokenizer.wrap(self._tokens[i], self.text_length)
        else:
            ids, mask = self._encode(pruned)
        item: dict[str, Any] = {
            "images": image,  # uint8 (3, H, W); collate normalises
            ERASE_KEY: erase,
            "text_ids": ids,
            "text_mask": mask,
            "pids": int(self.data.pids[i]),  # ints: collate makes one tensor per batch
            "index": i,
            "sample_seed": sample_seed(self.seed, self.epoch, i),
        }
        if "mlm" in self.views:
            mlm_ids, mlm_labels = mask_tokens(ids[None], mask[None], self.tokenizer, self.mlm_mask_ratio, g)
            item["mlm_ids"], item["mlm_labels"] = mlm_ids[0], mlm_labels[0]
        if "levels" in self.views:
            caption = self.data.caption(i)
            chunks = phrase_chunks(caption) or [caption]
            phrase = _choice(chunks, g)
            words = word_phrases(caption) or [phrase]
            word = _choice(words, g)
            item["phrase_ids"], item["phrase_mask"] = self._encode(phrase)
            item["word_ids"], item["word_mask"] = self._encode(word)
        if level_images:  # drawn last, so the draws above are those of a run without this view
            for key in LEVEL_IMAGE_KEYS:
                item[key], item[_erase_key(key)] = self.transform.geometric(raw, g)
        return item


class GalleryDataset(Dataset):
    """The split's unique images for evaluation: items ``images``, ``pids``, ``image_ids``, ``index``.

    ``index`` is the image's position in the full gallery (also after :meth:`shard`);
    ``images`` are uint8 until :func:`collate_gallery` normalises them.
    """

    def __init__(
        self, split_data: SplitData, image_size: tuple[int, int], positions: range | None = None
    ) -> None:
        self.data = split_data
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.transform = ImageTransform(self.image_size, train=False)
        self.positions = range(split_data.num_images) if positions is None else positions

    def __len__(self) -> int:
        return len(self.positions)

    def shard(self, rank: int, world_size: int) -> GalleryDataset:
        """Contiguous, non-overlapping share of this gallery for ``rank`` (see :func:`shard_range`)."""
        r = shard_range(len(self.positions), rank, world_size)
        return GalleryDataset(self.data, self.image_size, self.positions[r.start : r.stop])

    def __getitem__(self, k: int) -> dict[str, Any]:
        u = self.positions[int(k)]
        try:
            image, _ = self.transform.geometric(self.data.image_bytes(u))  # uint8 (3, H, W)
        except RuntimeError as e:
            row = int(np.searchsorted(self.data.image_rows, u))
            raise _decode_error(self.data, row, e) from e
        return {
            "images": image,
            "pids": int(self.data.image_pids[u]),
            "image_ids": int(self.data.unique_image_ids[u]),
            "index": u,
        }


class QueryDataset(Dataset):
    """Every caption of the split for evaluation: items ``text_ids``, ``text_mask``, ``pids``,
    ``image_ids``, ``index`` (the row in the split, also after :meth:`shard`)."""

    def __init__(
        self, split_data: SplitData, tokenizer: Tokenizer, text_length: int, positions: range | None = None
    ) -> None:
        self.data = split_data
        self.tokenizer = tokenizer
        self.text_length = int(text_length)
        self.positions = range(len(split_data)) if positions is None else positions

    def __len__(self) -> int:
        return len(self.positions)

    def shard(self, rank: int, world_size: int) -> QueryDataset:
        """Contiguous, non-overlapping share of the queries for ``rank`` (see :func:`shard_range`)."""
        r = shard_range(len(self.positions), rank, world_size)
        return QueryDataset(self.data, self.tokenizer, self.text_length, self.positions[r.start : r.stop])

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.positions[int(k)]
        ids, mask = self.tokenizer.encode([self.data.caption(i)], self.text_length)
        return {
            "text_ids": ids[0],
            "text_mask": mask[0],
            "pids": int(self.data.pids[i]),
            "image_ids": int(self.data.image_ids[i]),
            "index": i,
        }


# ------------------------------------------------------------------------------ batching


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float batch; in shared memory inside a DataLoader worker (as default_collate
    does), so the batch reaches the main process without another copy."""
    if get_worker_info() is not None:
        numel = int(np.prod(shape))
        storage = torch.empty(0)._typed_storage()._new_shared(numel, device="cpu")
        return torch.empty(0).new(storage).view(shape)
    return torch.empty(shape, dtype=torch.float32)


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack item dicts key by key into one batch dict (ints become a long (B,) tensor).

    uint8 ``images`` (what the datasets return) are normalised here into one float
    (B, 3, H, W) batch, and the items' random-erasing boxes applied.
    """
    if not items:
        raise ValueError("cannot collate an empty list of items")
    rest = [{k: v for k, v in it.items() if k not in IMAGE_KEYS and not k.startswith(ERASE_KEY)} for it in items]
    batch = default_collate(rest) if rest[0] else {}
    for key in IMAGE_KEYS:
        if key not in items[0]:
            continue
        images = [it[key] for it in items]
        if images[0].dtype == torch.uint8:
            out = _batch_buffer((len(images), *images[0].shape))
            batch[key] = normalize_batch(images, [it.get(_erase_key(key)) for it in items], out)
        else:
            batch[key] = default_collate(images)
    return {k: batch[k] for k in items[0] if not k.startswith(ERASE_KEY)}  # keys in item order


collate_train = collate
collate_gallery = collate
collate_query = collate


def make_train_loader(
    dataset: TrainDataset, batch_sampler: object, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over ``dataset`` driven by a batch sampler from ``tpr_core.data.samplers``.

    Workers are not persistent, so :meth:`TrainDataset.set_epoch` and the sampler's
    ``set_epoch``/``set_start`` take effect at the next ``iter(loader)``.
    """
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=collate_train,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
