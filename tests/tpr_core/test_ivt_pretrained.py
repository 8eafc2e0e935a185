"""IVT's pretrained start: a timm ViT and a Hugging Face BERT, both local, into the shared encoder.

A tiny timm ViT is saved with safetensors and a tiny BERT folder is written with
``save_pretrained`` plus a WordPiece ``vocab.txt``, in temporary folders; nothing is downloaded.
The mapping is IVT's ``load_param_hybrid`` (model/backbones/vit_vl.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

from tpr_core.config import ExperimentConfig, ModelConfig
from tpr_core.experiment import config_from_dict, load_config
from tpr_core.models import build_method
from tpr_core.models.ivt_pretrained import check_ivt_pretrained, resize_pos_embed
from tpr_core.models.shared_encoder import build_shared_encoder, patch_grid

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
WIDTH, DEPTH, HEADS = 128, 2, 4  # the tiny preset
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "a",
    "man",
    "woman",
    "in",
    "red",
    "blue",
    "black",
    "jacket",
    "shirt",
    "bag",
    "with",
    "and",
    "shoes",
    "##s",
]
BERT_VOCAB = len(SPECIALS) + len(WORDS)  # 19
LENGTH = 16


@dataclass(frozen=True)
class BertTok:
    """The attributes of BERT's tokenizer the model reads ([CLS]=2, [SEP]=3, [PAD]=0, [MASK]=4)."""

    vocab_size: int = BERT_VOCAB
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    mask_id: int = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_vit(tmp: Path, name: str, *, img: int = 32, patch: int = 8, depth: int = DEPTH) -> tuple[Path, dict]:
    """A tiny timm ViT (the tiny preset's width and heads) saved as ``tmp/name/model.safetensors``."""
    torch.manual_seed(1)
    vit = VisionTransformer(
        img_size=img, patch_size=patch, embed_dim=WIDTH, depth=depth, num_heads=HEADS, num_classes=7
    )
    with torch.no_grad():  # timm starts positions and class token near zero: make them distinctive
        vit.pos_embed.normal_()
        vit.cls_token.normal_()
    state = {k: v.detach().clone().contiguous() for k, v in vit.state_dict().items()}
    folder = tmp / name
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    return folder, state


def fake_bert(tmp: Path, name: str, *, model_cls=BertModel, **over) -> tuple[Path, BertModel]:
    """A tiny BERT folder (the tiny preset's sizes; ``over`` changes BertConfig fields) with ``vocab.txt``."""
    torch.manual_seed(2)
    kw = {
        "vocab_size": BERT_VOCAB,
        "hidden_size": WIDTH,
        "num_hidden_layers": DEPTH,
        "num_attention_heads": HEADS,
        "intermediate_size": 4 * WIDTH,
        "max_position_embeddings": 32,
    }
    kw.update(over)
    cfg = BertConfig(**kw)
    model = model_cls(cfg).eval()
    folder = tmp / name
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")
    return folder, model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("ivt-pretrained")
    vit8, state8 = fake_vit(tmp, "vit-p8")
    vit16, state16 = fake_vit(tmp, "vit-p16", patch=16)
    bert, bert_model = fake_bert(tmp, "bert")
    return {
        "tmp": tmp,
        "vit8": vit8,
        "state8": state8,
        "vit16": vit16,
        "state16": state16,
        "bert": bert,
        "bert_model": bert_model,
    }


def _model_cfg(ckpts: dict, **over) -> ModelConfig:
    kw = {
        "preset": "tiny",
        "image_size": (32, 32),
        "patch_size": 8,
        "text_length": LENGTH,
        "pretrained": str(ckpts["vit8"]),
        "pretrained_text": str(ckpts["bert"]),
    }
    kw.update(over)
    return ModelConfig(**kw)


# --------------------------------------------------------------------------- vision


