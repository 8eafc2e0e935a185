"""Method modules over the registry x the tiny preset; encoders, heads and presets."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tpr_core.config import ConfigError, ExperimentConfig, ModelConfig
from tpr_core.experiment import check_experiment, config_from_dict
from tpr_core.models import (
    MethodSpec,
    build_method,
    known_methods,
    method_spec,
    methods,
    register_method,
    registry,
)
from tpr_core.models.dual_encoder import build_dual_encoder, interpolate_pos_embed, pool_eos
from tpr_core.models.heads import (
    IRRHead,
    attention_heads,
    patchify,
    random_keep,
    sincos_2d,
    to_greyscale,
)
from tpr_core.models.presets import dual_preset, shared_preset
from tpr_core.models.shared_encoder import build_shared_encoder, drop_patches, drop_text_tokens

H, W, P, L = 96, 32, 8, 16  # tiny inputs: a 12x4 patch grid, 16 text positions
PAD, BOS, EOS, MASK, VOCAB = 0, 1, 2, 59, 60


@dataclass(frozen=True)
class Tok:
    """Stand-in for the project tokenizer (only the attributes the models read)."""

    vocab_size: int = VOCAB
    pad_id: int = PAD
    bos_id: int = BOS
    eos_id: int = EOS
    mask_id: int = MASK


@pytest.fixture(autouse=True)
def _seeded(one_thread):
    torch.manual_seed(0)


def _cfg(method: str, **model) -> ExperimentConfig:
    return check_experiment(
        ExperimentConfig(
            method=method,
            model={"preset": "tiny", "image_size": (H, W), "patch_size": P, "text_length": L, **model},
        )
    )


def _captions(words: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS words EOS then padding, and the mask (the batch contract)."""
    ids = torch.full((len(words), L), PAD, dtype=torch.long)
    mask = torch.zeros(len(words), L, dtype=torch.long)
    for i, w in enumerate(words):
        seq = [BOS, *w, EOS]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


