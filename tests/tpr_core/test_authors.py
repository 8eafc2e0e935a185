"""Importing released checkpoints: OpenAI CLIP's archive, IRRA's and SEN's state dicts, and the
refusal of a checkpoint that would run code.

The source models are written here in the authors' layout: a small CLIP with OpenAI's module names
(``visual.conv1``, ``transformer.resblocks.N.attn.in_proj_weight``, ...) and IRRA's / SEN's heads
with the names of their ``model/build.py``. The reference embeddings are computed by that module's
own forward (``nn.MultiheadAttention`` with packed q/k/v, OpenAI's argmax EOS pooling), not by tpr.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tests.tpr_core.test_tokenizer import tiny_clip_dir  # noqa: F401  (fixture)
from tpr_core import authors
from tpr_core.data.tokenizer import Tokenizer
from tpr_core.experiment import load_config
from tpr_core.export import load_exported
from tpr_core.models.dual_encoder import interpolate_pos_embed
from tpr_core.tensor_pickle import UnsafeCheckpointError, load_tensors

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
WIDTH, EMBED, CONTEXT = 128, 64, 52  # 2 heads per tower (width / 64, as OpenAI counts them)
CAPTIONS = ["a man in a red shirt.", "red shirt, a man", "a man"]

pytestmark = pytest.mark.usefixtures("one_thread")


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """OpenAI's ResidualAttentionBlock (names and maths), batch first."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, max(1, width // 64), batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width))
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Stack(nn.Module):
    def __init__(self, width: int, layers: int = 2) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[Block(width) for _ in range(layers)])

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class Visual(nn.Module):
    def __init__(self, patch: int, positions: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH))
        self.positional_embedding = nn.Parameter(torch.randn(positions, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = Stack(WIDTH)
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.randn(WIDTH, EMBED))


class RefCLIP(nn.Module):
    """A small CLIP with OpenAI's parameter names and forward."""

    def __init__(self, vocab: int, patch: int, positions: int) -> None:
        super().__init__()
        self.visual = Visual(patch, positions)
        self.transformer = Stack(WIDTH)
        self.token_embedding = nn.Embedding(vocab, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, WIDTH))
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.randn(WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.ones([]))
        _randomise(self)

    def encode_image(self, images: Tensor, pos: Tensor | None = None) -> Tensor:
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)  # (B, N, W)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        x = v.ln_pre(x + (v.positional_embedding if pos is None else pos))
        return v.ln_post(v.transformer(x))[:, 0] @ v.proj

    def encode_text(self, ids: Tensor) -> Tensor:
        L = ids.shape[1]
        causal = torch.full((L, L), float("-inf")).triu(1)
        x = self.token_embedding(ids) + self.positional_embedding[:L]
        x = self.ln_final(self.transformer(x, causal))
        return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.text_projection  # OpenAI's EOS pick

    def forward(self, images: Tensor) -> Tensor:
        return self.encode_image(images)


