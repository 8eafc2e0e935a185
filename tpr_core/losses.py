"""Loss terms of the four retrieval methods, as plain functions: tensors in, scalar out.

Each function computes in float32 whatever the input dtype (the similarity softmaxes run at
temperature 0.02, where bf16 rounding visibly changes the distributions). Shape errors name the
argument. Conventions shared by all terms:

- ``image_feats`` / ``text_feats``: (B, D), row ``i`` of each is a matched image-caption pair.
- ``pids``: (B,) identity labels; ``y_ij = [pid_i == pid_j]`` marks true matches (several per row
  when a batch holds several images of one person).

References:
    IRRA: Jiang & Ye, "Cross-Modal Implicit Relation Reasoning and Aligning for Text-to-Image
        Person Retrieval", CVPR 2023 (SDM, ID, MLM).
    FMFA: Yin et al., "Cross-modal Full-mode Fine-grained Alignment for Text-to-Image Person
        Retrieval", arXiv 2509.13754, 2025 (A-SDM, EFA).
    UIT: Liu et al., "Unleashing the Imagination of Text" / "Text-guided Image Restoration and
        Semantic Enhancement for Text-to-Image Person Retrieval", arXiv 2307.09059 (cross-modal
        triplet, text-guided restoration).
    IVT: Shu et al., "See Finer, See More: Implicit Modality Alignment for Text-based Person
        Retrieval", ECCV Workshops 2022 (multi-level CMPM).
    CMPM: Zhang & Lu, "Deep Cross-Modal Projection Learning for Image-Text Matching", ECCV 2018.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tpr_core.distributed import BatchScope

__all__ = ["a_sdm", "cmpm", "efa", "id_loss", "mla", "mlm", "restore", "sdm", "triplet"]


# --------------------------------------------------------------------------- helpers


def _check_pair(fn: str, image_feats: Tensor, text_feats: Tensor, pids: Tensor | None) -> None:
    if image_feats.dim() != 2 or text_feats.dim() != 2:
        raise ValueError(
            f"{fn}: image_feats and text_feats must be (B, D); got {tuple(image_feats.shape)} "
            f"and {tuple(text_feats.shape)}"
        )
    if image_feats.shape != text_feats.shape:
        raise ValueError(
            f"{fn}: image_feats {tuple(image_feats.shape)} and text_feats {tuple(text_feats.shape)} "
            "must have the same shape (row i of each is a matched pair)"
        )
    if pids is not None and pids.shape != (image_feats.shape[0],):
        raise ValueError(f"{fn}: pids must be ({image_feats.shape[0]},), got {tuple(pids.shape)}")


def _same_pid(pids: Tensor) -> Tensor:
    """(B, B) bool, True where two batch rows share an identity (diagonal included)."""
    pids = pids.reshape(-1)
    return pids[:, None] == pids[None, :]


def _true_match_distribution(pids: Tensor) -> Tensor:
    """q_ij = y_ij / sum_k y_ik: the normalised true-match distribution of SDM and CMPM."""
    y = _same_pid(pids).float()
    return y / y.sum(dim=1, keepdim=True)


def _kl_rows(logits: Tensor, q: Tensor, eps: float) -> Tensor:
    """Per-row KL(p_i || q_i) with p = softmax(logits); (B,).

    log p comes from log_softmax (exact where p underflows); eps sits only inside log q, where
    q_ij = 0 for every non-match.
    """
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(q + eps))).sum(dim=1)


def _cosine(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """(B, B) cosine similarities, rows images, columns texts."""
    return F.normalize(image_feats.float(), dim=-1) @ F.normalize(text_feats.float(), dim=-1).t()


# --------------------------------------------------------------------------- IRRA / FMFA global terms


def sdm(
    image_feats: Tensor, text_feats: Tensor, pids: Tensor, temperature: float = 0.02, eps: float = 1e-8
) -> Tensor:
    """Similarity distribution matching (IRRA, Jiang & Ye CVPR 2023, Eq. 1-4).

    With s_ij = cos(v_i, t_j), p_ij = softmax_j(s_ij / tau), q_ij = y_ij / sum_k y_ik::

        L_i2t = 1/B sum_i sum_j p_ij (log p_ij - log(q_ij + eps))
        L_t2i = the same on the rows of s^T
        L_sdm = L_i2t + L_t2i

    Args:
        image_feats: (B, D) image embeddings (normalised here).
        text_feats: (B, D) text embeddings (normalised here).
        pids: (B,) identity labels.
        temperature: tau (``loss.temperature``).
        eps: added to q inside the log.

    Returns:
        Scalar loss.
    """
    _check_pair("sdm", image_feats, text_feats, pids)
    s = _cosine(image_feats, text_feats)  # (B, B) image rows
    q = _true_match_distribution(pids)  # symmetric in pid, so the same for both directions
    return _kl_rows(s / temperature, q, eps).mean() + _kl_rows(s.t() / temperature, q, eps).mean()


def _a_sdm_weight(logits: Tensor, alpha: float) -> Tensor:
    """w_i = alpha * (max_k p_ik - p_ii) + 1 on detached probabilities; (B,)."""
    p = F.softmax(logits.detach(), dim=1)
    return alpha * (p.max(dim=1).values - p.diagonal()) + 1.0


def _a_sdm_code_weight(cos: Tensor, same: Tensor, scale: float) -> Tensor:
    """The authors' row weight on one direction's (B, B) cosines, gradient kept; (B,).

    m_i = argmax_k cos_ik, l_i = first column with the row's identity;
    w_i = 1 + scale * (cos_im - cos_il) where m_i != l_i, else exactly 1.
    """
    n = cos.shape[1]
    rows = torch.arange(cos.shape[0], device=cos.device)
    cols = torch.arange(n, device=cos.device).expand_as(same)
    first_pos = torch.where(same, cols, n).amin(dim=1)  # (B,)
    most_similar = cos.argmax(dim=1)  # (B,) first maximum on ties, as torch.argmax
    gap = cos[rows, most_similar] - cos[rows, first_pos]
    return 1.0 + scale * torch.where(most_similar != first_pos, gap, torch.zeros_like(gap))


_A_SDM_FORMS = ("paper", "code")


def a_sdm(
    image_feats: Tensor,
    text_feats: Tensor,
    pids: Tensor,
    temperature: float = 0.02,
    alpha: float = 10.0,
    eps: float = 1e-8,
    form: str = "code",
    code_scale: float = 0.1,
) -> Tensor:
    """Adaptive similarity distribution matching (FMFA, A-SDM), paper or authors' code form.

    SDM whose per-row KL terms are re-weighted so that rows whose positive is not ranked first
    ("unmatched positive pairs") pull harder. Both forms compute, per direction,
    ``1/B sum_i w_i KL(p_i || q_i)`` (p, q, eps exactly as in ``sdm``; the weight multiplies
    each row's KL before the mean over rows) and add the i2t and t2i directions; each direction
    has its own weights, computed from its own rows (image rows of s for i2t, text rows of s^T
    for t2i). They differ only in the weight w_i:

    ``form="paper"`` (the paper's formula)::

        w_i = alpha * (max_k p_ik - p_ii) + 1        on probabilities p = softmax(s / tau)

      - compared against the row's own pair (i, i);
      - on detached probabilities: a per-row coefficient, no gradient through w;
      - ``alpha`` is the paper's alpha (10; 1 on RSTPReid), ``loss.a_sdm_alpha``.
      When p_ii is the row maximum, w_i is exactly 1, so a batch where every own pair ranks
      first gives exactly SDM.

    ``form="code"`` (default; the authors' code, github.com/yinhao1102/FMFA,
    ``model/objectives.py::compute_sdm(..., use_weight=True)``, called from
    ``model/build_finetune.py`` with ``use_weight=args.sdm_loss_use_weight``, whose argparse
    default is True and cannot be switched off: ``store_true`` with ``default=True``)::

        m_i = argmax_k s_ik,  l_i = first column k with pid_k == pid_i
        w_i = 1 + code_scale * (s_im - s_il)   if m_i != l_i,   else 1
                                                  on cosines s, not probabilities

      Differences from the paper form, each as in the code:

      - the gap is measured on cosine similarities, not on softmax probabilities;
      - the reference column is the first same-identity column of the batch (``argmax`` of
        the label row), not the row's own pair; so a row whose own pair ranks first but is not
        the first column of its identity gets w > 1 when that first column ranks lower, and a row
        whose top item is another true match (same pid, not the first one) also gets w > 1;
      - the strength is a constant 0.1 hard-coded in the code, the same for both directions
        (``code_scale`` here); ``alpha`` is ignored in this form (commented-out code nearby
        derived the scale from the largest gap via log10; it is dead code);
      - the weight is NOT detached: the gradient flows through s_im and s_il in w as well as
        through the KL.

    Args:
        image_feats: (B, D) image embeddings (normalised here).
        text_feats: (B, D) text embeddings (normalised here).
        pids: (B,) identity labels.
        temperature: tau (``loss.temperature``; the code's ``logit_scale`` is 1 / 0.02).
        alpha: the paper's weight strength (``loss.a_sdm_alpha``); ``form="paper"`` only.
        eps: added to q inside the log.
        form: ``"code"`` (default, the authors' code) or ``"paper"``.
        code_scale: the code's hard-coded 0.1; ``form="code"`` only.

    Returns:
        Scalar loss.
    """
    if form not in _A_SDM_FORMS:
        raise ValueError(f"a_sdm: form must be one of {_A_SDM_FORMS}, got {form!r}")
    _check_pair("a_sdm", image_feats, text_feats, pids)
    s = _cosine(image_feats, text_feats)  # (B, B) image rows
    q = _true_match_distribution(pids)
    i2t, t2i = s / temperature, s.t() / temperature
    if form == "paper":
        w_i2t, w_t2i = _a_sdm_weight(i2t, alpha), _a_sdm_weight(t2i, alpha)
    else:
        same = _same_pid(pids)  # symmetric, so the first positive is the same in both directions
        w_i2t = _a_sdm_code_weight(s, same, code_scale)
        w_t2i = _a_sdm_code_weight(s.t(), same, code_scale)
    loss_i2t = (w_i2t * _kl_rows(i2t, q, eps)).mean()
    loss_t2i = (w_t2i * _kl_rows(t2i, q, eps)).mean()
    return loss_i2t + loss_t2i


def id_loss(
    classifier: Callable[[Tensor], Tensor], image_feats: Tensor, text_feats: Tensor, pids: Tensor
) -> Tensor:
    """Identity loss: one classifier shared by both modalities (IRRA; Zheng et al. instance loss).

    ``L_id = (CE(W v, pid) + CE(W t, pid)) / 2`` over the batch. IRRA applies it to the
    projected, un-normalised features; pass those.

    Args:
        classifier: maps (B, D) to (B, num_identities) logits (e.g. an ``nn.Linear``).
        image_feats: (B, D).
        text_feats: (B, D).
        pids: (B,) identity labels in ``[0, num_identities)``.

    Returns:
        Scalar loss.
    """
    _check_pair("id_loss", image_feats, text_feats, pids)
    image_logits = classifier(image_feats).float()
    text_logits = classifier(text_feats).float()
    return (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2


def mlm(logits: Tensor, labels: Tensor) -> Tensor:
    """Masked language modelling: cross-entropy over the predicted positions only.

    Args:
        logits: (B, L, V) vocabulary scores.
        labels: (B, L) original token id at masked positions, -100 elsewhere.

    Returns:
        Mean cross-entropy over positions with ``label != -100``; 0 (still attached to the graph)
        when no position is labelled.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"mlm: logits must be (B, L, V) and labels (B, L); got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    flat_labels = labels.reshape(-1)
    if not bool((flat_labels != -100).any()):
        # F.cross_entropy would return 0/0 = NaN when every position is ignored.
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat_labels, ignore_index=-100)


# --------------------------------------------------------------------------- FMFA explicit alignment


def _word_token_mask(text_mask: Tensor, exclude_special: bool) -> Tensor:
    """Tokens EFA aligns: real tokens, without the first (BOS) and last (EOS) real token.

    A caption with no token between BOS and EOS keeps BOS and EOS so it still has a score.
    """
    valid = text_mask.bool()  # (B, L)
    if not bool(valid.any(dim=1).all()):
        bad = (~valid.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"efa: text_mask rows {bad} have no real token")
    if not exclude_special:
        return valid
    length = valid.shape[1]
    pos = torch.arange(length, device=valid.device).expand_as(valid)
    first = torch.where(valid, pos, length).min(dim=1, keepdim=True).values
    last = torch.where(valid, pos, -1).max(dim=1, keepdim=True).values
    words = valid & (pos != first) & (pos != last)
    empty = ~words.any(dim=1, keepdim=True)
    return torch.where(empty, valid, words)


def _sparse_token_patch_weights(sim: Tensor, eps: float) -> Tensor:
    """Row-wise min-max normalise, zero entries <= 1/N, renormalise rows to sum 1.

    Args:
        sim: (B, L, N) token-to-patch similarities of matched pairs.

    Returns:
        (B, L, N) weights; a row with no spread (max == min) falls back to uniform 1/N.
    """
    n = sim.shape[-1]
    lo = sim.amin(dim=-1, keepdim=True)
    hi = sim.amax(dim=-1, keepdim=True)
    scaled = (sim - lo) / (hi - lo).clamp_min(eps)  # (B, L, N) in [0, 1]
    sparse = torch.where(scaled > 1.0 / n, scaled, torch.zeros_like(scaled))
    total = sparse.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, sparse / total.clamp_min(eps), torch.full_like(sparse, 1.0 / n))


def _lse_hinge(scores: Tensor, margin: float, negatives: Tensor) -> Tensor:
    """Log-sum-exp hinge anchored on rows and on columns of a (B, B) score matrix.

    Row anchor a (positive ``scores[a, a]``): ``log(1 + sum_{b in neg(a)} exp(s_ab - s_aa + m))``,
    a smooth version of ``max(0, max_b (s_ab - s_aa + m))``; column anchor b likewise with
    ``s_bb``. Returns mean over rows + mean over columns.
    """
    pos = scores.diagonal()
    zero = scores.new_zeros(scores.shape[0], 1)
    neg_inf = torch.full_like(scores, float("-inf"))
    by_row = torch.where(negatives, scores - pos[:, None] + margin, neg_inf)
    by_col = torch.where(negatives, scores - pos[None, :] + margin, neg_inf).t()
    row = torch.logsumexp(torch.cat([zero, by_row], dim=1), dim=1)
    col = torch.logsumexp(torch.cat([zero, by_col], dim=1), dim=1)
    return row.mean() + col.mean()


def _no_gather(t: Tensor) -> Tensor:
    return t


def _lse_pool_best_match(
    queries: Tensor, query_mask: Tensor, joint: Tensor, joint_mask: Tensor, tau: float
) -> Tensor:
    """Pair scores between every query set a and every joint set b; (A, B) for A query sets.

    For each query token of set a, the best-matching joint embedding of set b ("hard coding":
    max over b's valid joint embeddings), then log-sum-exp pooling over a's valid tokens:
    ``S(a, b) = tau * log sum_l exp(max_m cos(x_al, j_bm) / tau)``.
    """
    sim = torch.einsum("ald,bmd->ablm", queries, joint)  # (B, B, Lq, Lj)
    sim = sim.masked_fill(~joint_mask[None, :, None, :], float("-inf"))
    best = sim.amax(dim=-1)  # (B, B, Lq)
    best = best.masked_fill(~query_mask[:, None, :], float("-inf"))
    return tau * torch.logsumexp(best / tau, dim=-1)


def _efa_code_scores(queries: Tensor, joint: Tensor, temperature: float) -> Tensor:
    """The authors' EFA pair scores, rows L2-normalised; (B, B).

    ``S(a, b) = log sum_l exp(max_m cos(x_al, j_bm) / T)`` over every position l of query set a
    and every position m of joint set b (no masks, no factor T), then each row ``S(a, :)``
    divided by its L2 norm.
    """
    sim = torch.einsum("ald,bmd->ablm", F.normalize(queries, dim=-1), F.normalize(joint, dim=-1))
    sims = torch.logsumexp(sim.amax(dim=-1) / temperature, dim=-1)  # (B, B)
    return F.normalize(sims, dim=-1)


def _efa_code_hinge(scores: Tensor, margin: float) -> Tensor:
    """The authors' two log-sum-exp hinges on a (B, B) score matrix, both summed over axis 0.

    ``r[a, b] = S[a, b] - S[a, a] + m`` and ``c[a, b] = S[a, b] - S[b, b] + m``, diagonals set
    to 0 (the "1 +" term); ``cost_r[b] = log sum_a exp(r[a, b])``,
    ``cost_c[b] = log sum_a exp(c[a, b])``; returns mean(cost_c) + mean(cost_r).
    """
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    diag = scores.diagonal()
    zero = torch.zeros_like(scores)
    row_anchored = torch.where(eye, zero, scores - diag[:, None] + margin)
    col_anchored = torch.where(eye, zero, scores - diag[None, :] + margin)
    return torch.logsumexp(col_anchored, dim=0).mean() + torch.logsumexp(row_anchored, dim=0).mean()


_EFA_FORMS = ("paper", "code")


def efa(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    margin_text: float | None = None,
    margin_image: float | None = None,
    pids: Tensor | None = None,
    pool_temperature: float | None = None,
    exclude_special: bool = True,
    eps: float = 1e-8,
    form: str = "code",
    scope: BatchScope | None = None,
) -> Tensor:
    """Explicit fine-grained alignment (FMFA, EFA), paper or authors' code form.

    Inputs are token-level encoder outputs of a batch of B matched pairs (image i with caption i).
    ``form="paper"`` is described first; ``form="code"`` (the default) after it, as a list of
    the places where it differs.

    **Paper form** (the paper's full text was not available offline; this form follows the
    issue's description of it). All tokens are L2-normalised first. Which tokens take part:

    - image: every patch token given. Pass patch tokens only, without the class token (the
      class token is the global embedding that SDM / A-SDM already align).
    - text: positions where ``text_mask`` is 1 (padding excluded); with ``exclude_special``
      (default) also the first and the last real token of each caption, i.e. BOS and EOS of the
      batch contract (BOS starts every caption and carries no word of it; EOS
      is the pooled sentence embedding). A caption with nothing between BOS and EOS keeps them.

    Algorithm, per matched pair i (text tokens t_i1..t_iL, patches v_i1..v_iN):

    1. ``A_lk = cos(t_il, v_ik)``, (L, N).
    2. Sparsify each row (one text token): min-max normalise over patches, set entries
       ``<= 1/N`` to zero, renormalise the row to sum 1 -> weights ``W_lk`` (a row with no
       spread becomes uniform).
    3. Joint embeddings ``j_il = sum_k W_lk v_ik`` (one per text token), then L2-normalised
       (which makes the renormalisation of step 2 immaterial to the loss; it is kept so the
       weights are the paper's).

    Pair scores across the batch (query set a against the joint embeddings of pair b), with
    "hard coding" (each query token keeps only its best joint embedding) and log-sum-exp pooling
    at temperature tau (``pool_temperature``, default 0.1)::

        S_t(a, b) = tau * log sum_{l in text a} exp( max_{m in joint b} cos(t_al, j_bm) / tau )
        S_v(a, b) = tau * log sum_{n in image a} exp( max_{m in joint b} cos(v_an, j_bm) / tau )

    Loss: the log-sum-exp hinge, for text->joint (margin ``margin_text``, default 0.1) and
    image->joint (margin ``margin_image``, default 0.1), each anchored both on rows (query a vs
    the other pairs' joints) and on columns (joint b vs the other pairs' queries)::

        h(a) = log(1 + sum_{b in neg(a)} exp(S(a, b) - S(a, a) + margin))
        L_X = mean_a h_row(a) + mean_b h_col(b)           X in {t, v}
        L_efa = L_t + L_v

    Negatives are all b != a; with ``pids`` given, pairs of the same identity are not negatives
    (they are excluded, not pulled). An anchor without negatives contributes log 1 = 0.
    Paper margins (text/image): CUHK-PEDES 0.1/0.1, ICFG-PEDES 0.2/1.0, RSTPReid 0.2/0.8.

    **Code form** (github.com/yinhao1102/FMFA: the ``'efa'`` branch of ``IRRA.forward`` in
    ``model/build_finetune.py``, the model ``finetune.sh`` trains, and
    ``model/objectives.py::compute_minmax_info_loss`` /
    ``compute_infonce_loss_cosine``). Differences from the paper form, step by step:

    1. Tokens: every position of ``text_tokens`` takes part, as the code uses all 77 positions
       of CLIP's context (BOS, words, EOS and the padding positions, whose encoder outputs are
       ordinary vectors under the causal mask): ``text_mask`` is only validated and
       ``exclude_special`` is ignored. Patch tokens as in the paper form.
    2. ``A_lk`` is the dot product of the un-normalised tokens (the projected encoder outputs),
       not the cosine.
    3. Sparsification as in the paper form (min-max, ``> 1/N``, rows renormalised). The code
       divides by ``max - min`` and by the row sum without a guard (NaN for a row with no
       spread); here the ``eps`` guard and the uniform fallback of the paper form stay, which
       only changes such degenerate rows.
    4. Joint embeddings ``j_il = sum_k W_lk v_ik`` aggregate the un-normalised patches (the
       scores normalise them anyway).
    5. Scores: ``S(a, b) = log sum_l exp(max_m cos(x_al, j_bm) / T)`` with T = 1 (the
       ``temperature=1.0`` default of ``compute_infonce_loss_cosine``; ``pool_temperature``
       defaults to 1.0 in this form) and no factor T in front, over all L query positions and
       all L joint positions of b (step 1).
    6. Each row ``S(a, :)`` of the (B, B) score matrix is divided by its L2 norm before the
       hinge (``F.normalize(sims, dim=-1)``). As the pooled scores are all about log L + 1,
       the normalised entries are all close to 1/sqrt(B) and their differences small: this is
       what makes the code's gradient much smaller than the paper form's.
    7. Hinge: with ``r[a, b] = S[a, b] - S[a, a] + m`` and ``c[a, b] = S[a, b] - S[b, b] + m``
       and both diagonals set to 0 (not excluded: exp(0) is the "1 +" of the hinge), the code
       returns ``mean_b log sum_a exp(c[a, b]) + mean_b log sum_a exp(r[a, b])``. The first is
       the paper's column-anchored hinge. The second (the code's "image retrieval" cost) sums
       the row-anchored violations over axis 0, i.e. for each column b it collects the
       violations ``S[a, b] - S[a, a]`` of all anchors a against the negative b, instead of
       each row anchor's violations against its negatives (a quirk: it is not the row-anchored
       hinge of the paper form).
    8. Same-identity pairs are ordinary negatives (no identity handling in the code): ``pids``
       is only shape-checked.
    9. Margins are hard-coded in ``compute_minmax_info_loss``: 0.1 for text tokens -> joint
       and 0.9 for patch tokens -> joint (its own ``margin`` argument is unused); they are the
       hinge margins of step 7, applied to the row-normalised scores of step 6. In this form
       ``margin_text`` / ``margin_image`` default to 0.1 / 0.9; values passed are used as
       given.
    10. Precision: the code runs EFA on the fp16 encoder outputs; here, as every loss of this
        module, in float32.

    Args:
        image_tokens: (B, N, D) patch tokens (no class token).
        text_tokens: (B, L, D) text tokens (all context positions; the code form uses them all).
        text_mask: (B, L) 1 on real tokens (BOS..EOS), 0 on padding.
        margin_text: text->joint margin (``loss.efa_margin_text``); None: 0.1 (both forms).
        margin_image: image->joint margin (``loss.efa_margin_image``); None: 0.1 (paper form),
            0.9 (code form).
        pids: optional (B,) identities; paper form: same-identity pairs are then not
            negatives. Ignored by the code form.
        pool_temperature: tau of the log-sum-exp pooling; None: 0.1 (paper form, with the
            factor tau in front), 1.0 (code form, without it).
        exclude_special: drop the first and last real token (BOS, EOS) of each caption (paper
            form only).
        eps: guards the min-max and row-sum divisions.
        form: ``"code"`` (default, the authors' code) or ``"paper"``.
        scope: with a ``tpr_core.distributed`` scope, the token inputs and ``pids`` are this
            rank's rows and the loss is that of the global batch: each rank pools its own query
            sets against the gathered joint embeddings, and the (B, B) score matrices are
            gathered by rows (each rank then holds what one process computes, at 1/world of
            the pair-scoring cost). None: the inputs are the whole batch.

    Returns:
        Scalar loss.
    """
    if form not in _EFA_FORMS:
        raise ValueError(f"efa: form must be one of {_EFA_FORMS}, got {form!r}")
    if image_tokens.dim() != 3 or text_tokens.dim() != 3:
        raise ValueError(
            f"efa: image_tokens must be (B, N, D) and text_tokens (B, L, D); got "
            f"{tuple(image_tokens.shape)} and {tuple(text_tokens.shape)}"
        )
    b, _, d = image_tokens.shape
    if text_tokens.shape[0] != b or text_tokens.shape[2] != d:
        raise ValueError(
            f"efa: image_tokens {tuple(image_tokens.shape)} and text_tokens {tuple(text_tokens.shape)} "
            "must agree on batch size and width"
        )
    if text_mask.shape != text_tokens.shape[:2]:
        raise ValueError(
            f"efa: text_mask must be {tuple(text_tokens.shape[:2])}, got {tuple(text_mask.shape)}"
        )
    if pids is not None and pids.shape != (b,):
        raise ValueError(f"efa: pids must be ({b},), got {tuple(pids.shape)}")

    # With a scope, the inputs are this rank's rows: each rank scores its own query sets against
    # the gathered joint embeddings of the global batch, and the (B, B) score matrices are
    # gathered by rows, so every rank holds what one process computes at 1/world of the cost.
    gather = scope if scope is not None else _no_gather
    if form == "code":
        _word_token_mask(text_mask, exclude_special=False)  # validation only: every row has a token
        m_text = 0.1 if margin_text is None else margin_text
        m_image = 0.9 if margin_image is None else margin_image
        temp = 1.0 if pool_temperature is None else pool_temperature
        raw_patches = image_tokens.float()  # (b, N, D)
        raw_tokens = text_tokens.float()  # (b, L, D), every position
        weights = _sparse_token_patch_weights(raw_tokens @ raw_patches.transpose(1, 2), eps)
        joint = gather(weights @ raw_patches)  # (B, L, D), un-normalised
        s_text = gather(_efa_code_scores(raw_tokens, joint, temp))  # (B, B)
        s_image = gather(_efa_code_scores(raw_patches, joint, temp))  # (B, B)
        return _efa_code_hinge(s_text, m_text) + _efa_code_hinge(s_image, m_image)

    margin_text = 0.1 if margin_text is None else margin_text
    margin_image = 0.1 if margin_image is None else margin_image
    pool_temperature = 0.1 if pool_temperature is None else pool_temperature
    words = _word_token_mask(text_mask, exclude_special)  # (b, L)
    all_words = gather(words.to(torch.uint8)).bool()  # (B, L)
    # Captions are padded to the context length (77 for CLIP); the (B, B, N, L) similarity
    # tensors below only need the columns some caption of the global batch uses.
    span = int(all_words.any(dim=0).nonzero().max()) + 1
    words, all_words = words[:, :span], all_words[:, :span]
    patches = F.normalize(image_tokens.float(), dim=-1)  # (b, N, D)
    tokens = F.normalize(text_tokens[:, :span].float(), dim=-1)  # (b, L', D)
    patch_mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)  # (b, N)

    weights = _sparse_token_patch_weights(tokens @ patches.transpose(1, 2), eps)  # (b, L, N)
    # (B, L, D) one joint embedding per text token, of every pair of the global batch
    joint = gather(F.normalize(weights @ patches, dim=-1))

    s_text = gather(_lse_pool_best_match(tokens, words, joint, all_words, pool_temperature))  # (B, B)
    s_image = gather(_lse_pool_best_match(patches, patch_mask, joint, all_words, pool_temperature))  # (B, B)

    negatives = ~torch.eye(s_text.shape[0], dtype=torch.bool, device=patches.device)
    if pids is not None:
        negatives = negatives & ~_same_pid(gather(pids))
    return _lse_hinge(s_text, margin_text, negatives) + _lse_hinge(s_image, margin_image, negatives)


# --------------------------------------------------------------------------- UIT


def triplet(image_feats: Tensor, text_feats: Tensor, pids: Tensor, margin: float = 0.05) -> Tensor:
    """Cross-modal triplet loss with the hardest negative (UIT / SEN, Liu et al.).

    With s_ij = cos(t_i, v_j) (normalised features), the positive of anchor i is its matched
    pair (i, i) and the negative the most similar item of the other modality with a different
    identity::

        text anchor i:  l_i = relu(m - s_ii + max_{j: pid_j != pid_i} s_ij)
        image anchor i: l_i = relu(m - s_ii + max_{j: pid_j != pid_i} s_ji)
        L = mean over text anchors + mean over image anchors

    (The sum of the two directions' means, as in the authors' code, where the distances
    ``1 - cos`` give the same hinge.) Anchors whose batch holds no other identity have no
    negative and are left out of their mean; a batch of a single identity gives 0.

    Args:
        image_feats: (B, D).
        text_feats: (B, D).
        pids: (B,) identity labels.
        margin: ``loss.triplet_margin`` (UIT: 0.05).

    Returns:
        Scalar loss.
    """
    _check_pair("triplet", image_feats, text_feats, pids)
    s = _cosine(text_feats, image_feats)  # (B, B) text rows, image columns
    pos = s.diagonal()
    other = ~_same_pid(pids)
    has_neg = other.any(dim=1)
    neg_inf = torch.full_like(s, float("-inf"))
    hardest_image = torch.where(other, s, neg_inf).amax(dim=1)  # per text anchor
    hardest_text = torch.where(other, s.t(), neg_inf).amax(dim=1)  # per image anchor
    if not bool(has_neg.any()):
        return s.sum() * 0.0
    text_anchor = F.relu(margin - pos + hardest_image)[has_neg].mean()
    image_anchor = F.relu(margin - pos + hardest_text)[has_neg].mean()
    return text_anchor + image_anchor


def restore(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error on the masked patches only (UIT text-guided image restoration).

    ``L = sum_{b,n} mask_bn * mean_p (pred_bnp - target_bnp)^2 / sum_{b,n} mask_bn``, i.e. the
    mean over masked patches and their pixel values. Unmasked patches never count.

    Args:
        pred: (B, N, P) predicted patch pixels.
        target: (B, N, P) target patch pixels (the colour image, patchified).
        mask: (B, N) bool or 0/1, 1 where the patch was dropped from the input.

    Returns:
        Scalar loss; 0 (attached to the graph) when no patch is masked.
    """
    if pred.dim() != 3 or pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"restore: pred and target must be the same (B, N, P) and mask (B, N); got pred "
            f"{tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)}"
        )
    m = mask.float()
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    # The weighted sum (not indexing) keeps the loss exactly independent of unmasked predictions.
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- IVT


_LABEL_NORMS = ("sum", "l2")


def cmpm(
    image_feats: Tensor, text_feats: Tensor, pids: Tensor, eps: float = 1e-8, label_norm: str = "sum"
) -> Tensor:
    """Cross-modal projection matching (Zhang & Lu ECCV 2018), IVT's alignment loss.

    Each embedding is projected on the normalised embeddings of the other modality (no
    temperature; the image's norm acts as one)::

        p_ij = softmax_j(v_i^T t_j / ||t_j||),  q_ij = y_ij / norm(y_i)
        L_i2t = 1/B sum_i sum_j p_ij (log p_ij - log(q_ij + eps))
        L_t2i = the same with t_i^T v_j / ||v_j||
        L_cmpm = L_i2t + L_t2i

    ``label_norm`` picks norm(y_i):

    - ``"sum"`` (default; the CMPM paper): ``sum_k y_ik``, so q_i is a distribution and each
      term a KL divergence.
    - ``"l2"`` (the IVT code, ``loss/cmps_loss.py::Loss.forward``, and IRRA / FMFA
      ``model/objectives.py::compute_cmpm``: ``labels_mask / labels_mask.norm(dim=1)``):
      ``sqrt(sum_k y_ik)``, so with n items of one identity in the batch q_ij = 1/sqrt(n) and
      the row sums to sqrt(n), not 1 (the terms are then not KL divergences and can be
      negative). Identical to "sum" when every identity appears once. eps sits in the same place
      in both forms, inside the log, ``log(q + eps)``, with the code's 1e-8. (The code divides
      the (B, B) mask by the (B,) vector of row norms, i.e. column j by the norm of row j; as
      the mask is symmetric this equals row i's norm wherever y_ij = 1.)

    For IVT's three levels (sentence, phrase, word) see ``mla``.

    Args:
        image_feats: (B, D) image embeddings (not normalised: the norm matters here).
        text_feats: (B, D) text embeddings (not normalised).
        pids: (B,) identity labels.
        eps: added to q inside the log.
        label_norm: ``"sum"`` (default, the paper) or ``"l2"`` (the authors' code).

    Returns:
        Scalar loss.
    """
    if label_norm not in _LABEL_NORMS:
        raise ValueError(f"cmpm: label_norm must be one of {_LABEL_NORMS}, got {label_norm!r}")
    _check_pair("cmpm", image_feats, text_feats, pids)
    v, t = image_feats.float(), text_feats.float()
    if label_norm == "sum":
        q = _true_match_distribution(pids)
    else:
        y = _same_pid(pids).float()
        q = y / y.sum(dim=1, keepdim=True).sqrt()
    image_proj_text = v @ F.normalize(t, dim=-1).t()  # (B, B)
    text_proj_image = t @ F.normalize(v, dim=-1).t()  # (B, B)
    return _kl_rows(image_proj_text, q, eps).mean() + _kl_rows(text_proj_image, q, eps).mean()


_MLA_FORMS = ("joint", "separate")


def mla(
    image_feats_per_level: list[Tensor],
    text_feats_per_level: list[Tensor],
    pids: Tensor,
    form: str = "joint",
    label_norm: str = "sum",
    eps: float = 1e-8,
) -> Tensor:
    """IVT multi-level alignment: CMPM over the sentence, phrase and word levels.

    Level k pairs the image embeddings ``image_feats_per_level[k]`` (B, D) with the text
    embeddings ``text_feats_per_level[k]`` (B, D); row i of every level is the same pair
    (identity ``pids[i]``).

    - ``form="joint"`` (default; the IVT code): ONE ``cmpm`` over the K levels concatenated,
      K*B image rows against K*B text rows with the pids repeated K times
      (``torch.cat([pid, pid, pid])``). Every row of an identity, at any level, is then a true
      match of every other: the softmax of a row runs over all K*B items and the target spreads
      over the K * n_i items of its identity.
    - ``form="separate"``: ``sum_k cmpm(image_k, text_k, pids)``, one CMPM per level over B
      rows (what calling ``cmpm`` once per level gives, e.g. with one image embedding for all
      levels).

    In the authors' code (github.com/TencentYoutuResearch/PersonRetrieval-IVT,
    ``processor/processor.py::do_train_cuhkpedes_uvt_level_data`` and its ICFG / RSTPReid
    twins, loss ``loss/cmps_loss.py::Loss``), the batch holds three independent draws
    ``img1, img2, img3`` of the same training transform of one image (resize, pad 10, random
    crop, random horizontal flip p=0.5, normalise, random erasing p=0.5; ``datasets/bases.py``,
    ``datasets/make_dataloader.py``); the texts are ``word + phrase + sentence`` (in that
    order) and the images ``cat([img1, img2, img3])``, so img1 goes with the word level, img2
    with the phrase level and img3 with the sentence level, and ``out_vis, out_txt`` (3B rows
    each) go through one CMPM with ``label_norm="l2"``. The exact authors' form is therefore
    ``form="joint", label_norm="l2"`` with one augmented view per level. The joint loss does
    not depend on the order of the levels.

    Args:
        image_feats_per_level: K tensors (B, D), the image view paired with each level.
        text_feats_per_level: K tensors (B, D), the text embeddings of each level.
        pids: (B,) identity labels.
        form: ``"joint"`` (default) or ``"separate"``.
        label_norm: passed to ``cmpm`` (``"sum"`` default, ``"l2"`` as the code).
        eps: passed to ``cmpm``.

    Returns:
        Scalar loss.
    """
    if form not in _MLA_FORMS:
        raise ValueError(f"mla: form must be one of {_MLA_FORMS}, got {form!r}")
    images, texts = list(image_feats_per_level), list(text_feats_per_level)
    if not images or len(images) != len(texts):
        raise ValueError(
            f"mla: image_feats_per_level and text_feats_per_level must be non-empty lists of the "
            f"same length; got {len(images)} and {len(texts)}"
        )
    for k, (v, t) in enumerate(zip(images, texts, strict=True)):
        _check_pair(f"mla (level {k})", v, t, pids)
    if form == "separate":
        total = cmpm(images[0], texts[0], pids, eps=eps, label_norm=label_norm)
        for v, t in zip(images[1:], texts[1:], strict=True):
            total = total + cmpm(v, t, pids, eps=eps, label_norm=label_norm)
        return total
    repeated = torch.cat([pids.reshape(-1)] * len(images))
    return cmpm(torch.cat(images), torch.cat(texts), repeated, eps=eps, label_norm=label_norm)