def _mlm_view(
    ids: torch.Tensor, mask: torch.Tensor, positions: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask one word per caption (position positions[i]); labels -100 elsewhere."""
    mlm_ids, labels = ids.clone(), torch.full_like(ids, -100)
    for i, p in enumerate(positions):
        labels[i, p] = ids[i, p]
        mlm_ids[i, p] = MASK
    return mlm_ids, labels


def _batch(b: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    words = [
        torch.randint(3, MASK, (int(n),), generator=g).tolist()
        for n in torch.randint(3, L - 2, (b,), generator=g)
    ]
    ids, mask = _captions(words)
    mlm_ids, labels = _mlm_view(ids, mask, [1 + i % len(w) for i, w in enumerate(words)])
    phrase_ids, phrase_mask = _captions([w[: max(1, len(w) // 2)] for w in words])
    word_ids, word_mask = _captions([w[:2] for w in words])
    return {
        "images": torch.randn(b, 3, H, W, generator=g),
        "phrase_images": torch.randn(b, 3, H, W, generator=g),
        "word_images": torch.randn(b, 3, H, W, generator=g),
        "text_ids": ids,
        "text_mask": mask,
        "pids": torch.arange(b) // 2,  # two pairs per identity
        "index": torch.arange(b),
        "mlm_ids": mlm_ids,
        "mlm_labels": labels,
        "phrase_ids": phrase_ids,
        "phrase_mask": phrase_mask,
        "word_ids": word_ids,
        "word_mask": word_mask,
    }


def _total(model, cfg: ExperimentConfig, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    terms = model.loss_terms(model(batch), batch)
    return sum(cfg.loss.weights[k] * v for k, v in terms.items()), terms


# --------------------------------------------------------------------------- registry x tiny


@pytest.mark.parametrize("method", known_methods())
def test_forward_backward(method: str) -> None:
    cfg = _cfg(method)
    model = build_method(cfg, num_classes=4, vocab=Tok())
    batch = _batch()
    out = model(batch)
    assert isinstance(out, dict)
    e = model.encoder.embed_dim
    assert out["image_feats"].shape == (8, e) and out["text_feats"].shape == (8, e)
    terms = model.loss_terms(out, batch)
    assert set(terms) == set(method_spec(method).terms)
    for name, v in terms.items():
        assert v.dim() == 0 and torch.isfinite(v), (name, v)
    total = sum(cfg.loss.weights[k] * v for k, v in terms.items())
    total.backward()
    # Timing is reported, not asserted (speed targets live in bench/): a second step, warm.
    t0 = time.perf_counter()
    _total(model, cfg, batch)[0].backward()
    print(f"{method}: tiny forward+backward, batch 8 at {H}x{W}: {(time.perf_counter() - t0) * 1000:.0f} ms")
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, gr in grads.items():
        assert gr is None or torch.isfinite(gr).all(), n
    enc = [n for n, gr in grads.items() if n.startswith("encoder.") and gr is not None and gr.abs().sum() > 0]
    # Both modalities' inputs get gradient from the loss.
    image_in = (
        "encoder.vision_model.embeddings.patch_embedding.weight"
        if method != "ivt"
        else "encoder.patch_embed.proj.weight"
    )
    text_in = (
        "encoder.text_model.embeddings.token_embedding.weight"
        if method != "ivt"
        else "encoder.token_embed.weight"
    )
    assert image_in in enc and text_in in enc
    # Every head parameter is used (no dead parameters for DDP / ZeRO).
    dead = [n for n, gr in grads.items() if gr is None]
    assert not dead, dead


@pytest.mark.parametrize("method", known_methods())
def test_encode_text_pools_at_eos(method: str) -> None:
    model = build_method(_cfg(method), num_classes=4, vocab=Tok()).eval()
    # The mask id (59) is the largest id in the caption: CLIP's argmax-of-ids pooling
    # would pick it; ours must pick the EOS at position mask.sum - 1.
    ids, mask = _captions([[5, 6, 7, MASK, 8], [9, 10, 11]])
    with torch.no_grad():
        base = model.encode_text(ids, mask)
        padded = ids.clone()
        padded[0, 8:] = 33  # padding ids do not matter
        padded[1, 6:] = 44
        assert torch.equal(model.encode_text(padded, mask), base)
        changed = ids.clone()
        changed[0, 2] = 20  # a real word matters
        moved = model.encode_text(changed, mask)
        assert not torch.allclose(moved[0], base[0], atol=1e-6)
        torch.testing.assert_close(moved[1], base[1], rtol=0, atol=1e-6)
        if method != "ivt":
            tokens = model.encoder.text_tokens(ids)  # (B, L, E)
            torch.testing.assert_close(base[0], tokens[0, 6], rtol=0, atol=1e-5)  # BOS + 5 words -> EOS at 6
            torch.testing.assert_close(base[1], tokens[1, 4], rtol=0, atol=1e-5)
            assert not torch.allclose(base[0], tokens[0, 4])  # the argmax position (MASK)


@pytest.mark.parametrize("method", known_methods())
def test_eval_is_deterministic(method: str) -> None:
    model = build_method(_cfg(method), num_classes=4, vocab=Tok()).eval()
    batch = _batch()
    with torch.no_grad():
        a, b = model(batch), model(batch)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        ta, tb = model.loss_terms(a, batch), model.loss_terms(b, batch)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
        torch.testing.assert_close(a["image_feats"], model.encode_image(batch["images"]), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            a["text_feats"], model.encode_text(batch["text_ids"], batch["text_mask"]), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("method", ["uit", "ivt"])
def test_training_mode_drops_tokens(method: str) -> None:
    model = build_method(_cfg(method), num_classes=4, vocab=Tok()).train()
    batch = _batch()
    with torch.no_grad():
        a, b = model(batch), model(batch)
    if method == "uit":
        # A fresh random keep set each call; SEN keeps int((1 + 48) x 0.3) - 1 = 13 of the 48 patches.
        assert not torch.equal(a["restore_mask"], b["restore_mask"])
        assert (a["restore_mask"].sum(1) == 48 - 13).all()
    else:
        # Train-mode image features differ from the full-input eval features (patches dropped).
        model.eval()
        full = model.encode_image(batch["images"])
        assert not torch.allclose(a["image_feats"], full) or not torch.allclose(b["image_feats"], full)


def test_unknown_batch_key_names_view() -> None:
    model = build_method(_cfg("irra"), num_classes=4, vocab=Tok())
    batch = _batch()
    del batch["mlm_ids"]
    with pytest.raises(KeyError, match=r"irra.*'mlm_ids'.*view 'mlm'"):
        model(batch)


# --------------------------------------------------------------------------- the method table


def test_each_method_file_declares_its_recipe_on_its_class() -> None:
    classes = {"irra": methods.IRRA, "fmfa": methods.FMFA, "uit": methods.UIT, "ivt": methods.IVT}
    assert known_methods() == sorted(classes)
    for name, cls in classes.items():
        assert cls.spec is method_spec(name) and cls.spec.name == name
        assert cls.__module__ == f"tpr_core.models.methods.{name}"
        assert type(build_method(_cfg(name), num_classes=4, vocab=Tok())) is cls
    assert {n: c.spec.encoder for n, c in classes.items()} == {
        "irra": "dual", "fmfa": "dual", "uit": "dual", "ivt": "shared"
    }


def test_register_method_adds_a_name_and_refuses_a_duplicate(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # the table as it was, after

    @register_method(MethodSpec("irra_no_mlm", encoder="dual", terms={"sdm": 1.0, "id": 1.0}, views=("mlm",)))
    class IRRANoMLM(methods.IRRA):
        def loss_terms(self, outputs, batch, scope=None):
            terms = super().loss_terms(outputs, batch)
            return {k: terms[k] for k in self.spec.terms}

    assert "irra_no_mlm" in known_methods() and IRRANoMLM.spec.name == "irra_no_mlm"
    cfg = config_from_dict({"method": "irra_no_mlm", "loss": {"weights": {"id": 0.5}}, **_small()})
    assert cfg.loss.weights == {"sdm": 1.0, "id": 0.5}
    model = build_method(cfg, num_classes=4, vocab=Tok())
    assert type(model) is IRRANoMLM
    batch = _batch()
    assert set(model.loss_terms(model(batch), batch)) == {"sdm", "id"}
    with pytest.raises(ConfigError, match="loss.weights.mlm is not a loss term of method 'irra_no_mlm'"):
        config_from_dict({"method": "irra_no_mlm", "loss": {"weights": {"mlm": 1.0}}, **_small()})
    with pytest.raises(ValueError, match=r"method 'irra' is already registered \(by IRRA\)"):
        register_method(MethodSpec("irra", encoder="dual", terms={"sdm": 1.0}))(IRRANoMLM)
    with pytest.raises(ValueError, match="unknown encoder 'triple'"):
        register_method(MethodSpec("x", encoder="triple", terms={"sdm": 1.0}))(IRRANoMLM)  # type: ignore[arg-type]
    assert "x" not in known_methods()


def test_encoder_only_model_fields_follow_the_recipe() -> None:
    # The fields a shared-encoder recipe reads are refused for a dual-encoder one, by its kind.
    for name in known_methods():
        tree = {"method": name, "model": {**_small()["model"], "drop_path": 0.1}}
        if method_spec(name).encoder == "shared":
            assert config_from_dict(tree).model.drop_path == 0.1
        else:
            with pytest.raises(ConfigError, match=r"model.drop_path applies to method 'ivt' \(the shared encoder\) only"):
                config_from_dict(tree)


def _small() -> dict:
    return {"model": {"preset": "tiny", "image_size": [H, W], "patch_size": P, "text_length": L}}


# --------------------------------------------------------------------------- overfit


def _overfit_data(n_ids: int = 5, per_id: int = 4, h: int = 32, w: int = 16) -> dict[str, torch.Tensor]:
    """Images with an identity colour pattern + noise; captions an identity word sequence."""
    g = torch.Generator().manual_seed(1)
    colours = torch.rand(n_ids, 2, 3, generator=g) * 4 - 2  # top and bottom half colour per id
    pids = torch.arange(n_ids).repeat_interleave(per_id)
    images = torch.empty(len(pids), 3, h, w)
    images[:, :, : h // 2] = colours[pids, 0][:, :, None, None]
    images[:, :, h // 2 :] = colours[pids, 1][:, :, None, None]
    images += 0.3 * torch.randn(images.shape, generator=g)
    id_words = torch.randint(3, MASK, (n_ids, 6), generator=g)
    words = []
    for i, p in enumerate(pids.tolist()):
        w = id_words[p].tolist()
        w[i % 6] = int(torch.randint(3, MASK, (1,), generator=g))  # one word varies per caption
        words.append(w)
    ids, mask = _captions(words)
    mlm_ids, labels = _mlm_view(ids, mask, [1 + (i + 3) % 6 for i in range(len(pids))])
    return {
        "images": images,
        "phrase_images": images.flip(-1),
        "word_images": images,
        "text_ids": ids,
        "text_mask": mask,
        "pids": pids,
        "mlm_ids": mlm_ids,
        "mlm_labels": labels,
        "phrase_ids": _captions([w[:3] for w in words])[0],
        "phrase_mask": _captions([w[:3] for w in words])[1],
        "word_ids": _captions([w[3:5] for w in words])[0],
        "word_mask": _captions([w[3:5] for w in words])[1],
    }


@pytest.mark.parametrize("method", known_methods())
def test_overfit_lowers_total_loss(method: str) -> None:
    torch.manual_seed(0)
    # Small images (a 4x2 grid) keep 30 steps on 20 pairs to a few seconds on one core.
    cfg = _cfg(method, image_size=(32, 16), cross_depth=2, restore_depth=2)
    data = _overfit_data()
    model = build_method(cfg, num_classes=5, vocab=Tok())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            total = _total(model, cfg, data)[0].item()
        model.train()
        return total

    t0 = time.perf_counter()
    initial = evaluate()
    for _ in range(30):
        opt.zero_grad()
        loss, _ = _total(model, cfg, data)
        loss.backward()
        opt.step()
    final = evaluate()
    dt = time.perf_counter() - t0
    print(f"{method}: weighted total {initial:.3f} -> {final:.3f} in 30 steps ({dt:.1f} s)")
    assert final < 0.7 * initial


# --------------------------------------------------------------------------- encoder pieces


def test_interpolate_pos_embed_keeps_class_and_layout() -> None:
    torch.manual_seed(0)
    d = 8
    cls = torch.randn(1, d)
    # Patch value = row index on every channel: constant along W, increasing along H.
    rows = torch.arange(4.0).repeat_interleave(4)[:, None].expand(16, d)
    pos = torch.cat([cls, rows])
    out = interpolate_pos_embed(pos, (4, 4), (6, 2))
    assert out.shape == (1 + 12, d)
    assert torch.equal(out[0], cls[0])
    grid = out[1:, 0].reshape(6, 2)
    torch.testing.assert_close(grid[:, 0], grid[:, 1])  # still constant along W
    assert (grid[1:, 0] >= grid[:-1, 0] - 1e-6).all() and grid[-1, 0] > grid[0, 0] + 2  # H kept as H
    # Constant tables stay constant (the bicubic weights sum to 1).
    const = torch.cat([cls, torch.full((16, d), 0.5)])
    torch.testing.assert_close(interpolate_pos_embed(const, (4, 4), (24, 8))[1:], torch.full((192, d), 0.5))
    # Same grid: an exact copy.
    assert torch.equal(interpolate_pos_embed(pos, (4, 4), (4, 4)), pos)
    with pytest.raises(ValueError, match="expected 1 \\+ 3x3"):
        interpolate_pos_embed(pos, (3, 3), (6, 2))


def test_pool_eos_by_mask() -> None:
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(pool_eos(tokens, mask), torch.stack([tokens[0, 2], tokens[1, 4]]))


def test_vision_grid_mismatch_is_an_error() -> None:
    enc = build_dual_encoder(_cfg("irra").model, VOCAB)
    assert enc.grid == (12, 4) and enc.vision_model.embeddings.position_embedding.weight.shape[0] == 49
    with pytest.raises(ValueError, match=r"\(12, 4\)"):
        enc.encode_image(torch.randn(1, 3, 64, 32))


def test_image_tokens_with_keep_match_full_positions() -> None:
    # Keeping every patch (in order) is the same as no dropping; the class token is first.
    enc = build_dual_encoder(_cfg("irra").model, VOCAB).eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        full = enc.image_tokens(x)
        kept = enc.image_tokens(x, keep=torch.arange(48).expand(2, -1))
        torch.testing.assert_close(kept, full)
        sub = enc.vision_model.embeddings(x, keep=torch.tensor([[0, 5], [7, 47]]))
        emb = enc.vision_model.embeddings(x)
    assert sub.shape == (2, 3, 128)
    torch.testing.assert_close(sub[1, 1:], emb[1, [8, 48]])  # patch k is row 1 + k


def test_preset_sizes_and_embed_dim_override() -> None:
    assert dual_preset("base").vision.width == 768 and dual_preset("base").text.heads == 8
    assert shared_preset("base").tower.layers == 12
    enc = build_dual_encoder(ModelConfig(preset="tiny", image_size=(H, W), patch_size=P, embed_dim=64), VOCAB)
    assert enc.embed_dim == 64 and enc.encode_image(torch.randn(1, 3, H, W)).shape == (1, 64)
    with pytest.raises(ValueError, match="known presets"):
        dual_preset("huge")


def test_base_parameter_count_matches_clip_vit_b16() -> None:
    from transformers import CLIPConfig, CLIPModel

    # Reference: transformers' own CLIPModel at ViT-B/16 sizes, built on the meta device.
    ref_cfg = CLIPConfig(
        vision_config={
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "patch_size": 16,
            "image_size": 224,
        },
        text_config={
            "hidden_size": 512,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "intermediate_size": 2048,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
        },
        projection_dim=512,
    )
    with torch.device("meta"):
        ref = sum(p.numel() for p in CLIPModel(ref_cfg).parameters())
        ours = sum(p.numel() for p in build_dual_encoder(ModelConfig(preset="base"), 49408 + 1).parameters())
        shared = sum(
            p.numel() for p in build_shared_encoder(ModelConfig(preset="base"), 49408 + 1).parameters()
        )
    published = 149_620_737  # CLIP ViT-B/16 (224 px, 77 tokens), logit scale included
    print(f"base dual encoder: {ours:,} params; CLIP ViT-B/16: {published:,} ({ours / published - 1:+.4%})")
    print(f"base shared encoder (IVT): {shared:,} params")
    assert ref == published
    # 24x8 + 1 positions instead of 14x14 + 1 (-4 x 768), one mask-token row (+512), no logit scale (-1).
    assert ours == published - 4 * 768 + 512 - 1
    assert abs(ours / published - 1) < 0.005


# --------------------------------------------------------------------------- heads


def test_attention_heads() -> None:
    assert [attention_heads(w) for w in (32, 128, 512, 768, 100, 200)] == [1, 2, 8, 12, 1, 2]
    assert 200 % attention_heads(200) == 0


def test_irr_head_scores_only_labelled_positions() -> None:
    torch.manual_seed(0)
    head = IRRHead(64, 1, VOCAB).eval()
    text, image = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 4, 9, 11
    logits, picked = head(text, image, labels)
    full = head.mlm_head(head.fuse(text, image))  # (2, 5, V)
    assert logits.shape == (1, 3, VOCAB) and picked.tolist() == [[4, 9, 11]]
    torch.testing.assert_close(logits[0], torch.stack([full[0, 1], full[1, 3], full[1, 4]]))


def test_greyscale_and_patchify_values() -> None:
    # SEN's weighted greyscale, on the normalised batch as SEN applies it, copied to 3 channels
    img = torch.randn(2, 3, 4, 6)
    grey = to_greyscale(img)
    luma = 0.2989 * img[:, 0] + 0.5870 * img[:, 1] + 0.1140 * img[:, 2]
    for c in range(3):
        torch.testing.assert_close(grey[:, c], luma)
    img = torch.arange(2 * 3 * 4 * 6, dtype=torch.float).reshape(2, 3, 4, 6)
    patches = patchify(img, 2)  # (2, 2*3, 2*2*3), row-major grid, each patch (p, p, C)
    assert patches.shape == (2, 6, 12)
    # Patch 4 = grid row 1, column 1 -> pixels rows 2..3, columns 2..3.
    expect = img[1, :, 2:4, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, 4], expect)


def test_random_keep_and_sincos() -> None:
    g = torch.Generator().manual_seed(0)
    keep, dropped = random_keep(3, 10, 4, torch.device("cpu"), g)
    assert keep.shape == (3, 4) and (keep[:, 1:] > keep[:, :-1]).all()
    for i in range(3):
        assert dropped[i].sum() == 6 and (dropped[i, keep[i]] == 0).all()
    pe = sincos_2d(8, (3, 2))  # rows use channels 0..3, columns 4..7
    assert pe.shape == (6, 8)
    # Cell (r, c): [sin(r), sin(r/100), cos(r), cos(r/100), sin(c), sin(c/100), cos(c), cos(c/100)].
    r, c = 2.0, 1.0
    want = torch.tensor(
        [
            torch.sin(torch.tensor(r)),
            torch.sin(torch.tensor(r / 100)),
            torch.cos(torch.tensor(r)),
            torch.cos(torch.tensor(r / 100)),
            torch.sin(torch.tensor(c)),
            torch.sin(torch.tensor(c / 100)),
            torch.cos(torch.tensor(c)),
            torch.cos(torch.tensor(c / 100)),
        ]
    )
    torch.testing.assert_close(pe[2 * 2 + 1], want)


def test_uit_restoration_target_and_loss_uses_dropped_patches_only() -> None:
    model = build_method(_cfg("uit"), num_classes=4, vocab=Tok()).eval()
    batch = _batch()
    with torch.no_grad():
        out = model(batch)
    assert out["restore_pred"].shape == (8, 48, P * P * 3)
    torch.testing.assert_close(out["restore_target"], patchify(batch["images"], P))
    m = out["restore_mask"]
    want = ((out["restore_pred"] - out["restore_target"]) ** 2).mean(-1)[m.bool()].mean()
    torch.testing.assert_close(model.loss_terms(out, batch)["restore"], want)


# --------------------------------------------------------------------------- IVT pieces


def test_drop_patches_and_text_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.arange(2 * 10, dtype=torch.float).reshape(2, 10, 1)
    kept = drop_patches(tokens, 0.35, g)  # floor(10 * 0.35) = 3 dropped
    assert kept.shape == (2, 7, 1)
    for i in range(2):
        vals = kept[i, :, 0]
        assert (vals[1:] > vals[:-1]).all() and set(vals.tolist()) <= set(tokens[i, :, 0].tolist())
    assert drop_patches(tokens, 0.0) is tokens
    mask = torch.tensor([[1] * 12 + [0] * 4, [1] * 4 + [0] * 12])
    visible = drop_text_tokens(mask, 0.5, g)
    # Caption 0: 10 words -> 5 hidden; caption 1: 2 words -> 1 hidden. BOS/EOS stay; padding never visible.
    assert visible[0].sum() == 12 - 5 and visible[1].sum() == 4 - 1
    assert visible[:, 0].all() and visible[0, 11] and visible[1, 3]
    assert not visible[0, 12:].any() and not visible[1, 4:].any()
    assert torch.equal(drop_text_tokens(mask, 0.0), mask.bool())


def test_ivt_text_padding_mask_and_modality_ffns() -> None:
    enc = build_shared_encoder(_cfg("ivt").model, VOCAB).eval()
    blk = enc.blocks[0]
    assert set(blk.mlp) == {"image", "text"} and blk.mlp["image"] is not blk.mlp["text"]
    ids, mask = _captions([[5, 6, 7]])
    with torch.no_grad():
        a = enc.encode_text(ids, mask)
        # Hiding a word through the attention mask = changing the embedding.
        hidden = enc.encode_text(ids, mask, drop_ratio=0.5)
        # The text FFN is what text uses: perturbing the image FFN leaves text unchanged.
        blk.mlp["image"].fc2.bias.add_(1.0)
        b = enc.encode_text(ids, mask)
    assert torch.equal(a, b) and not torch.allclose(a, hidden)


def test_id_term_uses_one_classifier_for_both_modalities() -> None:
    model = build_method(_cfg("irra"), num_classes=4, vocab=Tok())
    batch = _batch()
    out = model(batch)
    pids = batch["pids"]
    want = (
        F.cross_entropy(model.classifier(out["image_feats"]), pids)
        + F.cross_entropy(model.classifier(out["text_feats"]), pids)
    ) / 2
    assert model.classifier.out_features == 4
    torch.testing.assert_close(model.loss_terms(out, batch)["id"], want)
