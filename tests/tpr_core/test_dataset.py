"""Reading the prepared Parquet shards: transforms, training items and batches, gallery and
queries, sharding, and errors that name the path."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tpr_core.data.dataset import (
    GalleryDataset,
    QueryDataset,
    TrainDataset,
    _sample_generator,
    collate,
    load_split,
    make_train_loader,
    shard_range,
    train_identity_count,
)
from tpr_core.data.samplers import build_batch_sampler
from tpr_core.data.store import MANIFEST_NAME, MANIFEST_VERSION, DatasetError
from tpr_core.data.tokenizer import Tokenizer
from tpr_core.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, PILTransform, decode_image_bytes
from tpr_core.data.views import phrase_chunks, prune_caption, word_phrases

# torchvision 0.29 marks its image codecs deprecated (in favour of TorchCodec); still the fast path.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)

SIZE = (32, 16)  # (H, W)
SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("pid", pa.int64()),
        ("orig_id", pa.int64()),
        ("image_id", pa.int64()),
        ("image_path", pa.string()),
        ("caption", pa.string()),
        ("caption_index", pa.int32()),
        ("image", pa.binary()),
    ]
)
CAPTIONS = [
    "A woman with long black hair is wearing a red shirt, blue jeans and white shoes.",
    "The man wears a grey jacket, black pants and a black backpack.",
]


def _colour(image_id: int) -> tuple[int, int, int]:
    return (20 + 25 * image_id, 100, 230 - 20 * image_id)


def _png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), colour).save(buf, "PNG")  # lossless: exact colours
    return buf.getvalue()


def _rows(split: str, n_ids: int, first_image: int) -> list[dict]:
    rows, image_id = [], first_image
    for pid in range(n_ids):
        for _ in range(2):  # images per identity
            size = SIZE if image_id % 2 == 0 else (48, 20)  # half need resizing
            data = _png(_colour(image_id), size)
            for j in range(2):  # captions per image
                rows.append(
                    dict(
                        split=split,
                        pid=pid,
                        orig_id=pid + 1,
                        image_id=image_id,
                        image_path=f"{pid + 1:04d}/{image_id}.png",
                        caption=f"{CAPTIONS[j]} #{image_id}",
                        caption_index=j,
                        image=data,
                    )
                )
            image_id += 1
    return rows


def _write_manifest(folder, shards: list[dict]) -> None:
    """A manifest of this version with the fields the readers check, listing ``shards``."""
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "source_format": "cuhk-pedes",
        "counts": {},
        "content_hash": "sha256:fixture",
        "shards": shards,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Prepared-layout fixture: train 3 ids x 2 images x 2 captions, test 2 ids, one shard each."""
    out = tmp_path_factory.mktemp("prepared")
    shards = []
    for k, (split, rows) in enumerate([("train", _rows("train", 3, 0)), ("test", _rows("test", 2, 6))]):
        # Reverse the rows on disk: the reader must restore (pid, image, caption) order itself.
        table = pa.Table.from_pylist(rows[::-1], schema=SCHEMA)
        name = f"part-{k:05d}.parquet"
        pq.write_table(table, out / name)
        shards.append({"file": name, "split": split, "rows": len(rows)})
    _write_manifest(out, shards)
    return out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CAPTIONS * 10, vocab_size=300, max_length=24)


def _normalised(colour: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD, strict=True)])


# ------------------------------------------------------------------------- transforms


def test_constant_colour_normalises_to_the_expected_values() -> None:
    colour = (200, 30, 90)
    for size in (SIZE, (50, 21)):  # as is, and through the bicubic resize
        x = ImageTransform(SIZE, train=False)(_png(colour, size))
        assert x.shape == (3, *SIZE) and x.dtype == torch.float32
        expected = _normalised(colour).view(3, 1, 1).expand(3, *SIZE)
        assert torch.allclose(x, expected, atol=1e-5)


