"""UIT's restoration decoder and greyscale input as SEN's code (model/build.py of Delong-liu-bupt/SEN).

SEN's decoder replaces the image tokens by the layernormed output of their cross-attention to
the caption (no residual), so the restoration can only go through the text. These tests check
that property directly, plus SEN's greyscale weights, its sin-cos positions and its start.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.tpr_core.test_models import Tok
from tpr_core.config import ExperimentConfig
from tpr_core.models import build_method
from tpr_core.models.heads import GREY_WEIGHTS, RestorationHead, random_keep, to_greyscale

# joint width, decoder depth, patch grid, patch size, caption length
E, DEPTH, GRID, P, L = 32, 2, (6, 4), 4, 7


@pytest.fixture(autouse=True)
def _seeded(one_thread):
    torch.manual_seed(0)


def _head() -> RestorationHead:
    return RestorationHead(E, E, DEPTH, GRID, P).eval()


def _inputs(b: int = 3, keep: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    keep_idx, _ = random_keep(b, n, keep, torch.device("cpu"), g)
    visible = torch.randn(b, 1 + keep, E, generator=g)
    text = torch.randn(b, L, E, generator=g)
    mask = torch.ones(b, L, dtype=torch.long)
    mask[:, 5:] = 0  # two padding positions
    return visible, keep_idx, text, mask


# --------------------------------------------------------------------------- greyscale


def test_greyscale_uses_sens_weights_on_the_given_tensor() -> None:
    assert GREY_WEIGHTS == (0.2989, 0.5870, 0.1140)
    # One image, 1 x 3 pixels: pure R, pure G + B, a mixed pixel with negative (normalised) values.
    img = torch.tensor([[[[1.0, 0.0, 0.5]], [[0.0, 1.0, -1.0]], [[0.0, 1.0, 2.0]]]])  # (1, 3, 1, 3)
    # 0.2989, 0.701, -0.20955
    want = torch.tensor([0.2989, 0.5870 + 0.1140, 0.5 * 0.2989 - 0.5870 + 2 * 0.1140])
    grey = to_greyscale(img)
    assert grey.shape == img.shape
    for c in range(3):  # replicated to the three channels, as SEN's repeat(1, 3, 1, 1)
        torch.testing.assert_close(grey[0, c, 0], want, rtol=0, atol=1e-6)
    # A white pixel of ones sums the weights (0.9999), not 1: no renormalisation.
    assert to_greyscale(torch.ones(1, 3, 1, 1)).flatten().tolist() == pytest.approx([0.9999] * 3, abs=1e-6)


# --------------------------------------------------------------------------- structure


def test_prediction_changes_with_the_caption() -> None:
    head = _head()
    visible, keep_idx, text, mask = _inputs()
    with torch.no_grad():
        base = head(visible, keep_idx, text, mask)
        zeroed = head(visible, keep_idx, torch.zeros_like(text), mask)
        other = text.clone()
        other[1] = torch.randn(L, E)  # a different caption for sample 1 only
        changed = head(visible, keep_idx, other, mask)
    assert base.shape == (3, GRID[0] * GRID[1], P * P * 3)
    assert not torch.allclose(zeroed, base, atol=1e-4)
    assert not torch.allclose(changed[1], base[1], atol=1e-4)
    torch.testing.assert_close(changed[[0, 2]], base[[0, 2]], rtol=0, atol=0)  # per-sample


def test_no_path_around_the_cross_attention() -> None:
    """The prediction is a function of the cross-attention output alone.

    With the cross-attention's output held fixed (a forward hook), any change of the image
    tokens, of which patches were kept, or of the caption leaves the prediction unchanged: the
    image tokens reach the output only as queries of the attention over the caption. (With a
    residual around the attention, as tpr had, the image tokens would bypass the caption.)
    """
    head = _head()
    visible, keep_idx, text, mask = _inputs(seed=0)
    visible2, keep_idx2, text2, _ = _inputs(seed=1)
    fixed = torch.randn(3, 1 + GRID[0] * GRID[1], E)
    handle = head.cross_attn.register_forward_hook(lambda _m, _i, out: (fixed, *out[1:]))
    try:
        with torch.no_grad():
            a = head(visible, keep_idx, text, mask)
            b = head(visible2, keep_idx2, text2, mask)
    finally:
        handle.remove()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(a, head.decode(fixed), rtol=0, atol=0)
        # Without the hook the image tokens do matter, through the attention weights.
        assert not torch.allclose(head(visible, keep_idx, text, mask), head(visible2, keep_idx2, text, mask))


def test_a_caption_of_identical_tokens_leaves_nothing_of_the_image() -> None:
    """Hook-free ablation: if every caption position carries the same token, each query's
    attention output is that token's value (the weights sum to 1), whatever the query; the
    decoder then predicts the same pixels for every patch of every image, positions included."""
    head = _head()
    visible, keep_idx, _, mask = _inputs(seed=0)
    visible2, keep_idx2, _, _ = _inputs(seed=1)
    same = torch.randn(1, 1, E).expand(3, L, E)
    with torch.no_grad():
        a = head(visible, keep_idx, same, mask)
        b = head(visible2, keep_idx2, same, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, a[:1, :1].expand_as(a), rtol=0, atol=1e-5)


def test_padding_positions_are_attended_as_in_sen() -> None:
    head = _head()
    visible, keep_idx, text, mask = _inputs()
    with torch.no_grad():
        base = head(visible, keep_idx, text, mask)
        # The mask is not used: SEN's cross_attn_Text has no key_padding_mask ...
        torch.testing.assert_close(head(visible, keep_idx, text, torch.ones_like(mask)), base, rtol=0, atol=0)
        # ... so what sits at the padding positions changes the prediction.
        padded = text.clone()
        padded[:, 5:] = torch.randn(3, L - 5, E)
        assert not torch.allclose(head(visible, keep_idx, padded, mask), base, atol=1e-4)


# --------------------------------------------------------------------------- SEN's constants


def _mae_sincos(dim: int, gh: int, gw: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (cls_token=True) for a (gh, gw) grid, written from its formula."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE: np.meshgrid(grid_w, grid_h), "w goes first": the first half of the channels encodes columns
    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    emb = np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)  # (gh*gw, dim)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


def test_decoder_positions_are_maes_and_start_as_sen() -> None:
    head = _head()
    want = torch.from_numpy(_mae_sincos(E, *GRID)).float()
    torch.testing.assert_close(head.pos_embed[0], want, rtol=0, atol=1e-6)
    assert "pos_embed" not in head.state_dict()  # fixed buffer
    assert torch.count_nonzero(head.mask_token) == 0  # SEN never re-initialises its zero mask token
    attn = head.cross_attn
    assert torch.count_nonzero(attn.in_proj_bias) == 0 and torch.count_nonzero(attn.out_proj.bias) == 0
    big = RestorationHead(256, 256, 4, GRID, P)
    assert big.cross_attn.in_proj_weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert big.cross_attn.out_proj.weight.std().item() == pytest.approx(256**-0.5 / math.sqrt(8), rel=0.05)
    # The decoder's modules as SEN's, in its order (norm_1, norm_2, decoder_embed, ..., decoder_pred).
    names = [n for n, _ in head.named_children()]
    assert names == [
        "ln_image",
        "ln_text",
        "embed",
        "ln_q",
        "cross_attn",
        "ln_fused",
        "transformer",
        "norm",
        "pred",
    ]


# --------------------------------------------------------------------------- in the model




def test_tiny_uit_restoration_trains_through_the_text_encoder() -> None:
    cfg = ExperimentConfig(
        method="uit",
        model={
            "preset": "tiny",
            "image_size": (32, 16),
            "patch_size": 8,
            "text_length": 12,
            "restore_depth": 1,
        },
    )
    model = build_method(cfg, num_classes=4, vocab=Tok()).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 59, (4, 12), generator=g)
    ids[:, 0], ids[:, 8], ids[:, 9:] = 1, 2, 0
    mask = (torch.arange(12) < 9).long().expand(4, -1)
    batch = {
        "images": torch.randn(4, 3, 32, 16, generator=g),
        "text_ids": ids,
        "text_mask": mask,
        "pids": torch.tensor([0, 0, 1, 1]),
    }
    out = model(batch)
    terms = model.loss_terms(out, batch)
    assert set(terms) == {"sdm", "id", "triplet", "restore"} and torch.isfinite(terms["restore"])
    terms["restore"].backward()  # the restoration term alone
    grads = {n: p.grad for n, p in model.named_parameters()}
    # Every decoder parameter is used; the term reaches the caption's encoder.
    assert all(grads[n] is not None for n in grads if n.startswith("restorer.")), "dead decoder parameter"
    text_in = grads["encoder.text_model.embeddings.token_embedding.weight"]
    assert text_in is not None and text_in.abs().sum() > 0
