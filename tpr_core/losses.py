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

__all__ = ["a_sdm", "cmpm", "efa", "id_loss", "mlm", "restore", "sdm", "triplet"]


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


def a_sdm(
    image_feats: Tensor,
    text_feats: Tensor,
    pids: Tensor,
    temperature: float = 0.02,
    alpha: float = 10.0,
    eps: float = 1e-8,
) -> Tensor:
    """Adaptive similarity distribution matching (FMFA, A-SDM).

    SDM whose per-row KL terms are re-weighted so that rows whose own pair is not ranked first
    ("unmatched positive pairs") pull harder::

        w_i = alpha * (max_k p_ik - p_ii) + 1        (p as in SDM, per direction)
        L = 1/B sum_i w_i^{i2t} KL(p_i^{i2t} || q_i) + 1/B sum_i w_i^{t2i} KL(p_i^{t2i} || q_i)

    Row i's own pair is (i, i): image i and caption i of the batch. When p_ii is the row maximum,
    w_i is exactly 1, so a batch where every own pair ranks first gives exactly SDM.

    The weight is computed on detached probabilities: it is a per-row coefficient, as in the
    paper, not a term to optimise (with gradient, the loss could also fall by raising p_ii
    through w_i, which would double-count SDM's own pull).

    Differences from the authors' code (github.com/yinhao1102/FMFA, ``compute_a_sdm``), where we
    follow the issue's formula on probabilities: the code measures the gap on cosine
    similarities (cos of the row's argmax minus cos of the first same-pid column), uses separate
    alphas for the two directions, and compares against the first same-identity column rather
    than the pair's own column.

    Args:
        image_feats: (B, D) image embeddings (normalised here).
        text_feats: (B, D) text embeddings (normalised here).
        pids: (B,) identity labels.
        temperature: tau (``loss.temperature``).
        alpha: weight strength (``loss.a_sdm_alpha``).
        eps: added to q inside the log.

    Returns:
        Scalar loss.
    """
    _check_pair("a_sdm", image_feats, text_feats, pids)
    s = _cosine(image_feats, text_feats)  # (B, B) image rows
    q = _true_match_distribution(pids)
    i2t, t2i = s / temperature, s.t() / temperature
    loss_i2t = (_a_sdm_weight(i2t, alpha) * _kl_rows(i2t, q, eps)).mean()
    loss_t2i = (_a_sdm_weight(t2i, alpha) * _kl_rows(t2i, q, eps)).mean()
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


def _lse_pool_best_match(
    queries: Tensor, query_mask: Tensor, joint: Tensor, joint_mask: Tensor, tau: float
) -> Tensor:
    """Pair scores between every query set a and every joint set b; (B, B).

    For each query token of set a, the best-matching joint embedding of set b ("hard coding":
    max over b's valid joint embeddings), then log-sum-exp pooling over a's valid tokens:
    ``S(a, b) = tau * log sum_l exp(max_m cos(x_al, j_bm) / tau)``.
    """
    sim = torch.einsum("ald,bmd->ablm", queries, joint)  # (B, B, Lq, Lj)
    sim = sim.masked_fill(~joint_mask[None, :, None, :], float("-inf"))
    best = sim.amax(dim=-1)  # (B, B, Lq)
    best = best.masked_fill(~query_mask[:, None, :], float("-inf"))
    return tau * torch.logsumexp(best / tau, dim=-1)