def test_vit_weights_load_exactly(ckpts: dict) -> None:
    state = ckpts["state8"]
    # 32 x 32 at patch 8: the checkpoint's 4 x 4 grid
    enc = build_shared_encoder(_model_cfg(ckpts), BERT_VOCAB)
    assert enc.grid == (4, 4)
    pairs = {
        "patch_embed.proj.weight": enc.patch_embed.proj.weight,
        "patch_embed.proj.bias": enc.patch_embed.proj.bias,
        "norm.weight": enc.norm.weight,
        "norm.bias": enc.norm.bias,
    }
    for i, blk in enumerate(enc.blocks):
        for part, mod in (
            ("norm1", blk.norm1),
            ("attn.qkv", blk.attn.qkv),
            ("attn.proj", blk.attn.proj),
            ("norm2", blk.norm2),
            ("mlp.fc1", blk.mlp["image"].fc1),
            ("mlp.fc2", blk.mlp["image"].fc2),
        ):
            for wb in ("weight", "bias"):
                pairs[f"blocks.{i}.{part}.{wb}"] = getattr(mod, wb)
    for key, param in pairs.items():
        assert torch.equal(param.detach(), state[key]), key
    assert torch.equal(enc.image_cls.detach(), state["cls_token"])
    # An unchanged grid copies the positions exactly, class position included.
    assert torch.equal(enc.image_pos.detach(), state["pos_embed"])
    # The ViT's MLP is the image FFN only: the text FFN is BERT's (IVT's mlp_vis / mlp_txt).
    assert not torch.equal(enc.blocks[0].mlp["text"].fc1.weight.detach(), state["blocks.0.mlp.fc1.weight"])
    # IVT's image type embedding is loaded from nothing.
    assert enc.image_type.shape == enc.image_pos.shape and enc.image_type.abs().sum() > 0


def test_positions_resized_bilinearly_to_a_new_grid(ckpts: dict) -> None:
    state = ckpts["state8"]
    enc = build_shared_encoder(_model_cfg(ckpts, image_size=(96, 32)), BERT_VOCAB)
    assert enc.grid == (12, 4) and enc.image_pos.shape == (1, 1 + 48, WIDTH)
    src = state["pos_embed"][0]  # (1 + 16, W)
    grid = src[1:].reshape(1, 4, 4, WIDTH).permute(0, 3, 1, 2)
    want = (
        F.interpolate(grid, size=(12, 4), mode="bilinear", align_corners=False)
        .permute(0, 2, 3, 1)
        .reshape(48, WIDTH)
    )
    assert torch.equal(enc.image_pos[0, 0].detach(), src[0])  # class position kept
    torch.testing.assert_close(enc.image_pos[0, 1:].detach(), want, rtol=0, atol=1e-6)
    # Layout: a position field that varies along rows only stays so, and keeps its order.
    rows = torch.arange(4.0).repeat_interleave(4)[:, None].expand(16, 3)
    out = resize_pos_embed(torch.cat([torch.full((1, 3), -5.0), rows]), (4, 4), (8, 2))
    field = out[1:, 0].reshape(8, 2)
    assert out[0].tolist() == [-5.0] * 3 and torch.equal(field[:, 0], field[:, 1])
    assert (field[1:, 0] >= field[:-1, 0]).all() and field[0, 0] == 0 and field[-1, 0] == 3


