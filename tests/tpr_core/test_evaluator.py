"""The evaluator on a tiny fake model: encoding, metrics, i2t, de-duplication, mode restore."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tpr_core.eval import (
    REPORTED_METRICS,
    encode_images,
    encode_texts,
    evaluate,
    evaluate_features,
    rank_gallery,
    retrieval_metrics,
)

PID_COLOURS = torch.rand(6, 3, generator=torch.Generator().manual_seed(123))


class TinyModel(nn.Module):
    """Image: mean colour through a fixed linear map. Text: mean of token embeddings over the mask.

    Tokens 2p and 2p+1 embed to the mapped colour of pid p, so captions and images of one
    person roughly align; other tokens are noise. Dropout in both encoders makes
    train-mode outputs random, so a forgotten ``eval()`` shows.
    """

    def __init__(self, vocab: int = 40, dim: int = 6) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.image_proj = nn.Linear(3, dim, bias=False)
        self.embed = nn.EmbeddingBag(vocab, dim, mode="sum")
        with torch.no_grad():
            self.image_proj.weight.copy_(torch.randn(dim, 3, generator=gen))
            table = 0.6 * torch.randn(vocab, dim, generator=gen)
            anchors = self.image_proj(PID_COLOURS)  # (P, D)
            table[: 2 * len(anchors)] = anchors.repeat_interleave(2, dim=0) * 3
            self.embed.weight.copy_(table)
        self.drop = nn.Dropout(0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.drop(self.image_proj(images.mean(dim=(2, 3))))  # (B, D)

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        summed = self.embed(text_ids, per_sample_weights=text_mask.float())  # (B, D)
        return self.drop(summed / text_mask.sum(dim=1, keepdim=True))


def make_split(seed: int = 0, num_pids: int = 6):
    """Images of one pid share a base colour; captions of one pid share two of their tokens."""
    gen = torch.Generator().manual_seed(seed)
    per_pid = [1, 3, 2, 1, 4, 2][:num_pids]
    image_pids = torch.repeat_interleave(torch.arange(num_pids), torch.tensor(per_pid))
    images = PID_COLOURS[image_pids][:, :, None, None] + 0.6 * torch.rand(
        len(image_pids), 3, 4, 2, generator=gen
    )
    text_pids = image_pids.repeat_interleave(2)  # two captions per image
    length = 6
    text_ids = torch.randint(2 * num_pids, 40, (len(text_pids), length), generator=gen)
    text_ids[:, 0] = 2 * text_pids
    text_ids[:, 1] = 2 * text_pids + 1
    text_mask = torch.ones_like(text_ids)
    text_mask[::3, 4:] = 0  # some padding
    return images, image_pids, text_ids, text_mask, text_pids


def batches_of(size: int, **fields):
    n = len(next(iter(fields.values())))
    return [{k: v[i : i + size] for k, v in fields.items()} for i in range(0, n, size)]


def reference_features(model: TinyModel, images, text_ids, text_mask):
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text_ids, text_mask)


def test_evaluate_matches_direct_features_and_modes_are_restored():
    images, ipids, tids, tmask, tpids = make_split()
    model = TinyModel().train()
    img_feats, txt_feats = reference_features(model, images, tids, tmask)
    model.train()
    result = evaluate(
        model,
        batches_of(4, images=images, pids=ipids),
        batches_of(5, text_ids=tids, text_mask=tmask, pids=tpids),
        device="cpu",
        return_topk=5,
    )
    assert model.training  # restored
    sim = F.normalize(txt_feats, dim=1) @ F.normalize(img_feats, dim=1).T
    want = retrieval_metrics(sim, tpids, ipids)
    for key in REPORTED_METRICS:
        assert result.metrics[key] == pytest.approx(want[key], abs=1e-9)
    assert result.metrics["num_queries"] == len(tpids) and result.metrics["num_gallery"] == len(ipids)
    # The top-5 lists are the 5 highest-scoring images per caption.
    assert torch.equal(result.t2i.topk_indices, torch.argsort(-sim, dim=1, stable=True)[:, :5])
    assert result.i2t is None and "i2t_R1" not in result.metrics
    # Not a trivial problem: the fake model retrieves above chance but not perfectly.
    assert 100 / len(ipids) < result.metrics["R1"] < 100

    model.eval()
    evaluate(
        model,
        batches_of(4, images=images, pids=ipids),
        batches_of(5, text_ids=tids, text_mask=tmask, pids=tpids),
    )
    assert not model.training


def test_encoders_run_without_grad_and_keep_batch_order():
    images, ipids, tids, tmask, tpids = make_split()
    model = TinyModel()
    enc = encode_images(
        model, iter(batches_of(3, images=images, pids=ipids, image_ids=torch.arange(len(ipids))))
    )
    assert not enc.feats.requires_grad
    assert torch.equal(enc.pids, ipids) and torch.equal(enc.ids, torch.arange(len(ipids)))
    img_feats, txt_feats = reference_features(model, images, tids, tmask)
    assert torch.allclose(enc.feats, img_feats, atol=1e-6)
    texts = encode_texts(model, batches_of(7, text_ids=tids, text_mask=tmask, pids=tpids))
    assert texts.ids is None and torch.allclose(texts.feats, txt_feats, atol=1e-6)


def test_i2t_direction_against_brute_force():
    images, ipids, tids, tmask, tpids = make_split(seed=1)
    model = TinyModel()
    img_feats, txt_feats = reference_features(model, images, tids, tmask)
    result = evaluate_features(img_feats, ipids, txt_feats, tpids, i2t=True, ks=(1, 5), device="cpu")
    sim_i2t = F.normalize(img_feats, dim=1) @ F.normalize(txt_feats, dim=1).T  # (G, Q): images query captions
    rows = sim_i2t.tolist()
    first, aps, inps = [], [], []
    for i, row in enumerate(rows):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        ranks = [p + 1 for p, j in enumerate(order) if int(tpids[j]) == int(ipids[i])]
        first.append(ranks[0])
        aps.append(sum(n / r for n, r in enumerate(ranks, start=1)) / len(ranks))
        inps.append(len(ranks) / ranks[-1])
    n = len(rows)
    assert result.metrics["i2t_R1"] == pytest.approx(100 * sum(r <= 1 for r in first) / n)
    assert result.metrics["i2t_R5"] == pytest.approx(100 * sum(r <= 5 for r in first) / n)
    assert result.metrics["i2t_mAP"] == pytest.approx(100 * sum(aps) / n)
    assert result.metrics["i2t_mINP"] == pytest.approx(100 * sum(inps) / n)
    assert result.metrics["i2t_num_queries"] == len(ipids)
    assert result.metrics["i2t_num_gallery"] == len(tpids)


def test_repeated_rows_are_dropped():
    images, ipids, tids, tmask, tpids = make_split(seed=2)
    model = TinyModel()
    clean = evaluate(
        model,
        batches_of(4, images=images, pids=ipids, image_ids=torch.arange(len(ipids))),
        batches_of(4, text_ids=tids, text_mask=tmask, pids=tpids, index=torch.arange(len(tpids))),
        device="cpu",
    )
    # A padded sampler repeats the first rows at the end; a caption table repeats images.
    rep_i = torch.cat([torch.arange(len(ipids)), torch.tensor([0, 1, 1])])
    rep_t = torch.cat([torch.arange(len(tpids)), torch.tensor([0, 2])])
    padded = evaluate(
        model,
        batches_of(4, images=images[rep_i], pids=ipids[rep_i], image_ids=rep_i),
        batches_of(4, text_ids=tids[rep_t], text_mask=tmask[rep_t], pids=tpids[rep_t], index=rep_t),
        device="cpu",
    )
    assert padded.metrics == clean.metrics
    assert torch.equal(padded.image_ids, torch.arange(len(ipids)))
    # Without ids every repeated row counts.
    no_ids = evaluate(
        model,
        batches_of(4, images=images[rep_i], pids=ipids[rep_i]),
        batches_of(4, text_ids=tids[rep_t], text_mask=tmask[rep_t], pids=tpids[rep_t]),
        device="cpu",
    )
    assert no_ids.metrics["num_gallery"] == len(rep_i)


def test_string_image_ids_and_conflicting_pids():
    feats = torch.eye(3)
    result = evaluate_features(feats, [0, 1, 0], feats, [0, 1, 0], image_ids=["a", "b", "a"], device="cpu")
    assert result.image_ids == ["a", "b"] and result.metrics["num_gallery"] == 2
    with pytest.raises(ValueError, match="image id 'a' appears with pid 0 .* and pid 2"):
        evaluate_features(feats, [0, 1, 2], feats, [0, 1, 2], image_ids=["a", "b", "a"], device="cpu")


def test_topk_lists_match_rank_gallery():
    images, ipids, tids, tmask, tpids = make_split(seed=3)
    model = TinyModel()
    img_feats, txt_feats = reference_features(model, images, tids, tmask)
    result = evaluate_features(img_feats, ipids, txt_feats, tpids, return_topk=4, chunk_size=3, device="cpu")
    sim = F.normalize(txt_feats, dim=1) @ F.normalize(img_feats, dim=1).T
    want = rank_gallery(sim, tpids, ipids, return_topk=4)
    assert torch.equal(result.t2i.topk_match, want.topk_match)
    assert torch.equal(result.t2i.match_ranks, want.match_ranks)


def test_bad_batches_name_the_batch():
    model = TinyModel()
    with pytest.raises(KeyError, match="images batch 0 has no 'pids'"):
        encode_images(model, [{"images": torch.zeros(2, 3, 4, 2)}])
    with pytest.raises(ValueError, match="no texts batches"):
        encode_texts(model, [])
    with pytest.raises(ValueError, match="batch 1 has no 'image_ids'"):
        encode_images(
            model,
            [
                {
                    "images": torch.zeros(1, 3, 4, 2),
                    "pids": torch.tensor([0]),
                    "image_ids": torch.tensor([0]),
                },
                {"images": torch.zeros(1, 3, 4, 2), "pids": torch.tensor([1])},
            ],
        )


# --------------------------------------------------------------------------- the split path


class ItemsDataset(torch.utils.data.Dataset):
    """Item dicts from equal-length fields (what GalleryDataset / QueryDataset hand out)."""

    def __init__(self, **fields) -> None:
        self.fields = fields

    def __len__(self) -> int:
        return len(next(iter(self.fields.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] if torch.is_tensor(v[i]) and v[i].dim() else int(v[i]) for k, v in self.fields.items()}


def split_datasets(seed: int = 0):
    images, ipids, tids, tmask, tpids = make_split(seed=seed)
    gallery = ItemsDataset(images=images, pids=ipids, image_ids=100 + torch.arange(len(ipids)))
    queries = ItemsDataset(text_ids=tids, text_mask=tmask, pids=tpids, index=torch.arange(len(tpids)))
    return (images, ipids, tids, tmask, tpids), gallery, queries


def test_one_process_encode_and_rank_equals_evaluate():
    from tpr_core.eval import encode_dataset, module_encoder, rank_encoded

    (images, ipids, tids, tmask, tpids), gallery, queries = split_datasets(seed=2)
    model = TinyModel().train()
    old = evaluate(
        model,
        batches_of(4, images=images, pids=ipids, image_ids=100 + torch.arange(len(ipids))),
        batches_of(4, text_ids=tids, text_mask=tmask, pids=tpids, index=torch.arange(len(tpids))),
        return_topk=5,
    )
    encoder = module_encoder(model)
    imgs = encode_dataset(encoder, gallery, "image", batch_size=4)
    txts = encode_dataset(encoder, queries, "text", batch_size=4)
    new = rank_encoded(imgs, txts, return_topk=5, device="cpu")
    assert model.training  # restored
    assert new.metrics == old.metrics
    assert torch.equal(new.t2i.topk_indices, old.t2i.topk_indices)
    assert torch.equal(new.t2i.match_ranks, old.t2i.match_ranks)
    assert torch.equal(new.image_ids, old.image_ids) and torch.equal(new.text_ids, old.text_ids)
    assert torch.equal(imgs.feats, encode_images(model, batches_of(4, images=images, pids=ipids)).feats)


def test_shard_positions_cover_every_row_with_equal_shares():
    from tpr_core.eval import shard_positions

    for n, world in [(13, 2), (12, 3), (5, 4), (1, 2)]:
        shares = [shard_positions(n, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # the same number of forwards on every rank
        assert sorted(set().union(*shares)) == list(range(n))
    assert shard_positions(5, 1, 2) == [1, 3, 4]  # every second row, the last one as padding


def test_sharded_encode_with_a_fake_two_rank_gather_reassembles_the_one_process_features():
    """Two threads play two ranks; the gather hands each rank both ranks' shares, as an
    all-gather does. Batches of 1, so every row is computed exactly as in one process."""
    import copy
    import threading

    from tpr_core.eval import encode_dataset, module_encoder

    _, gallery, queries = split_datasets(seed=4)  # 13 images: rank 1 pads its last row
    model = TinyModel()
    world = 2
    slots: list = [None] * world
    barrier = threading.Barrier(world)

    def gather_of(rank: int):
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            parts = list(slots)
            barrier.wait()  # nobody overwrites a slot before everyone has read it
            return parts

        return gather

    for dataset, side in ((gallery, "image"), (queries, "text")):
        whole = encode_dataset(module_encoder(model), dataset, side, batch_size=1)
        out: list = [None] * world

        def run(rank: int, dataset=dataset, side=side, out=out) -> None:
            encoder = module_encoder(copy.deepcopy(model))  # each rank its own module, as in a worker
            out[rank] = encode_dataset(encoder, dataset, side, 1, rank=rank, world=world, gather=gather_of(rank))

        threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for got in out:
            assert torch.equal(got.feats, whole.feats)
            assert torch.equal(got.pids, whole.pids) and torch.equal(got.ids, whole.ids)
        assert len(whole.pids) == len(dataset)