def _randomise(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1
        p.data.copy_(noise + 1.0 if (".ln" in name or name.startswith("ln")) and name.endswith("weight") else noise)


def _irra_heads(vocab: int, classes: int) -> nn.Module:
    """IRRA's heads (model/build.py), by its names."""
    heads = nn.Module()
    heads.classifier = nn.Linear(EMBED, classes)
    heads.cross_attn = nn.MultiheadAttention(EMBED, 1, batch_first=True)
    heads.cross_modal_transformer = Stack(EMBED)
    heads.ln_pre_t, heads.ln_pre_i, heads.ln_post = (nn.LayerNorm(EMBED) for _ in range(3))
    heads.mlm_head = nn.Sequential(
        OrderedDict(dense=nn.Linear(EMBED, EMBED), gelu=QuickGELU(), ln=nn.LayerNorm(EMBED), fc=nn.Linear(EMBED, vocab))
    )
    _randomise(heads)
    return heads


def _images(cfg) -> Tensor:
    h, w = cfg.model.image_size
    return torch.linspace(-1, 1, 2 * 3 * h * w).reshape(2, 3, h, w).sin()


@pytest.fixture(scope="module")
def clip_tok(tiny_clip_dir) -> Tokenizer:  # noqa: F811
    return Tokenizer.from_clip(tiny_clip_dir[0], max_length=48)


@pytest.mark.parametrize("source", ["irra", "fmfa"])  # FMFA's model/build.py keeps IRRA's module names
def test_irra_best_pth_gives_the_authors_embeddings(tmp_path, clip_tok, source):
    cfg = load_config(CONFIGS / f"{source}_synthetic_tiny.yaml")
    vocab = clip_tok.vocab_size - 1  # the authors' 66 ids: mask, BOS, EOS last
    grid = (cfg.model.image_size[0] // 8) * (cfg.model.image_size[1] // 8)
    ref, heads = RefCLIP(vocab, 8, 1 + grid).eval(), _irra_heads(vocab, 5)
    state = {f"base_model.{k}": v.half() for k, v in ref.state_dict().items() if k != "logit_scale"}
    state.update(heads.state_dict())
    torch.save({"model": state, "num_epoch": 7}, tmp_path / "best.pth")

    done = authors.import_checkpoint(tmp_path / "best.pth", source, cfg, clip_tok, tmp_path / "m")
    assert done.num_classes == 5 and done.dropped == []
    got = load_exported(done.path)
    ref.float()
    for p, s in zip(ref.parameters(), ref.half().float().parameters(), strict=True):
        assert torch.equal(p, s)  # the fp16 round trip of the checkpoint is the reference's own weights
    ids, mask = clip_tok.encode(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(got.model.encode_image(_images(cfg)), ref.encode_image(_images(cfg)))
        torch.testing.assert_close(got.model.encode_text(ids, mask), ref.encode_text(ids))
    m = got.model.state_dict()
    emb, fc = m["encoder.text_model.embeddings.token_embedding.weight"], m["irr.mlm_head.3.weight"]
    # The authors' mask (id vocab - 3) is tpr's appended mask id; every other id keeps its row.
    assert torch.equal(emb[clip_tok.mask_id], ref.token_embedding.weight[vocab - 3])
    assert torch.equal(emb[:vocab], ref.token_embedding.weight)
    assert torch.equal(fc[clip_tok.mask_id], heads.mlm_head.fc.weight[vocab - 3])
    assert torch.equal(m["irr.transformer.layers.1.mlp.fc2.bias"], heads.cross_modal_transformer.resblocks[1].mlp.c_proj.bias)

    bad = dict(state, **{"cross_attn.out_proj.weight": torch.zeros(EMBED, EMBED + 1), "extra_head.weight": torch.ones(1)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(authors.AuthorsImportError, match=r"extra_head\.weight"):
        authors.import_checkpoint(tmp_path / "bad.pth", "irra", cfg, clip_tok, tmp_path / "bad")
    bad.pop("extra_head.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(authors.AuthorsImportError, match=r"irr\.cross_attn\.out_proj\.weight.*\(64, 65\)"):
        authors.import_checkpoint(tmp_path / "bad.pth", "irra", cfg, clip_tok, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_openai_clip_archive_gives_the_same_embeddings(tmp_path, clip_tok):
    """A TorchScript archive with OpenAI's names: its square 4x4 grid resized to the config's 12x4."""
    cfg = load_config(CONFIGS / "uit_synthetic_tiny.yaml")
    vocab = clip_tok.vocab_size - 1  # CLIP's own ids; tpr appends its mask
    ref = RefCLIP(vocab, 8, 1 + 16).eval()
    archive = torch.jit.trace(ref, torch.zeros(1, 3, 32, 32), check_trace=False)
    torch.jit.save(archive, tmp_path / "ViT-tiny.pt")

    done = authors.import_checkpoint(tmp_path / "ViT-tiny.pt", "openai-clip", cfg, clip_tok, tmp_path / "m", 3)
    assert done.dropped == ["logit_scale"] and done.num_classes == 3
    got = load_exported(done.path)
    pos = interpolate_pos_embed(ref.visual.positional_embedding.detach(), (4, 4), (12, 4))
    ids, mask = clip_tok.encode(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(got.model.encode_image(_images(cfg)), ref.encode_image(_images(cfg), pos))
        torch.testing.assert_close(got.model.encode_text(ids, mask), ref.encode_text(ids))
    emb = got.model.state_dict()["encoder.text_model.embeddings.token_embedding.weight"]
    torch.testing.assert_close(emb[clip_tok.mask_id], ref.token_embedding.weight.mean(0))
    # The heads the archive has no weights for start from a seeded init: one import is like the next.
    again = authors.import_checkpoint(tmp_path / "ViT-tiny.pt", "openai-clip", cfg, clip_tok, tmp_path / "m2", 3)
    first, second = got.model.state_dict(), load_exported(again.path).model.state_dict()
    assert [k for k in first if not torch.equal(first[k], second[k])] == []


def test_sen_heads_fill_the_uit_restorer(clip_tok):
    cfg = load_config(CONFIGS / "uit_synthetic_tiny.yaml")
    vocab = clip_tok.vocab_size - 1
    ref = RefCLIP(vocab, 8, 1 + 48)
    sen = nn.Module()  # SEN's model/build.py names, 'mae' + 'id' losses
    sen.classifier = nn.Linear(EMBED, 4)
    sen.decoder_embed = nn.Linear(EMBED, EMBED)
    sen.mask_token = nn.Parameter(torch.zeros(1, 1, EMBED))
    sen.decoder_pos_embed = nn.Parameter(torch.zeros(1, 49, EMBED))
    for name in ("cross_attn_TextImage", "cross_attn_Text", "cross_attn_Image"):
        setattr(sen, name, nn.MultiheadAttention(EMBED, 1, batch_first=True))
    sen.cross_modal_transformer_mae = Stack(EMBED)
    for i in range(1, 8):
        setattr(sen, f"norm_{i}", nn.LayerNorm(EMBED))
    sen.decoder_pred = nn.Linear(EMBED, 8 * 8 * 3)
    _randomise(sen)
    state = {f"base_model.{k}": v for k, v in ref.state_dict().items() if k != "logit_scale"} | sen.state_dict()

    model, mapped, _, n = authors.build_imported_model("sen", state, cfg, clip_tok)
    assert n == 4
    assert sorted(mapped.dropped)[:3] == ["cross_attn_Image.in_proj_bias", "cross_attn_Image.in_proj_weight",
                                          "cross_attn_Image.out_proj.bias"]  # fmt: skip
    r = model.restorer
    assert torch.equal(r.ln_q.weight, sen.norm_4.weight) and torch.equal(r.norm.bias, sen.norm_7.bias)
    assert torch.equal(r.cross_attn.in_proj_weight, sen.cross_attn_Text.in_proj_weight)
    q = sen.cross_modal_transformer_mae.resblocks[0].attn.in_proj_weight[EMBED : 2 * EMBED]
    assert torch.equal(r.transformer.layers[0].self_attn.k_proj.weight, q)
    assert torch.equal(r.pred.weight, sen.decoder_pred.weight)
    with pytest.raises(authors.AuthorsImportError, match="fills method uit.*'irra'"):
        authors.build_imported_model("sen", state, load_config(CONFIGS / "irra_synthetic_tiny.yaml"), clip_tok)


class _Payload:
    """Pickles as a call to ``os.mkdir``: loading it with a plain unpickler makes a folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_that_runs_code_is_refused_and_nothing_runs(tmp_path, tiny_clip_dir):  # noqa: F811
    from typer.testing import CliRunner

    from pipelines.cli import app

    marker = tmp_path / "ran"
    evil = tmp_path / "best.pth"
    torch.save({"model": {"w": torch.ones(2)}, "hook": _Payload(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load (posix|os)\.mkdir"):
        load_tensors(evil)
    assert not marker.exists()
    r = CliRunner().invoke(
        app,
        ["import", str(evil), "--format", "irra", "--out", str(tmp_path / "m"),
         "--config", str(CONFIGS / "irra_synthetic_tiny.yaml"), "--tokenizer", str(tiny_clip_dir[0])],
    )  # fmt: skip
    assert r.exit_code == 2 and "mkdir" in r.output, r.output
    assert not marker.exists() and not (tmp_path / "m").exists()
    # The payload is live: an unrestricted load runs it.
    torch.load(evil, weights_only=False)
    assert marker.is_dir()