def test_eval_transform_is_deterministic_and_matches_pil() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (SIZE[0], SIZE[1], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    t = ImageTransform(SIZE, train=False)
    a, b = t(buf.getvalue()), t(buf.getvalue())
    assert torch.equal(a, b)
    ref = (
        torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)
    ) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(a, ref, atol=1e-5)
    pil = PILTransform(SIZE, train=False)(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert torch.allclose(a, pil, atol=1e-5)


def test_train_augmentations_flip_shift_erase() -> None:
    # left half red, right half blue
    img = torch.zeros(3, *SIZE, dtype=torch.uint8)
    img[0, :, : SIZE[1] // 2] = 255
    img[2, :, SIZE[1] // 2 :] = 255
    t = ImageTransform(SIZE, train=True, augment=True)
    zero = _normalised((0, 0, 0))
    outcomes = {"flipped": 0, "shifted": 0, "erased": 0}
    for seed in range(60):
        x = t(img, torch.Generator().manual_seed(seed))
        again = t(img, torch.Generator().manual_seed(seed))
        assert torch.equal(x, again)  # same generator state, same sample
        assert x.shape == (3, *SIZE)
        # a pixel is the normalised red, blue, black (padding), or 0 (erased)
        red, blue = _normalised((255, 0, 0)), _normalised((0, 0, 255))
        px = x.permute(1, 2, 0).reshape(-1, 3)
        ok = [torch.isclose(px, v, atol=1e-4).all(1) for v in (red, blue, zero, torch.zeros(3))]
        assert torch.stack(ok).any(0).all()
        outcomes["erased"] += bool(ok[3].any())
        outcomes["shifted"] += bool(ok[2].any())
        mid = x[:, SIZE[0] // 2, :]  # a row through the middle
        reds = torch.isclose(mid.T, red, atol=1e-4).all(1).nonzero()
        blues = torch.isclose(mid.T, blue, atol=1e-4).all(1).nonzero()
        if len(reds) and len(blues):
            outcomes["flipped"] += bool(reds.float().mean() > blues.float().mean())
    assert all(10 < v < 55 for k, v in outcomes.items() if k != "shifted"), outcomes
    assert outcomes["shifted"] > 40  # 20 of 21 x 21 offsets move the image


def test_decode_error_is_raised_for_garbage() -> None:
    with pytest.raises(RuntimeError):
        decode_image_bytes(b"not an image")


# ------------------------------------------------------------------------- reading


def test_load_split_rows_and_unique_images(root) -> None:
    tr = load_split(root, "train")
    assert len(tr) == 12 and tr.num_images == 6 and train_identity_count(tr) == 3
    assert tr.pids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert tr.image_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert tr.caption(1) == f"{CAPTIONS[1]} #0"
    assert tr.unique_image_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert tr.image_pids.tolist() == [0, 0, 1, 1, 2, 2]
    for u in range(6):
        x = decode_image_bytes(tr.image_bytes(u))
        assert tuple(x[:, 0, 0].tolist()) == _colour(u)
    # the fs-URI code path (what s3:// or gs:// roots take) reads the same rows
    via_uri = load_split(f"file://{root}", "train")
    assert via_uri.captions.equals(tr.captions) and via_uri.images.equals(tr.images)
    te = load_split(str(root), "test")
    assert len(te) == 8 and te.unique_image_ids.tolist() == [6, 7, 8, 9] and te.pids.max() == 1


def test_train_items_and_batch_follow_the_contract(root, tok) -> None:
    data = load_split(root, "train")
    ds = TrainDataset(
        data, tok, SIZE, 24, augment=False, views=("mlm", "levels", "level_images"), mlm_mask_ratio=0.15, seed=0
    )
    batch = collate([ds[i] for i in (5, 0, 11)])
    expected_keys = {
        "images",
        "phrase_images",
        "word_images",
        "sample_seed",
        "text_ids",
        "text_mask",
        "pids",
        "index",
        "mlm_ids",
        "mlm_labels",
        "phrase_ids",
        "phrase_mask",
        "word_ids",
        "word_mask",
    }
    assert set(batch) == expected_keys
    assert batch["images"].shape == (3, 3, *SIZE) and batch["images"].dtype == torch.float32
    # without augmentation the level views are the image itself, normalised the same way
    assert torch.equal(batch["phrase_images"], batch["images"]) and torch.equal(batch["word_images"], batch["images"])
    for k in expected_keys - {"images", "phrase_images", "word_images"}:
        assert batch[k].dtype == torch.long, k
    assert batch["index"].tolist() == [5, 0, 11]
    assert batch["pids"].tolist() == [1, 0, 2]  # rows 5, 0, 11 belong to pids 1, 0, 2
    for b, row in enumerate((5, 0, 11)):
        colour = _colour(int(data.image_ids[row]))
        assert torch.allclose(batch["images"][b, :, 3, 3], _normalised(colour), atol=1e-5)
        ids, mask = tok.encode([data.caption(row)], 24)
        assert torch.equal(batch["text_ids"][b], ids[0]) and torch.equal(batch["text_mask"][b], mask[0])
        labels = batch["mlm_labels"][b]
        assert (labels != -100).sum() >= 1
        assert torch.equal(labels[labels != -100], ids[0][labels != -100])
        phrase = tok.decode(batch["phrase_ids"][b])
        assert phrase in [p.lower() for p in phrase_chunks(data.caption(row))]
        word = tok.decode(batch["word_ids"][b])
        assert word in word_phrases(data.caption(row))


def test_batched_normalisation_equals_the_per_sample_transform(root, tok) -> None:
    data = load_split(root, "train")
    ds = TrainDataset(data, tok, SIZE, 24, augment=True, seed=9)
    items = [ds[i] for i in range(12)]
    assert items[0]["images"].dtype == torch.uint8 and items[0]["images"].shape == (3, *SIZE)
    batch = collate(items)["images"]
    reference = torch.stack(
        [
            ds.transform(data.image_bytes(int(data.image_rows[i])), _sample_generator(9, 0, i))
            for i in range(12)
        ]
    )
    assert torch.equal(batch, reference)  # bit for bit
    assert any(it["_erase"] is not None for it in items)  # erasing is exercised


def test_train_items_reproducible_per_epoch(root, tok) -> None:
    data = load_split(root, "train")
    ds = TrainDataset(data, tok, SIZE, 24, augment=True, views=("mlm",), seed=3)
    a, b = ds[4], ds[4]
    assert a["pids"] == b["pids"] == 1 and a["index"] == b["index"] == 4
    assert all(torch.equal(a[k], b[k]) for k in ("images", "text_ids", "text_mask", "mlm_ids", "mlm_labels"))
    ds.set_epoch(1)
    c = [ds[i] for i in range(12)]
    ds.set_epoch(0)
    d = [ds[i] for i in range(12)]
    assert torch.equal(d[4]["images"], a["images"])
    assert any(not torch.equal(x["images"], y["images"]) for x, y in zip(c, d, strict=True))


def test_text_aug_prunes_captions(root, tok) -> None:
    data = load_split(root, "train")
    always = TrainDataset(data, tok, SIZE, 24, augment=False, views=("text_aug",), text_aug_prob=1.0)
    never = TrainDataset(data, tok, SIZE, 24, augment=False, views=("text_aug",), text_aug_prob=0.0)
    cap = data.caption(2)
    assert torch.equal(always[2]["text_ids"], tok.encode([prune_caption(cap)], 24)[0][0])
    assert torch.equal(never[2]["text_ids"], tok.encode([cap], 24)[0][0])
    with pytest.raises(ValueError, match="known views"):
        TrainDataset(data, tok, SIZE, 24, views=("restore",))


def test_loader_with_workers_and_identity_sampler(root, tok) -> None:
    data = load_split(root, "train")
    ds = TrainDataset(data, tok, SIZE, 24, augment=True, views=("mlm",), seed=0)
    sampler = build_batch_sampler("identity", data.pids, 4, k=2, rank=0, world_size=1, seed=0)
    batches = list(make_train_loader(ds, sampler, num_workers=2))
    # 3 identities x 2 groups of 2, P = 2 per batch: 2 or 3 batches depending on the draw
    assert len(batches) == len(sampler) in (2, 3)
    for b in batches:
        assert b["images"].shape == (4, 3, *SIZE)
        assert torch.equal(b["pids"], torch.from_numpy(data.pids[b["index"].numpy()]))
        assert sorted(torch.bincount(b["pids"]).tolist())[-2:] == [2, 2]
    # the worker that made a sample does not matter
    single = list(make_train_loader(ds, sampler, num_workers=0))
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(batches, single, strict=True))


def test_gallery_and_query(root, tok) -> None:
    data = load_split(root, "test")
    gallery = GalleryDataset(data, SIZE)
    g = next(iter(DataLoader(gallery, batch_size=10, collate_fn=collate)))
    assert set(g) == {"images", "pids", "image_ids", "index"}
    assert g["image_ids"].tolist() == [6, 7, 8, 9] and g["pids"].tolist() == [0, 0, 1, 1]
    assert torch.allclose(g["images"][2, :, 0, 0], _normalised(_colour(8)), atol=1e-5)
    queries = QueryDataset(data, tok, 24)
    q = next(iter(DataLoader(queries, batch_size=10, collate_fn=collate)))
    assert set(q) == {"text_ids", "text_mask", "pids", "image_ids", "index"}
    assert len(queries) == 8 and q["index"].tolist() == list(range(8))
    assert q["pids"].tolist() == data.pids.tolist()
    assert torch.equal(q["text_ids"][3], tok.encode([data.caption(3)], 24)[0][0])


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_cover_everything_once(root, tok, world: int) -> None:
    data = load_split(root, "train")
    for full in (GalleryDataset(data, SIZE), QueryDataset(data, tok, 24)):
        parts = [full.shard(r, world) for r in range(world)]
        seen = [int(p[k]["index"]) for p in parts for k in range(len(p))]
        assert seen == [int(full[k]["index"]) for k in range(len(full))]  # contiguous, in order
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    assert [list(shard_range(7, r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="rank"):
        shard_range(7, 3, 3)


# ------------------------------------------------------------------------- errors


def test_errors_name_the_path(tmp_path, root) -> None:
    with pytest.raises(DatasetError, match="not found: .*nowhere"):
        load_split(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty.*_manifest.json"):
        load_split(tmp_path / "empty", "train")
    with pytest.raises(DatasetError, match="split 'val' has no shards"):
        load_split(root, "val")


def test_missing_column_and_bad_image(tmp_path, tok) -> None:
    rows = _rows("train", 1, 0)
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA).drop_columns(["caption"]), bad / "p.parquet")
    _write_manifest(bad, [{"file": "p.parquet", "split": "train"}])
    with pytest.raises(DatasetError, match=r"p.parquet: missing field 'caption'"):
        load_split(bad, "train")
    broken = tmp_path / "broken"
    broken.mkdir()
    rows[2]["image"] = rows[3]["image"] = b"\x89PNG truncated"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), broken / "p.parquet")
    _write_manifest(broken, [{"file": "p.parquet", "split": "train"}])
    data = load_split(broken, "train")
    ds = TrainDataset(data, tok, SIZE, 24, augment=False)
    with pytest.raises(DatasetError, match=r"split 'train' row 2 \(0001/1.png\): field 'image'"):
        ds[2]


def test_level_views_and_sample_seeds_come_from_the_sample(root, tok) -> None:
    """The level image views are independent augmentation draws; the other items are those of a
    dataset without the view; sample seeds depend on (seed, epoch, row) only."""
    data = load_split(root, "train")
    plain = TrainDataset(data, tok, SIZE, 24, augment=True, views=("levels",), seed=3)
    views = TrainDataset(data, tok, SIZE, 24, augment=True, views=("levels", "level_images"), seed=3)
    rows = list(range(12))
    a, b = collate([plain[i] for i in rows]), collate([views[i] for i in rows])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    differs = [not torch.equal(b["images"][i], b["phrase_images"][i]) for i in range(len(rows))]
    assert any(differs)  # flips, shifts and erasing drawn again for the phrase view
    seeds = b["sample_seed"].tolist()
    assert len(set(seeds)) == len(seeds) and all(s >= 0 for s in seeds)
    assert collate([views[i] for i in (3, 1)])["sample_seed"].tolist() == [seeds[3], seeds[1]]
    views.set_epoch(1)
    assert views[3]["sample_seed"] != seeds[3]
