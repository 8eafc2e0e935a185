"""The consolidated model folder: round trip per method, atomic writes, integrity and no unpickling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tpr_core import export
from tpr_core.data.tokenizer import Tokenizer
from tpr_core.experiment import load_config
from tpr_core.models import build_method, known_methods

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
EXPORT_FILES = [
    "model.safetensors", "config.json", "config.yaml", "metrics.json", "export.json",
    "tokenizer.json", "tpr_tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
]  # fmt: skip
CAPTIONS = ["a man in a red coat with a black backpack", "a woman in blue jeans carrying a white bag"] * 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _make(method: str, seed: int = 0):
    cfg = load_config(CONFIGS / f"{method}_synthetic_tiny.yaml")
    tok = Tokenizer.train(CAPTIONS, vocab_size=300, max_length=cfg.model.text_length)
    torch.manual_seed(seed)
    model = build_method(cfg, 7, tok).eval()
    return cfg, tok, model


def _inputs(cfg, tok):
    h, w = cfg.model.image_size
    images = torch.linspace(-1, 1, 2 * 3 * h * w).reshape(2, 3, h, w)  # (B, 3, H, W)
    ids, mask = tok.encode(CAPTIONS[:2], cfg.model.text_length)  # (B, L)
    return images, ids, mask


@pytest.mark.parametrize("method", known_methods())
def test_roundtrip_reproduces_weights_and_features(tmp_path, method):
    cfg, tok, model = _make(method)
    metrics = {"val/R1": 12.5, "val/mAP": 10.0}
    out = export.save_exported(
        tmp_path / "m", model.state_dict(), cfg, tok, metrics, 7, extra={"dataset_manifest_hash": "abc123"}
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        EXPORT_FILES
    )
    # A differently seeded build proves the weights come from the file, not from the seed.
    torch.manual_seed(123)
    loaded = export.load_exported(out)
    assert not loaded.model.training
    assert loaded.cfg == cfg
    assert loaded.metrics == metrics
    assert loaded.info["method"] == method and loaded.info["num_classes"] == 7
    assert loaded.info["dataset_manifest_hash"] == "abc123"
    assert loaded.info["format_version"] == export.FORMAT_VERSION
    original = model.state_dict()
    restored = loaded.model.state_dict()
    assert original.keys() == restored.keys()
    for k in original:
        assert torch.equal(original[k], restored[k]), k
    images, ids, mask = _inputs(cfg, tok)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.model.encode_image(images))
        assert torch.equal(model.encode_text(ids, mask), loaded.model.encode_text(ids, mask))
    assert loaded.tokenizer.encode(CAPTIONS[:1], 20)[0].tolist() == tok.encode(CAPTIONS[:1], 20)[0].tolist()


def test_info_counts(tmp_path):
    cfg, tok, model = _make("irra")
    sd = model.state_dict()
    export.save_exported(tmp_path / "m", sd, cfg, tok, {}, 7, extra={"git_commit": "deadbeef"})
    info = json.loads((tmp_path / "m" / "export.json").read_text())
    assert info["num_tensors"] == len(sd)
    assert info["num_parameters"] == sum(t.numel() for t in sd.values())
    assert info["extra"] == {"git_commit": "deadbeef"}
    assert info["dataset_manifest_hash"] is None


def test_overwrite_is_atomic_and_failed_write_keeps_old(tmp_path):
    cfg, tok, model = _make("irra")
    export.save_exported(tmp_path / "m", model.state_dict(), cfg, tok, {"val/R1": 1.0}, 7)
    export.save_exported(tmp_path / "m", model.state_dict(), cfg, tok, {"val/R1": 2.0}, 7)
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == {"val/R1": 2.0}
    bad = dict(model.state_dict())
    bad["not_a_tensor"] = 3
    with pytest.raises(export.ExportError, match="not_a_tensor"):
        export.save_exported(tmp_path / "m", bad, cfg, tok, {"val/R1": 3.0}, 7)
    # The previous folder is untouched and no temporary folder is left behind.
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == {"val/R1": 2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_shared_storage_tensors_are_saved(tmp_path):
    from safetensors.torch import load_file

    cfg, tok, _ = _make("irra")
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    export.save_exported(tmp_path / "m", {"a": w, "b": w, "c": w.t()}, cfg, tok, {}, 7)
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w) and torch.equal(got["c"], w.t())


def test_tampered_weights_are_refused(tmp_path):
    cfg, tok, model = _make("irra")
    out = export.save_exported(tmp_path / "m", model.state_dict(), cfg, tok, {}, 7)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(export.ExportError, match="SHA-256"):
        export.load_exported(out)


def test_mismatched_state_dict_names_keys(tmp_path):
    cfg, tok, model = _make("irra")
    sd = dict(model.state_dict())
    dropped = next(iter(sd))
    del sd[dropped]
    sd["surplus.weight"] = torch.zeros(1)
    out = export.save_exported(tmp_path / "m", sd, cfg, tok, {}, 7)
    with pytest.raises(export.ExportError) as err:
        export.load_exported(out)
    assert dropped in str(err.value) and "surplus.weight" in str(err.value)


def test_format_errors_name_file_and_field(tmp_path):
    cfg, tok, model = _make("irra")
    out = export.save_exported(tmp_path / "m", model.state_dict(), cfg, tok, {}, 7)
    info = json.loads((out / "export.json").read_text())
    info["format_version"] = export.FORMAT_VERSION + 1
    (out / "export.json").write_text(json.dumps(info))
    with pytest.raises(export.ExportError, match=r"export\.json.*format_version"):
        export.load_exported(out)
    with pytest.raises(export.ExportError, match="missing"):
        export.load_exported(tmp_path / "nowhere")


def test_loading_never_unpickles(tmp_path, monkeypatch):
    import pickle

    cfg, tok, model = _make("uit")
    out = export.save_exported(tmp_path / "m", model.state_dict(), cfg, tok, {}, 7)

    def tripwire(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", tripwire)
    monkeypatch.setattr(pickle, "load", tripwire)
    monkeypatch.setattr(pickle, "loads", tripwire)
    loaded = export.load_exported(out)
    assert loaded.info["method"] == "uit"


def test_ivt_from_vit_and_bert_loads_without_them(tmp_path):
    """An ivt model started from a (tiny, fake) timm ViT and BERT: the export keeps no CLIP config,
    and loads, with the same embeddings, after both checkpoints are deleted."""
    import shutil

    from tests.tpr_core.test_ivt_pretrained import fake_bert, fake_vit

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    vit, _ = fake_vit(ckpts, "vit")
    bert, _ = fake_bert(ckpts, "bert", max_position_embeddings=64)  # the tiny config's 48 tokens fit
    cfg = load_config(
        CONFIGS / "ivt_synthetic_tiny.yaml",
        [f"model.pretrained={vit / 'model.safetensors'}", f"model.pretrained_text={bert}"],
    )
    tok = Tokenizer.from_bert(bert, max_length=cfg.model.text_length)
    torch.manual_seed(0)
    model = build_method(cfg, 7, tok).eval()
    # Started from the checkpoints: the first block's attention is the ViT's, not a seeded init.
    from safetensors.torch import load_file

    vit_qkv = load_file(str(vit / "model.safetensors"))["blocks.0.attn.qkv.weight"]
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight.detach(), vit_qkv)
    out = export.save_exported(tmp_path / "m", model.state_dict(), cfg, tok, {"val/R1": 1.0}, 7)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        EXPORT_FILES
    )
    shutil.rmtree(ckpts)
    torch.manual_seed(123)
    loaded = export.load_exported(out)
    assert loaded.cfg == cfg  # the config as trained, checkpoint paths included
    assert loaded.tokenizer.kind == "bert" and loaded.tokenizer.vocab_size == tok.vocab_size
    original, restored = model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys()
    for k in original:
        assert torch.equal(original[k], restored[k]), k
    images, _, _ = _inputs(cfg, tok)
    ids, mask = loaded.tokenizer.encode(["A man in RED shoes", "a woman with a black bag"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.model.encode_image(images))
        assert torch.equal(model.encode_text(ids, mask), loaded.model.encode_text(ids, mask))


def test_from_pretrained_round_trip_and_the_tokenizer_in_transformers(tmp_path):
    """The folder through huggingface_hub's mixin and transformers' fast tokenizer, and back."""
    from transformers import PreTrainedTokenizerFast

    from tpr_core.hub import TPRModel

    cfg, tok, model = _make("fmfa")
    out = export.save_exported(tmp_path / "m", model.state_dict(), cfg, tok, {"val/R1": 3.0}, 7)
    images, ids, mask = _inputs(cfg, tok)
    hub = TPRModel.from_pretrained(out)
    assert hub.cfg == cfg and hub.info["num_classes"] == 7
    with torch.no_grad():
        want = model.encode_text(ids, mask)
        assert torch.equal(hub.encode_image(images), model.encode_image(images))
        assert torch.equal(hub.encode_text(ids, mask), want)
    hub.save_pretrained(tmp_path / "again")
    again = TPRModel.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again.encode_text(ids, mask), want)
    hf = PreTrainedTokenizerFast.from_pretrained(out)
    for text, row, n in zip(CAPTIONS[:2], ids, mask.sum(1).tolist(), strict=True):
        assert hf(text)["input_ids"] == row[:n].tolist()  # BOS ... EOS, tpr's ids
    assert hf.mask_token_id == tok.mask_id and hf.pad_token_id == tok.pad_id


def test_a_format_1_folder_still_loads(tmp_path):
    """The layout written before format 2: tokenizer/ holding the tokenizer, no config.json."""
    cfg, tok, model = _make("irra")
    out = export.save_exported(tmp_path / "m", model.state_dict(), cfg, tok, {}, 7)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink()
    (out / "tpr_tokenizer.json").unlink()
    tok.save(out / "tokenizer")  # Tokenizer.save wrote format 1's tokenizer folder
    info = json.loads((out / "export.json").read_text())
    (out / "export.json").write_text(json.dumps(dict(info, format_version=1)))
    loaded = export.load_exported(out)
    assert loaded.info["format_version"] == 1 and loaded.tokenizer.vocab_size == tok.vocab_size
    images, ids, mask = _inputs(cfg, tok)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_text(ids, mask), model.encode_text(ids, mask))