def efa(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    margin_text: float = 0.1,
    margin_image: float = 0.1,
    pids: Tensor | None = None,
    pool_temperature: float = 0.1,
    exclude_special: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Explicit fine-grained alignment (FMFA, EFA).

    Inputs are token-level encoder outputs of a batch of B matched pairs (image i with caption i).
    All tokens are L2-normalised first. Which tokens take part:

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
    at temperature tau (``pool_temperature``)::

        S_t(a, b) = tau * log sum_{l in text a} exp( max_{m in joint b} cos(t_al, j_bm) / tau )
        S_v(a, b) = tau * log sum_{n in image a} exp( max_{m in joint b} cos(v_an, j_bm) / tau )

    Loss: the log-sum-exp hinge, for text->joint (margin ``margin_text``) and image->joint
    (margin ``margin_image``), each anchored both on rows (query a vs the other pairs' joints) and
    on columns (joint b vs the other pairs' queries)::

        h(a) = log(1 + sum_{b in neg(a)} exp(S(a, b) - S(a, a) + margin))
        L_X = mean_a h_row(a) + mean_b h_col(b)           X in {t, v}
        L_efa = L_t + L_v

    Negatives are all b != a; with ``pids`` given, pairs of the same identity are not negatives
    (they are excluded, not pulled). An anchor without negatives contributes log 1 = 0.
    Paper defaults for the margins (text/image): CUHK-PEDES 0.1/0.1, ICFG-PEDES 0.2/1.0,
    RSTPReid 0.2/0.8.

    The paper's full text was not available offline; this follows the issue's description and
    the structure of the authors' code (github.com/yinhao1102/FMFA, ``model/build.py`` and
    ``objectives.compute_efa``), with these differences, all deliberate:

    - The code computes the token-patch weights on un-normalised tokens and uses every text
      position (BOS, EOS and the padding of the 77-token context). Here: normalised tokens,
      word tokens only.
    - The code aggregates un-normalised patch tokens; here normalised ones (the joint embedding
      is normalised before use either way).
    - The code pools with ``logsumexp(x / 0.1)`` without the factor tau and then L2-normalises
      each row of the (B, B) score matrix before the hinge. Here the factor tau is kept so the
      scores are a smooth max on the cosine scale, where the margins are meaningful, and the
      rows are not renormalised.
    - In the code the image-retrieval half sums over the wrong axis (column sums of a
      row-anchored matrix); here each half is a proper row- or column-anchored hinge.
    - The code has no identity handling (same-person pairs are pushed apart); ``pids`` adds it.

    Args:
        image_tokens: (B, N, D) patch tokens (no class token).
        text_tokens: (B, L, D) text tokens.
        text_mask: (B, L) 1 on real tokens (BOS..EOS), 0 on padding.
        margin_text: text->joint margin (``loss.efa_margin_text``).
        margin_image: image->joint margin (``loss.efa_margin_image``).
        pids: optional (B,) identities; same-identity pairs are then not negatives.
        pool_temperature: tau of the log-sum-exp pooling (the authors use 0.1).
        exclude_special: drop the first and last real token (BOS, EOS) of each caption.
        eps: guards the min-max and row-sum divisions.

    Returns:
        Scalar loss.
    """
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

    words = _word_token_mask(text_mask, exclude_special)  # (B, L)
    # Captions are padded to the context length (77 for CLIP); the (B, B, N, L) similarity
    # tensors below only need the columns some caption uses.
    span = int(words.any(dim=0).nonzero().max()) + 1
    words = words[:, :span]
    patches = F.normalize(image_tokens.float(), dim=-1)  # (B, N, D)
    tokens = F.normalize(text_tokens[:, :span].float(), dim=-1)  # (B, L', D)
    patch_mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)  # (B, N)

    weights = _sparse_token_patch_weights(tokens @ patches.transpose(1, 2), eps)  # (B, L, N)
    joint = F.normalize(weights @ patches, dim=-1)  # (B, L, D) one joint embedding per text token

    s_text = _lse_pool_best_match(tokens, words, joint, words, pool_temperature)  # (B, B)
    s_image = _lse_pool_best_match(patches, patch_mask, joint, words, pool_temperature)  # (B, B)

    negatives = ~torch.eye(b, dtype=torch.bool, device=patches.device)
    if pids is not None:
        negatives = negatives & ~_same_pid(pids)
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


def cmpm(image_feats: Tensor, text_feats: Tensor, pids: Tensor, eps: float = 1e-8) -> Tensor:
    """Cross-modal projection matching (Zhang & Lu ECCV 2018), IVT's alignment loss.

    Each embedding is projected on the normalised embeddings of the other modality (no
    temperature; the image's norm acts as one)::

        p_ij = softmax_j(v_i^T t_j / ||t_j||),  q_ij = y_ij / sum_k y_ik
        L_i2t = 1/B sum_i KL(p_i || q_i)   (eps inside log q)
        L_t2i = the same with t_i^T v_j / ||v_j||
        L_cmpm = L_i2t + L_t2i

    IVT applies it at the sentence, phrase and word levels with the same image embedding
    (``mla_sentence``, ``mla_phrase``, ``mla_word``): call it once per level.

    Difference from the IVT / IRRA code (``labels_mask / labels_mask.norm(dim=1)``): there q is
    divided by the L2 norm of the label row, so it does not sum to 1 when an identity has
    several items in the batch; here it is the L1-normalised distribution of the CMPM paper.

    Args:
        image_feats: (B, D) image embeddings (not normalised: the norm matters here).
        text_feats: (B, D) text embeddings (not normalised).
        pids: (B,) identity labels.
        eps: added to q inside the log.

    Returns:
        Scalar loss.
    """
    _check_pair("cmpm", image_feats, text_feats, pids)
    v, t = image_feats.float(), text_feats.float()
    q = _true_match_distribution(pids)
    image_proj_text = v @ F.normalize(t, dim=-1).t()  # (B, B)
    text_proj_image = t @ F.normalize(v, dim=-1).t()  # (B, B)
    return _kl_rows(image_proj_text, q, eps).mean() + _kl_rows(text_proj_image, q, eps).mean()