def test_overlapping_patches_cuhk_grid(ckpts: dict) -> None:
    assert patch_grid((384, 128), 16, 12) == (31, 10)
    assert patch_grid((96, 32), 8, 6) == ((96 - 8) // 6 + 1, (32 - 8) // 6 + 1)
    cfg = _model_cfg(
        ckpts, image_size=(384, 128), patch_size=16, patch_stride=12, pretrained=str(ckpts["vit16"])
    )
    enc = build_shared_encoder(cfg, BERT_VOCAB).eval()
    assert enc.grid == (31, 10) and enc.image_pos.shape == (1, 1 + 310, WIDTH)
    conv = enc.patch_embed.proj
    assert conv.kernel_size == (16, 16) and conv.stride == (12, 12)
    assert torch.equal(conv.weight.detach(), ckpts["state16"]["patch_embed.proj.weight"])
    # Positions from the checkpoint's 2 x 2 grid; the class position kept.
    assert torch.equal(enc.image_pos[0, 0].detach(), ckpts["state16"]["pos_embed"][0, 0])
    images = torch.randn(2, 3, 384, 128)
    with torch.no_grad():
        tokens = enc.patch_embed(images)
        assert tokens.shape == (2, 310, WIDTH)
        # Patch (row 1, column 2) starts at pixel (12, 24).
        patch = images[:, :, 12:28, 24:40]
        want = (patch[:, None] * conv.weight[None]).sum((2, 3, 4)) + conv.bias
        torch.testing.assert_close(tokens[:, 1 * 10 + 2], want, rtol=1e-4, atol=1e-4)
        assert enc.encode_image(images).shape == (2, WIDTH)  # no projection: IVT's 768-wide class token
    # Without overlap the patch embedding is timm's PatchEmbed.
    plain = build_shared_encoder(_model_cfg(ckpts, pretrained=None, pretrained_text=None), BERT_VOCAB)
    ref = PatchEmbed(img_size=32, patch_size=8, embed_dim=WIDTH)
    ref.load_state_dict(plain.patch_embed.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.patch_embed(x), ref(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- text


def test_bert_embeddings_and_ffns_load_exactly(ckpts: dict) -> None:
    bert: BertModel = ckpts["bert_model"]
    vocab = BERT_VOCAB + 1  # a tokenizer that appends one token (e.g. tpr's <|mask|>)
    enc = build_shared_encoder(_model_cfg(ckpts, pretrained=None), vocab).eval()
    emb = bert.embeddings
    words = emb.word_embeddings.weight.detach()
    assert torch.equal(enc.token_embed.weight[:BERT_VOCAB].detach(), words)
    torch.testing.assert_close(enc.token_embed.weight[BERT_VOCAB].detach(), words.mean(0), rtol=0, atol=1e-6)
    assert torch.equal(enc.text_pos[0].detach(), emb.position_embeddings.weight[:LENGTH].detach())
    assert torch.equal(enc.text_type[0, 0].detach(), emb.token_type_embeddings.weight[0].detach())
    assert torch.equal(enc.text_norm.weight.detach(), emb.LayerNorm.weight.detach())
    assert torch.equal(enc.text_norm.bias.detach(), emb.LayerNorm.bias.detach())
    for i, blk in enumerate(enc.blocks):
        layer = bert.encoder.layer[i]
        ffn = blk.mlp["text"]
        assert torch.equal(ffn.fc1.weight.detach(), layer.intermediate.dense.weight.detach())
        assert torch.equal(ffn.fc1.bias.detach(), layer.intermediate.dense.bias.detach())
        assert torch.equal(ffn.fc2.weight.detach(), layer.output.dense.weight.detach())
        assert torch.equal(ffn.fc2.bias.detach(), layer.output.dense.bias.detach())
        # BERT's attention is not used (IVT skips every 'attention' key): the attention is the ViT's.
        assert blk.attn.qkv.weight.shape == (3 * WIDTH, WIDTH)
    # Functionally: the text embedding is BERT's embedding layer, the text FFN is BERT's FFN.
    ids = torch.tensor([[2, 5, 6, 12, 3, 0, 0, 0], [2, 9, 3, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(enc.embed_text(ids), emb(input_ids=ids), rtol=0, atol=1e-5)
        x = torch.randn(2, 5, WIDTH)
        layer = bert.encoder.layer[1]
        torch.testing.assert_close(
            enc.blocks[1].mlp["text"](x), layer.output.dense(layer.intermediate(x)), rtol=0, atol=1e-5
        )


def test_bert_with_a_prefixed_checkpoint(ckpts: dict) -> None:
    # Hub BERT checkpoints are often a BertForMaskedLM ("bert." prefix): the same weights load.
    folder, mlm = fake_bert(ckpts["tmp"], "bert-mlm", model_cls=BertForMaskedLM)
    enc = build_shared_encoder(_model_cfg(ckpts, pretrained=None, pretrained_text=str(folder)), BERT_VOCAB)
    assert torch.equal(enc.token_embed.weight.detach(), mlm.bert.embeddings.word_embeddings.weight.detach())
    assert torch.equal(
        enc.blocks[1].mlp["text"].fc2.weight.detach(), mlm.bert.encoder.layer[1].output.dense.weight.detach()
    )


def test_the_folder_holds_bert_s_tokenizer(ckpts: dict) -> None:
    tok = BertTokenizerFast.from_pretrained(str(ckpts["bert"]), local_files_only=True)
    # uncased: [CLS] a man in red shoes [SEP]
    enc = tok(["A man in red shoes"], padding="max_length", max_length=10)
    assert enc["input_ids"][0][:7] == [2, 5, 6, 8, 9, 17, 3] and tok.pad_token_id == 0


def test_tpr_s_bert_tokenizer_is_accepted(ckpts: dict, tmp_path: Path) -> None:
    from tpr_core.data.tokenizer import Tokenizer
    from tpr_core.models.ivt_pretrained import check_bert_tokenizer

    tok = Tokenizer.from_bert(ckpts["bert"], max_length=LENGTH)
    hf = BertTokenizerFast.from_pretrained(str(ckpts["bert"]), local_files_only=True)
    assert (
        (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id)
        == (len(hf), hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id)
        == tuple(getattr(BertTok(), a) for a in ("vocab_size", "bos_id", "eos_id", "pad_id", "mask_id"))
    )
    check_bert_tokenizer(tok, ckpts["bert"])
    # Saved and loaded (as a run's tokenizer is), it still passes and builds the method.
    loaded = Tokenizer.load(tok.save(tmp_path / "tok"))
    check_bert_tokenizer(loaded, ckpts["bert"])
    model = build_method(_ivt_cfg(ckpts), num_classes=3, vocab=loaded).eval()
    assert model.encoder.token_embed.num_embeddings == BERT_VOCAB  # no row appended for a mask token
    ids, mask = loaded.encode(["A man in RED shoes"])
    assert ids[0, :7].tolist() == hf("A man in RED shoes")["input_ids"] == [2, 5, 6, 8, 9, 17, 3]
    with torch.no_grad():  # the text embedding is BERT's on the tokenizer's ids
        want = ckpts["bert_model"].embeddings(input_ids=ids)
        torch.testing.assert_close(model.encoder.embed_text(ids), want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- the method


def _ivt_cfg(ckpts: dict, **over) -> ExperimentConfig:
    return ExperimentConfig(method="ivt", model=_model_cfg(ckpts, **over).model_dump())


def test_ivt_from_pretrained_trains_and_rebuilds_without_the_checkpoints(ckpts: dict) -> None:
    cfg = _ivt_cfg(ckpts, drop_path=0.1, text_dropout=0.1)
    model = build_method(cfg, num_classes=3, vocab=BertTok())
    blocks = model.encoder.blocks
    assert blocks[0].drop_path.__class__.__name__ == "Identity" and blocks[
        1
    ].drop_path.drop_prob == pytest.approx(0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(4, LENGTH, dtype=torch.long)
    ids[:, :6] = torch.tensor([2, 5, 6, 7, 8, 3])
    mask = (ids != 0).long()
    batch = {
        "text_ids": ids,
        "text_mask": mask,
        "phrase_ids": ids,
        "phrase_mask": mask,
        "word_ids": ids,
        "word_mask": mask,
        "pids": torch.tensor([0, 0, 1, 1]),
    }
    for k in ("images", "phrase_images", "word_images"):
        batch[k] = torch.randn(4, 3, 32, 32, generator=g)
    out = model.train()(batch)
    model.loss_terms(out, batch)["mla"].backward()
    assert (
        model.encoder.token_embed.weight.grad.abs().sum() > 0
        and model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    )
    # An exported model rebuilds itself without the checkpoints: same parameters, same shapes.
    plain = build_method(
        cfg.model_copy(
            update={"model": cfg.model.model_copy(update={"pretrained": None, "pretrained_text": None})}
        ),
        num_classes=3,
        vocab=BertTok(),
    )
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_a_tokenizer_that_is_not_bert_s_is_refused(ckpts: dict) -> None:
    @dataclass(frozen=True)
    class Bpe:
        vocab_size: int = 4096
        pad_id: int = 0
        bos_id: int = 1
        eos_id: int = 2
        mask_id: int = 3

    with pytest.raises(ValueError, match=r"bos_id is 1 but .*vocab.txt has \[CLS\] at 2"):
        build_method(_ivt_cfg(ckpts), num_classes=3, vocab=Bpe())
    with pytest.raises(ValueError, match=r"tokenizer vocabulary \(10\) is smaller than the 19 tokens"):
        build_method(_ivt_cfg(ckpts), num_classes=3, vocab=BertTok(vocab_size=10))


# --------------------------------------------------------------------------- errors and configs


def test_missing_files_are_named(ckpts: dict, tmp_path: Path) -> None:
    empty = tmp_path / "vit"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"no timm ViT weights file {empty}/model.safetensors"):
        build_shared_encoder(_model_cfg(ckpts, pretrained=str(empty)), BERT_VOCAB)
    with pytest.raises(ValueError, match=r"model.pretrained .*nope.safetensors: file not found"):
        check_ivt_pretrained(_model_cfg(ckpts, pretrained=str(tmp_path / "nope.safetensors")))
    bert = tmp_path / "bert"
    bert.mkdir()
    with pytest.raises(ValueError, match=rf"no BERT config file {bert}/config.json"):
        build_shared_encoder(_model_cfg(ckpts, pretrained_text=str(bert)), BERT_VOCAB)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(
        ValueError, match=rf"no BERT weights file \({bert}/model.safetensors or {bert}/pytorch_model.bin\)"
    ):
        build_shared_encoder(_model_cfg(ckpts, pretrained_text=str(bert)), BERT_VOCAB)
    for f in ("config.json", "model.safetensors"):
        (bert / f).write_bytes((ckpts["bert"] / f).read_bytes())
    with pytest.raises(ValueError, match=rf"no tokenizer vocabulary {bert}/vocab.txt"):
        check_ivt_pretrained(_model_cfg(ckpts, pretrained_text=str(bert)))
    (bert / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ValueError, match="has model_type 'roberta', not 'bert'"):
        check_ivt_pretrained(_model_cfg(ckpts, pretrained_text=str(bert)))
    with pytest.raises(ValueError, match="not a directory"):
        check_ivt_pretrained(_model_cfg(ckpts, pretrained_text=str(tmp_path / "absent")))


def test_checkpoints_of_other_sizes_are_refused(ckpts: dict, tmp_path: Path) -> None:
    deep, _ = fake_vit(tmp_path, "vit-deep", depth=3)
    with pytest.raises(ValueError, match=r"blocks up to 2, the shared encoder 2"):
        build_shared_encoder(_model_cfg(ckpts, pretrained=str(deep)), BERT_VOCAB)
    with pytest.raises(ValueError, match=r"patch size \(16, 16\), model.patch_size is 8"):
        build_shared_encoder(_model_cfg(ckpts, pretrained=str(ckpts["vit16"])), BERT_VOCAB)
    gelu_new, _ = fake_bert(tmp_path, "bert-gelu-new", hidden_act="gelu_new")
    with pytest.raises(ValueError, match=r"config.json hidden_act is 'gelu_new'"):
        build_shared_encoder(_model_cfg(ckpts, pretrained=None, pretrained_text=str(gelu_new)), BERT_VOCAB)
    with pytest.raises(ValueError, match=r"32 positions, fewer than model.text_length 40"):
        build_shared_encoder(_model_cfg(ckpts, pretrained=None, text_length=40), BERT_VOCAB)


def test_config_fields() -> None:
    config_from_dict(
        {"method": "ivt", "model": {"pretrained": "/x/vit", "pretrained_text": "/x/bert", "patch_stride": 12}}
    )
    for key, value in (
        ("pretrained_text", "/x/bert"),
        ("patch_stride", 12),
        ("drop_path", 0.1),
        ("text_dropout", 0.1),
    ):
        with pytest.raises(ValueError, match=rf"model.{key} applies to method 'ivt'"):
            config_from_dict({"method": "irra", "model": {key: value}})
    config_from_dict({"method": "irra", "model": {"patch_stride": 16}})  # = patch_size: no overlap, allowed
    with pytest.raises(ValueError, match="model.patch_stride 20 must be at most model.patch_size 16"):
        ModelConfig(patch_stride=20)


@pytest.mark.parametrize(
    ("ds", "stride", "grid"), [("cuhk", 12, (31, 10)), ("icfg", 12, (31, 10)), ("rstp", None, (24, 8))]
)
def test_base_configs_follow_ivt(ds: str, stride: int | None, grid: tuple[int, int]) -> None:
    cfg = load_config(CONFIGS / f"ivt_{ds}_base.yaml")
    m = cfg.model
    assert (m.patch_size, m.patch_stride, m.text_length, m.embed_dim) == (16, stride, 100, None)
    assert (m.drop_path, m.text_dropout) == (0.1, 0.1)
    assert m.pretrained and m.pretrained_text
    with torch.device("meta"):
        enc = build_shared_encoder(m.model_copy(update={"pretrained": None, "pretrained_text": None}), 30522)
    assert enc.grid == grid and enc.embed_dim == enc.width == 768
    assert isinstance(enc.image_proj, torch.nn.Identity)
