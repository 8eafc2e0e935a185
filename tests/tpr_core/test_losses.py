"""Loss terms against hand-computed values and plain-loop references on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tpr_core import losses

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- plain references


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / math.sqrt(float((x * x).sum()))


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def _kl_row(logits: list[float], q: list[float], eps: float) -> float:
    top = max(logits)
    z = sum(math.exp(x - top) for x in logits)
    out = 0.0
    for x, qj in zip(logits, q, strict=True):
        log_p = x - top - math.log(z)
        out += math.exp(log_p) * (log_p - math.log(qj + eps))
    return out


def _q_rows(pids: list[int]) -> list[list[float]]:
    rows = []
    for a in pids:
        y = [1.0 if a == b else 0.0 for b in pids]
        rows.append([v / sum(y) for v in y])
    return rows


def _cos_matrix(rows: torch.Tensor, cols: torch.Tensor) -> list[list[float]]:
    r = [_unit(x.double()) for x in rows]
    c = [_unit(x.double()) for x in cols]
    return [[_dot(a, b) for b in c] for a in r]


def _sdm_reference(v, t, pids, tau, eps=1e-8, alpha=None):
    """SDM (alpha None) or A-SDM by loops; also returns the A-SDM weights per direction."""
    s = _cos_matrix(v, t)
    n = len(pids)
    q = _q_rows(pids)
    total, weights = 0.0, []
    for mat in (s, [[s[j][i] for j in range(n)] for i in range(n)]):
        direction, w_dir = 0.0, []
        for i in range(n):
            logits = [x / tau for x in mat[i]]
            w = 1.0
            if alpha is not None:
                top = max(logits)
                probs = [math.exp(x - top) for x in logits]
                probs = [p / sum(probs) for p in probs]
                w = alpha * (max(probs) - probs[i]) + 1.0
            w_dir.append(w)
            direction += w * _kl_row(logits, q[i], eps)
        total += direction / n
        weights.append(w_dir)
    return total, weights


# --------------------------------------------------------------------------- SDM / A-SDM


def test_sdm_hand_value_two_orthogonal_pairs():
    # s = identity, tau = 1: every row is softmax([1, 0]) against q = [1, 0].
    v = torch.eye(2)
    loss = losses.sdm(v, v.clone(), torch.tensor([0, 1]), temperature=1.0)
    p_hit, p_miss = math.e / (math.e + 1), 1 / (math.e + 1)
    row = (
        p_hit * math.log(p_hit)
        + p_miss * math.log(p_miss)
        - p_hit * math.log(1 + 1e-8)
        - p_miss * math.log(1e-8)
    )
    assert loss.item() == pytest.approx(2 * row, rel=1e-5)


@pytest.mark.parametrize("pids", [[0, 1, 2, 3], [0, 0, 1, 2, 2, 2]])
def test_sdm_matches_loop_reference(pids):
    g = _gen(0)
    v, t = torch.randn(len(pids), 5, generator=g), torch.randn(len(pids), 5, generator=g)
    ref, _ = _sdm_reference(v, t, pids, tau=0.1)
    assert losses.sdm(v, t, torch.tensor(pids), temperature=0.1).item() == pytest.approx(ref, rel=1e-4)


def test_sdm_several_images_per_identity_uses_all_true_matches():
    # Rows 0 and 1 share an identity: the distribution that splits mass between them is the target,
    # so a text equally close to both images costs less than a text close to only its own image.
    pids = torch.tensor([0, 0, 1])
    v = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    shared = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    own_only = v.clone()
    assert losses.sdm(v, shared, pids, 0.1) < losses.sdm(v, own_only, pids, 0.1)
    ref, _ = _sdm_reference(v, shared, [0, 0, 1], tau=0.1)
    assert losses.sdm(v, shared, pids, 0.1).item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_a_sdm_weight_exactly_one_equals_sdm():
    g = _gen(1)
    pids = [0, 0, 1, 2, 2]
    v = torch.randn(5, 6, generator=g)
    t = v + 0.05 * torch.randn(5, 6, generator=g)  # every own pair ranks first in both directions
    _, weights = _sdm_reference(v, t, pids, tau=0.02, alpha=10.0)
    assert all(w == 1.0 for row in weights for w in row)
    pid_t = torch.tensor(pids)
    assert (
        losses.a_sdm(v, t, pid_t, 0.02, alpha=10.0, form="paper").item()
        == losses.sdm(v, t, pid_t, 0.02).item()
    )


def test_a_sdm_weight_above_one_matches_formula():
    g = _gen(2)
    pids = [0, 1, 2, 3]
    v = torch.randn(4, 6, generator=g)
    t = v[[1, 0, 2, 3]] + 0.05 * torch.randn(4, 6, generator=g)  # rows 0 and 1 rank the wrong pair first
    ref, weights = _sdm_reference(v, t, pids, tau=0.1, alpha=3.0)
    assert max(max(row) for row in weights) > 1.5
    got = losses.a_sdm(v, t, torch.tensor(pids), temperature=0.1, alpha=3.0, form="paper")
    assert got.item() == pytest.approx(ref, rel=1e-4)
    assert got > losses.sdm(v, t, torch.tensor(pids), temperature=0.1)


def test_a_sdm_weight_carries_no_gradient():
    g = _gen(3)
    pids = torch.tensor([0, 1, 2])
    v = torch.randn(3, 4, generator=g, requires_grad=True)
    t = torch.randn(3, 4, generator=g)
    _, weights = _sdm_reference(v.detach(), t, [0, 1, 2], tau=0.1, alpha=5.0)
    losses.a_sdm(v, t, pids, temperature=0.1, alpha=5.0, form="paper").backward()
    # Same loss with the weights as constants: per-row KL terms written out with torch ops.
    v2 = v.detach().clone().requires_grad_(True)
    s = F.normalize(v2, dim=1) @ F.normalize(t, dim=1).t() / 0.1
    q = torch.eye(3)
    expected = 0.0
    for mat, w in ((s, weights[0]), (s.t(), weights[1])):
        for i in range(3):
            log_p = torch.log_softmax(mat[i], dim=0)
            expected = expected + w[i] * (log_p.exp() * (log_p - torch.log(q[i] + 1e-8))).sum() / 3
    expected.backward()
    torch.testing.assert_close(v.grad, v2.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- ID / MLM


def test_id_loss_matches_hand_cross_entropy():
    g = _gen(4)
    clf = torch.nn.Linear(3, 5)
    weight, bias = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    with torch.no_grad():
        clf.weight.copy_(weight)
        clf.bias.copy_(bias)
    v, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    pids = [4, 0, 2, 2]

    def ce(x):
        total = 0.0
        for row, y in zip(x, pids, strict=True):
            logits = [_dot(weight[k].double(), row.double()) + float(bias[k]) for k in range(5)]
            top = max(logits)
            total += -(logits[y] - top - math.log(sum(math.exp(z - top) for z in logits)))
        return total / len(pids)

    got = losses.id_loss(clf, v, t, torch.tensor(pids))
    assert got.item() == pytest.approx((ce(v) + ce(t)) / 2, rel=1e-5)


def test_mlm_counts_only_labelled_positions():
    g = _gen(5)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[-100, 3, -100, 6], [0, -100, -100, -100]])
    total, count = 0.0, 0
    for b in range(2):
        for pos in range(4):
            y = int(labels[b, pos])
            if y == -100:
                continue
            row = [float(x) for x in logits[b, pos]]
            top = max(row)
            total += -(row[y] - top - math.log(sum(math.exp(x - top) for x in row)))
            count += 1
    assert losses.mlm(logits, labels).item() == pytest.approx(total / count, rel=1e-5)
    # Logits at ignored positions do not matter.
    changed = logits.clone()
    changed[0, 0] += 100.0
    changed[1, 3] -= 50.0
    assert losses.mlm(changed, labels).item() == pytest.approx(total / count, rel=1e-5)


def test_mlm_without_labels_is_zero_and_differentiable():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = losses.mlm(logits, torch.full((1, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------- triplet / restore / CMPM


def _triplet_features():
    # Images are the basis vectors, so cos(t_i, v_j) is just t_i[j] for unit t_i:
    # s = [[.8, .6, 0], [0, .6, .8], [.6, 0, .8]] (text rows, image columns).
    v = torch.eye(3)
    t = torch.tensor([[0.8, 0.6, 0.0], [0.0, 0.6, 0.8], [0.6, 0.0, 0.8]])
    return v, t


def test_triplet_hardest_negative_hand_example():
    v, t = _triplet_features()
    # Text anchors: only text 1 violates (pos .6, hardest image 2 at .8): .05 - .6 + .8 = .25.
    # Image anchors: image 1 (pos .6 vs text 0 at .6) and image 2 (pos .8 vs text 1 at .8): .05 each.
    got = losses.triplet(v, t, torch.tensor([0, 1, 2]), margin=0.05)
    assert got.item() == pytest.approx(0.25 / 3 + 0.10 / 3, abs=1e-6)


def test_triplet_excludes_same_identity_from_negatives():
    v, t = _triplet_features()
    # Text 1 and image 2 now share an identity: text 1's hardest negative becomes image 0 (s = 0),
    # and image 1's only negative is text 0 (s = .6 = its positive): .05 / 3 in all.
    got = losses.triplet(v, t, torch.tensor([0, 1, 1]), margin=0.05)
    assert got.item() == pytest.approx(0.05 / 3, abs=1e-6)
    assert losses.triplet(v, t, torch.tensor([7, 7, 7])).item() == 0.0


def test_restore_only_counts_masked_patches():
    pred = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [5.0, 5.0]]])
    target = torch.zeros(1, 3, 2)
    mask = torch.tensor([[True, False, True]])
    assert losses.restore(pred, target, mask).item() == pytest.approx((1.0 + 25.0) / 2)
    changed = pred.clone()
    changed[0, 1] = torch.tensor([9.0, -9.0])
    assert losses.restore(changed, target, mask.float()).item() == pytest.approx(13.0)


@pytest.mark.parametrize("pids", [[0, 1, 2], [0, 0, 1, 1, 1]])
def test_cmpm_matches_loop_reference(pids):
    g = _gen(6)
    v, t = 2.0 * torch.randn(len(pids), 4, generator=g), torch.randn(len(pids), 4, generator=g)
    q = _q_rows(pids)
    total = 0.0
    for src, dst in ((v, t), (t, v)):
        dst_unit = [_unit(x.double()) for x in dst]
        rows = [_kl_row([_dot(a.double(), b) for b in dst_unit], q[i], 1e-8) for i, a in enumerate(src)]
        total += sum(rows) / len(rows)
    assert losses.cmpm(v, t, torch.tensor(pids)).item() == pytest.approx(total, rel=1e-4)


# --------------------------------------------------------------------------- EFA


def _efa_reference(img, txt, mask, m_text, m_image, pids=None, tau=0.1):
    """EFA written out with loops over pairs and tokens, in float64."""
    b, n, _ = img.shape
    patches = [[_unit(img[i, k].double()) for k in range(n)] for i in range(b)]
    words, tokens, joints = [], [], []
    for i in range(b):
        real = [pos for pos in range(txt.shape[1]) if mask[i, pos]]
        kept = real[1:-1] or real
        words.append(kept)
        tokens.append([_unit(txt[i, pos].double()) for pos in kept])
        row_joints = []
        for tok in tokens[i]:
            sims = [_dot(tok, p) for p in patches[i]]
            lo, hi = min(sims), max(sims)
            scaled = [(s - lo) / (hi - lo) for s in sims]
            sparse = [s if s > 1.0 / n else 0.0 for s in scaled]
            w = [s / sum(sparse) for s in sparse]
            row_joints.append(_unit(sum(wk * p for wk, p in zip(w, patches[i], strict=True))))
        joints.append(row_joints)

    def score(queries, joint_set):
        best = [max(_dot(x, j) for j in joint_set) for x in queries]
        return tau * math.log(sum(math.exp(x / tau) for x in best))

    def hinge(s, margin):
        def is_neg(a, c):
            return a != c and (pids is None or pids[a] != pids[c])

        row = sum(
            math.log(1 + sum(math.exp(s[a][c] - s[a][a] + margin) for c in range(b) if is_neg(a, c)))
            for a in range(b)
        )
        col = sum(
            math.log(1 + sum(math.exp(s[a][c] - s[c][c] + margin) for a in range(b) if is_neg(a, c)))
            for c in range(b)
        )
        return row / b + col / b

    s_text = [[score(tokens[a], joints[c]) for c in range(b)] for a in range(b)]
    s_image = [[score(patches[a], joints[c]) for c in range(b)] for a in range(b)]
    return hinge(s_text, m_text) + hinge(s_image, m_image)


def _efa_inputs(seed, b=3, n=5, length=6, d=4):
    g = _gen(seed)
    img = torch.randn(b, n, d, generator=g)
    txt = torch.randn(b, length, d, generator=g)
    lengths = [length, 4, 3][:b] + [length] * max(0, b - 3)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, ell in enumerate(lengths):
        mask[i, :ell] = 1
    return img, txt, mask


def test_efa_matches_loop_reference_with_padding():
    img, txt, mask = _efa_inputs(7)
    ref = _efa_reference(img, txt, mask, 0.2, 0.8)
    got = losses.efa(img, txt, mask, margin_text=0.2, margin_image=0.8, form="paper")
    assert got.item() == pytest.approx(ref, rel=1e-4)


def test_efa_matches_loop_reference_with_pids():
    img, txt, mask = _efa_inputs(8, b=4)
    pids = [0, 0, 1, 2]
    ref = _efa_reference(img, txt, mask, 0.1, 0.1, pids=pids)
    got = losses.efa(img, txt, mask, 0.1, 0.1, pids=torch.tensor(pids), form="paper")
    assert got.item() == pytest.approx(ref, rel=1e-4)
    assert got.item() != pytest.approx(losses.efa(img, txt, mask, 0.1, 0.1, form="paper").item(), rel=1e-3)


def test_efa_ignores_padding_and_special_tokens():
    img, txt, mask = _efa_inputs(9)
    base = losses.efa(img, txt, mask, form="paper")
    changed = txt.clone()
    changed[1, 4:] = 50.0  # padding of caption 1 (length 4)
    changed[:, 0] = -3.0  # BOS of every caption
    changed[2, 2] = 7.0  # EOS of caption 2 (length 3)
    assert losses.efa(img, changed, mask, form="paper").item() == pytest.approx(base.item(), rel=1e-6)
    # With exclude_special off, BOS/EOS take part and the value moves.
    assert losses.efa(img, changed, mask, exclude_special=False, form="paper").item() != pytest.approx(
        losses.efa(img, txt, mask, exclude_special=False, form="paper").item(), rel=1e-3
    )


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_efa_aligned_pairs_cost_less_than_shuffled(seed):
    g = _gen(seed)
    b, n, d = 4, 6, 8
    img = torch.randn(b, n, d, generator=g)
    # Each caption's word tokens are noisy copies of three patches of its own image.
    idx = torch.stack([torch.randperm(n, generator=g)[:3] for _ in range(b)])
    words = torch.stack([img[i, idx[i]] for i in range(b)]) + 0.1 * torch.randn(b, 3, d, generator=g)
    txt = torch.cat([torch.randn(b, 1, d, generator=g), words, torch.randn(b, 1, d, generator=g)], dim=1)
    mask = torch.ones(b, 5, dtype=torch.long)
    aligned = losses.efa(img, txt, mask, form="paper")
    shuffled = losses.efa(img[[1, 2, 3, 0]], txt, mask, form="paper")
    assert aligned < shuffled


# --------------------------------------------------------------------------- errors and gradients


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="text_feats"):
        losses.sdm(torch.randn(3, 4), torch.randn(2, 4), torch.arange(3))
    with pytest.raises(ValueError, match="pids"):
        losses.cmpm(torch.randn(3, 4), torch.randn(3, 4), torch.arange(4))
    with pytest.raises(ValueError, match="text_mask"):
        losses.efa(torch.randn(2, 5, 4), torch.randn(2, 6, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="no real token"):
        losses.efa(torch.randn(2, 5, 4), torch.randn(2, 6, 4), torch.tensor([[1] * 6, [0] * 6]))
    with pytest.raises(ValueError, match="mask"):
        losses.restore(torch.randn(1, 3, 2), torch.randn(1, 3, 2), torch.ones(1, 2))


def _grads_finite(loss: torch.Tensor, *tensors: torch.Tensor) -> None:
    assert torch.isfinite(loss)
    loss.backward()
    for x in tensors:
        assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["sdm", "a_sdm", "cmpm", "triplet"])
def test_global_losses_have_finite_gradients(name):
    g = _gen(13)
    v = torch.randn(6, 8, generator=g).requires_grad_(True)
    t = torch.randn(6, 8, generator=g).requires_grad_(True)
    _grads_finite(getattr(losses, name)(v, t, torch.tensor([0, 0, 1, 2, 2, 3])), v, t)


def test_id_mlm_restore_have_finite_gradients():
    g = _gen(14)
    clf = torch.nn.Linear(8, 4)
    v = torch.randn(5, 8, generator=g).requires_grad_(True)
    t = torch.randn(5, 8, generator=g).requires_grad_(True)
    _grads_finite(losses.id_loss(clf, v, t, torch.tensor([0, 1, 3, 3, 2])), v, t, clf.weight)
    logits = torch.randn(2, 5, 11, generator=g).requires_grad_(True)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3] = 4, 9
    _grads_finite(losses.mlm(logits, labels), logits)
    pred = torch.randn(2, 6, 12, generator=g).requires_grad_(True)
    _grads_finite(
        losses.restore(pred, torch.randn(2, 6, 12, generator=g), torch.rand(2, 6, generator=g) < 0.7), pred
    )


def test_efa_has_finite_gradients_with_padding():
    img, txt, mask = _efa_inputs(15, b=4, n=6, length=7, d=8)
    txt[:, 5:] = 0.0  # zero padding vectors, as some encoders leave them
    img.requires_grad_(True)
    txt.requires_grad_(True)
    _grads_finite(
        losses.efa(img, txt, mask, 0.2, 1.0, pids=torch.tensor([0, 1, 1, 2]), form="paper"), img, txt
    )
    assert (txt.grad[1, 4:] == 0).all()  # padding gets no gradient
