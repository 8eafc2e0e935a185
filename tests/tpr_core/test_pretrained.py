"""Loading a local Hugging Face CLIP directory into the dual encoder (the real loading path).

A tiny random ``CLIPModel`` is written with ``save_pretrained`` into a temporary folder and
loaded back; nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from tpr_core.config import ExperimentConfig
from tpr_core.models import build_method
from tpr_core.models.dual_encoder import check_clip_dir, interpolate_pos_embed, load_clip_dir

PAD, BOS, EOS = 0, 1, 3  # EOS != 2: transformers keeps a legacy argmax pooling for eos_token_id == 2
CLIP_VOCAB, LENGTH = 100, 16
MASK = CLIP_VOCAB  # the tokenizer adds the mask token after CLIP's vocabulary


@dataclass(frozen=True)
class Tok:
    vocab_size: int = CLIP_VOCAB + 1
    pad_id: int = PAD
    bos_id: int = BOS
    eos_id: int = EOS
    mask_id: int = MASK


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CLIPModel]:
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "vocab_size": CLIP_VOCAB,
            "max_position_embeddings": LENGTH,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "pad_token_id": PAD,
        },
        vision_config={
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    model = CLIPModel(cfg).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(path)
    return path, model


def _texts() -> tuple[torch.Tensor, torch.Tensor]:
    """Captions whose EOS is the last real token and the only EOS (HF pools at the first EOS)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.full((3, LENGTH), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate((5, 9, 16)):
        ids[i, 0] = BOS
        ids[i, 1 : n - 1] = torch.randint(4, CLIP_VOCAB, (n - 2,), generator=g)
        ids[i, n - 1] = EOS
        mask[i, :n] = 1
    return ids, mask


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput (projection in pooler_output); 4.x returned a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_same_grid_matches_hf_clip(clip_dir) -> None:
    path, ref = clip_dir
    enc = load_clip_dir(
        path, image_size=(32, 32), patch_size=8, text_length=LENGTH, vocab_size=CLIP_VOCAB + 1
    ).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = _texts()
    with torch.no_grad():
        want_v = _pooled(ref.get_image_features(pixel_values=images))
        want_t = _pooled(ref.get_text_features(input_ids=ids, attention_mask=mask))
        got_v, got_t = enc.encode_image(images), enc.encode_text(ids, mask)
    assert got_v.shape == (2, 32) and got_t.shape == (3, 32)
    torch.testing.assert_close(got_v, want_v, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_t, want_t, rtol=0, atol=1e-5)
    # The reference is not trivially equal at any pooling position: pooling one token early differs.
    shorter = mask.clone()
    shorter[0, 4] = 0
    with torch.no_grad():
        assert not torch.allclose(enc.encode_text(ids, shorter)[0], want_t[0], atol=1e-3)


def test_new_grid_interpolates_positions(clip_dir) -> None:
    path, ref = clip_dir
    enc = load_clip_dir(
        path, image_size=(48, 16), patch_size=8, text_length=LENGTH, vocab_size=CLIP_VOCAB + 1
    ).eval()
    old = ref.vision_model.embeddings.position_embedding.weight.detach()  # (1 + 4*4, 64)
    new = enc.vision_model.embeddings.position_embedding.weight.detach()
    assert enc.grid == (6, 2) and new.shape == (1 + 12, 64)
    assert torch.equal(new[0], old[0])  # class position untouched
    torch.testing.assert_close(new, interpolate_pos_embed(old, (4, 4), (6, 2)), rtol=0, atol=0)
    assert not torch.allclose(new[1:13], old[1:13])  # really resampled
    # Everything else is copied verbatim.
    torch.testing.assert_close(enc.visual_projection.weight, ref.visual_projection.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        enc.vision_model.embeddings.patch_embedding.weight, ref.vision_model.embeddings.patch_embedding.weight
    )
    images = torch.randn(2, 3, 48, 16)
    ids, mask = _texts()
    with torch.no_grad():
        v = enc.encode_image(images)
        t = enc.encode_text(ids, mask)
        want_t = _pooled(ref.get_text_features(input_ids=ids, attention_mask=mask))
    assert v.shape == (2, 32) and torch.isfinite(v).all()
    torch.testing.assert_close(t, want_t, rtol=0, atol=1e-5)  # text tower unaffected by the grid


def test_mask_token_row_added(clip_dir) -> None:
    path, ref = clip_dir
    enc = load_clip_dir(path, image_size=(32, 32), patch_size=8, text_length=12, vocab_size=CLIP_VOCAB + 1)
    old = ref.text_model.embeddings.token_embedding.weight.detach()
    new = enc.text_model.embeddings.token_embedding.weight.detach()
    assert old.shape == (CLIP_VOCAB, 64) and new.shape == (CLIP_VOCAB + 1, 64)
    assert torch.equal(new[:CLIP_VOCAB], old)
    torch.testing.assert_close(new[MASK], old.mean(0))
    # Text positions cut to model.text_length.
    pos = enc.text_model.embeddings.position_embedding.weight
    assert torch.equal(pos.detach(), ref.text_model.embeddings.position_embedding.weight.detach()[:12])
    # The mask id embeds and runs through the encoder.
    ids = torch.tensor([[BOS, 5, MASK, 7, EOS]])
    assert torch.isfinite(enc.encode_text(ids, torch.ones_like(ids))).all()


def test_build_method_from_config(clip_dir) -> None:
    path, ref = clip_dir
    cfg = ExperimentConfig(
        method="irra",
        model={"pretrained": str(path), "image_size": (48, 16), "patch_size": 8, "text_length": LENGTH},
    )
    model = build_method(cfg, num_classes=3, vocab=Tok())
    assert model.encoder.embed_dim == 32 and model.irr.mlm_head[-1].out_features == CLIP_VOCAB + 1
    torch.testing.assert_close(
        model.encoder.text_projection.weight, ref.text_projection.weight, rtol=0, atol=0
    )


def test_not_a_clip_dir_is_a_clear_error(tmp_path: Path, clip_dir) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"model.pretrained {missing}: not a directory"):
        check_clip_dir(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty: not a Hugging Face CLIP directory \(no config.json"):
        check_clip_dir(empty)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_clip_dir(bert, image_size=(32, 32), patch_size=8, text_length=LENGTH, vocab_size=CLIP_VOCAB + 1)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((clip_dir[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="no_weights: CLIP config found but no weights"):
        check_clip_dir(no_weights)
    assert check_clip_dir(clip_dir[0]) == clip_dir[0]


def test_incompatible_settings_name_the_field(clip_dir) -> None:
    path, _ = clip_dir
    kw = {"image_size": (32, 32), "patch_size": 8, "text_length": LENGTH, "vocab_size": CLIP_VOCAB + 1}
    with pytest.raises(ValueError, match="model.patch_size 16 differs from the patch size 8"):
        load_clip_dir(path, **{**kw, "patch_size": 16, "image_size": (32, 32)})
    with pytest.raises(ValueError, match="model.text_length 20 exceeds the 16 text positions"):
        load_clip_dir(path, **{**kw, "text_length": 20})
    with pytest.raises(ValueError, match="model.embed_dim 64 differs from the projection size 32"):
        load_clip_dir(path, **kw, embed_dim=64)
    with pytest.raises(ValueError, match="tokenizer vocabulary"):
        load_clip_dir(path, **{**kw, "vocab_size": 50})


def test_export_of_a_pretrained_model_loads_without_the_clip_dir(tmp_path: Path, clip_dir) -> None:
    """The exported folder keeps the CLIP config (sizes), so it loads after the CLIP dir is gone."""
    import shutil

    from tpr_core.data.tokenizer import Tokenizer
    from tpr_core.export import load_exported, save_exported

    path, _ = clip_dir
    own = tmp_path / "clip-copy"
    shutil.copytree(path, own)
    cfg = ExperimentConfig(
        method="irra",
        model={"pretrained": str(own), "image_size": (48, 16), "patch_size": 8, "text_length": LENGTH},
    )
    tok = Tokenizer.train(["a man in a red coat", "a woman with a black bag"] * 4, vocab_size=300,
                          max_length=LENGTH)
    torch.manual_seed(0)
    model = build_method(cfg, num_classes=3, vocab=tok).eval()
    save_exported(tmp_path / "model", model.state_dict(), cfg, tok, {"val/R1": 1.0}, num_classes=3)
    shutil.rmtree(own)
    assert sorted(p.name for p in (tmp_path / "model" / "clip").iterdir()) == ["config.json"]  # no weights

    exp = load_exported(tmp_path / "model")
    assert exp.cfg.model.pretrained == str(own)  # the config as trained
    images = torch.randn(2, 3, 48, 16)
    ids, mask = _texts()
    with torch.no_grad():
        torch.testing.assert_close(exp.model.encode_image(images), model.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(exp.model.encode_text(ids, mask), model.encode_text(ids, mask), rtol=0, atol=0)

    shutil.rmtree(tmp_path / "model" / "clip")  # a folder from before: the error names what is missing
    from tpr_core.export import ExportError

    with pytest.raises(ExportError, match="model.pretrained .* is not a directory here"):
        load_exported(tmp_path / "model")
