"""Paper and authors'-code forms of A-SDM, EFA, CMPM and IVT's multi-level alignment.

Every form is checked against a reference written here from its formula with plain Python loops
over rows (scalar torch ops in float64, so autograd gives the reference gradient too), on small
inputs with repeated identities, rows whose most similar item is not a positive, and
single-identity batches: values to rtol 1e-5, gradients w.r.t. the inputs to rtol 1e-4.
"""

from __future__ import annotations

import math

import pytest
import torch

from tpr_core import losses

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- scalar helpers


def _dot(a, b):
    out = a[0] * b[0]
    for k in range(1, len(a)):
        out = out + a[k] * b[k]
    return out


def _norm(a):
    return torch.sqrt(_dot(a, a))


def _cos(a, b):
    return _dot(a, b) / (_norm(a) * _norm(b))


def _unit(a):
    n = _norm(a)
    return [a[k] / n for k in range(len(a))]


def _f(x):
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _logsumexp(values):
    top = max(_f(x) for x in values)
    total = sum(torch.exp(x - top) for x in values)
    return torch.log(total) + top


def _kl_row(logits, q, eps):
    """sum_j p_j (log p_j - log(q_j + eps)), p = softmax(logits), written out."""
    lse = _logsumexp(logits)
    out = 0.0
    for x, qj in zip(logits, q, strict=True):
        log_p = x - lse
        out = out + torch.exp(log_p) * (log_p - math.log(qj + eps))
    return out


def _argmax(values):
    """First index of the largest value (torch.argmax's tie rule)."""
    best = 0
    for j in range(1, len(values)):
        if _f(values[j]) > _f(values[best]):
            best = j
    return best


def _q_rows(pids, label_norm="sum"):
    rows = []
    for a in pids:
        y = [1.0 if a == b else 0.0 for b in pids]
        n = sum(y) if label_norm == "sum" else math.sqrt(sum(y))
        rows.append([v / n for v in y])
    return rows


def _check(impl, ref, inputs, rtol_value=1e-5, rtol_grad=1e-4):
    """impl on float32 inputs against ref on float64 copies: value and gradients."""
    xs = [x.float().clone().requires_grad_(True) for x in inputs]
    out = impl(*xs)
    grads = torch.autograd.grad(out, xs)
    xr = [x.double().clone().requires_grad_(True) for x in inputs]
    expected = ref(*xr)
    ref_grads = torch.autograd.grad(expected, xr, allow_unused=True)
    assert out.item() == pytest.approx(expected.item(), rel=rtol_value, abs=1e-7)
    for g, gr, x in zip(grads, ref_grads, xr, strict=True):
        gr = torch.zeros_like(x) if gr is None else gr
        scale = float(gr.abs().max())
        torch.testing.assert_close(g.double(), gr, rtol=rtol_grad, atol=1e-5 * max(scale, 1e-3))
    return out


# --------------------------------------------------------------------------- inputs

# Images and captions of 4 pairs, identities [0, 0, 1, 2]. Image 2 (pid 1) is closest to caption
# 1 (pid 0): a row whose most similar item is not its positive. Caption 1's closest image is
# image 1 (its own pair), which is not the first column of its identity (image 0).
_V = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.1, 1.0, 0.0], [0.0, 0.2, 1.0]])
_T = torch.tensor([[0.9, 0.1, 0.2], [0.7, 0.6, 0.1], [0.7, 0.3, 0.1], [0.2, 0.1, 0.9]])
_PIDS = [0, 0, 1, 2]

GLOBAL_CASES = {
    "repeated_pids": (_V, _T, _PIDS),
    "single_identity": (_V[:3], _T[:3], [5, 5, 5]),
    "distinct": (_V, _T[[2, 1, 0, 3]], [0, 1, 2, 3]),
}


# --------------------------------------------------------------------------- A-SDM


def _a_sdm_reference(v, t, pids, tau, alpha, form, scale=0.1, eps=1e-8):
    b = len(pids)
    s = [[_cos(v[i], t[j]) for j in range(b)] for i in range(b)]
    s_t = [[s[j][i] for j in range(b)] for i in range(b)]
    q = _q_rows(pids)
    total = 0.0
    for mat in (s, s_t):
        direction = 0.0
        for i in range(b):
            logits = [x / tau for x in mat[i]]
            if form == "paper":
                lse = _logsumexp(logits)
                probs = [_f(torch.exp(x - lse)) for x in logits]  # detached
                w = alpha * (max(probs) - probs[i]) + 1.0
            else:
                m = _argmax(mat[i])
                first = next(j for j in range(b) if pids[j] == pids[i])
                w = 1.0 + scale * (mat[i][m] - mat[i][first]) if m != first else 1.0
            direction = direction + w * _kl_row(logits, q[i], eps)
        total = total + direction / b
    return total


@pytest.mark.parametrize("case", sorted(GLOBAL_CASES))
@pytest.mark.parametrize("form", ["paper", "code"])
@pytest.mark.parametrize("tau", [0.1, 0.02])
def test_a_sdm_forms_match_loop_reference(case, form, tau):
    v, t, pids = GLOBAL_CASES[case]
    _check(
        lambda a, b: losses.a_sdm(a, b, torch.tensor(pids), temperature=tau, alpha=3.0, form=form),
        lambda a, b: _a_sdm_reference(a, b, pids, tau, 3.0, form),
        [v, t],
    )


def test_a_sdm_inputs_exercise_both_weight_rules():
    # i2t row 2: most similar caption is 1 (pid 0), its first positive is 2 -> code weight > 1.
    s = [[_f(_cos(_V[i], _T[j])) for j in range(4)] for i in range(4)]
    assert _argmax(s[2]) == 1
    # t2i row 1 (caption 1): most similar image is its own pair 1, but the first image of pid 0 is
    # image 0 -> code weight > 1 while the paper weight is exactly 1.
    col1 = [s[i][1] for i in range(4)]
    assert _argmax(col1) == 1


def test_a_sdm_default_is_code_and_forms_differ():
    pids = torch.tensor(_PIDS)
    code = losses.a_sdm(_V, _T, pids, temperature=0.1)
    assert code.item() == losses.a_sdm(_V, _T, pids, temperature=0.1, form="code").item()
    paper = losses.a_sdm(_V, _T, pids, temperature=0.1, form="paper")
    assert code.item() != pytest.approx(paper.item(), rel=1e-3)
    # alpha only acts in the paper form, code_scale only in the code form.
    assert losses.a_sdm(_V, _T, pids, 0.1, alpha=50.0).item() == code.item()
    assert losses.a_sdm(_V, _T, pids, 0.1, code_scale=0.5, form="paper").item() == paper.item()
    assert losses.a_sdm(_V, _T, pids, 0.1, code_scale=0.5).item() != pytest.approx(code.item(), rel=1e-4)


def test_a_sdm_code_weight_carries_gradient():
    # With scale 0 the code weight is exactly 1 (SDM); the code form's gradient differs from
    # "SDM gradient times constant weights" because the weight itself is differentiated.
    pids = torch.tensor(_PIDS)
    v = _V.clone().requires_grad_(True)
    (g_code,) = torch.autograd.grad(losses.a_sdm(v, _T, pids, 0.1), [v])
    assert losses.a_sdm(_V, _T, pids, 0.1, code_scale=0.0).item() == pytest.approx(
        losses.sdm(_V, _T, pids, 0.1).item(), rel=1e-6
    )
    assert not torch.allclose(g_code, torch.autograd.grad(losses.sdm(v, _T, pids, 0.1), [v])[0])


# --------------------------------------------------------------------------- CMPM / MLA


def _cmpm_reference(v, t, pids, label_norm, eps=1e-8):
    b = len(pids)
    q = _q_rows(pids, label_norm)
    total = 0.0
    for src, dst in ((v, t), (t, v)):
        dst_unit = [_unit(dst[j]) for j in range(b)]
        rows = 0.0
        for i in range(b):
            rows = rows + _kl_row([_dot(src[i], dst_unit[j]) for j in range(b)], q[i], eps)
        total = total + rows / b
    return total


@pytest.mark.parametrize("case", sorted(GLOBAL_CASES))
@pytest.mark.parametrize("label_norm", ["sum", "l2"])
def test_cmpm_label_norms_match_loop_reference(case, label_norm):
    v, t, pids = GLOBAL_CASES[case]
    _check(
        lambda a, b: losses.cmpm(2.0 * a, b, torch.tensor(pids), label_norm=label_norm),
        lambda a, b: _cmpm_reference(2.0 * a, b, pids, label_norm),
        [v, t],
    )


def test_cmpm_label_norms_differ_only_with_repeated_pids():
    default = losses.cmpm(_V, _T, torch.tensor(_PIDS))
    assert default.item() == losses.cmpm(_V, _T, torch.tensor(_PIDS), label_norm="sum").item()
    assert default.item() != pytest.approx(
        losses.cmpm(_V, _T, torch.tensor(_PIDS), label_norm="l2").item(), rel=1e-3
    )
    distinct = torch.tensor([0, 1, 2, 3])
    assert losses.cmpm(_V, _T, distinct, label_norm="l2").item() == pytest.approx(
        losses.cmpm(_V, _T, distinct).item(), rel=1e-6
    )


def _mla_inputs():
    g = torch.Generator().manual_seed(3)
    images = [_V + 0.2 * torch.randn(4, 3, generator=g) for _ in range(3)]  # three augmented views
    texts = [_T, _T[[1, 0, 3, 2]] + 0.1, torch.randn(4, 3, generator=g)]  # sentence, phrase, word
    return images, texts


def _mla_reference(flat, pids, form, label_norm):
    images, texts = flat[:3], flat[3:]
    if form == "separate":
        return sum(_cmpm_reference(v, t, pids, label_norm) for v, t in zip(images, texts, strict=True))
    rows_v = [images[k][i] for k in range(3) for i in range(len(pids))]
    rows_t = [texts[k][i] for k in range(3) for i in range(len(pids))]
    return _cmpm_reference(rows_v, rows_t, pids * 3, label_norm)


@pytest.mark.parametrize("pids", [_PIDS, [4, 4, 4, 4]])
@pytest.mark.parametrize("form", ["joint", "separate"])
@pytest.mark.parametrize("label_norm", ["sum", "l2"])
def test_mla_forms_match_loop_reference(pids, form, label_norm):
    images, texts = _mla_inputs()
    _check(
        lambda *x: losses.mla(list(x[:3]), list(x[3:]), torch.tensor(pids), form=form, label_norm=label_norm),
        lambda *x: _mla_reference(x, pids, form, label_norm),
        images + texts,
    )


def test_mla_separate_is_per_level_cmpm_and_joint_differs():
    images, texts = _mla_inputs()
    pids = torch.tensor(_PIDS)
    same_view = [images[0]] * 3
    per_level = sum(losses.cmpm(images[0], t, pids) for t in texts)
    assert losses.mla(same_view, texts, pids, form="separate").item() == pytest.approx(
        per_level.item(), rel=1e-6
    )
    joint = losses.mla(images, texts, pids)
    assert joint.item() == losses.mla(images, texts, pids, form="joint").item()
    assert joint.item() != pytest.approx(losses.mla(images, texts, pids, form="separate").item(), rel=1e-3)
    # The joint loss does not depend on the order of the levels.
    order = [2, 0, 1]
    shuffled = losses.mla([images[k] for k in order], [texts[k] for k in order], pids)
    assert shuffled.item() == pytest.approx(joint.item(), rel=1e-6)


# --------------------------------------------------------------------------- EFA


def _efa_inputs(seed, b=3, n=4, length=5, d=3):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, n, d, generator=g)
    txt = torch.randn(b, length, d, generator=g)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, ell in enumerate([length, 4, 3, length][:b]):
        mask[i, :ell] = 1
    return img, txt, mask


def _sparse_weights(sims, n):
    lo, hi = min(sims, key=_f), max(sims, key=_f)  # differentiable, as amin / amax
    scaled = [(x - lo) / (hi - lo) for x in sims]
    sparse = [x if _f(x) > 1.0 / n else x * 0.0 for x in scaled]
    total = sum(sparse)
    return [x / total for x in sparse]


def _efa_code_reference(img, txt, m_text, m_image, temp=1.0):
    b, n, _ = img.shape
    length = txt.shape[1]
    patches = [[img[i, k] for k in range(n)] for i in range(b)]
    tokens = [[txt[i, pos] for pos in range(length)] for i in range(b)]  # every position
    joints = []
    for i in range(b):
        row = []
        for tok in tokens[i]:
            w = _sparse_weights([_dot(tok, p) for p in patches[i]], n)  # un-normalised dots
            row.append(sum(w[k] * patches[i][k] for k in range(n)))
        joints.append(row)

    def scores(queries):
        raw = [
            [
                _logsumexp([max((_cos(x, j) for j in joints[c]), key=_f) / temp for x in queries[a]])
                for c in range(b)
            ]
            for a in range(b)
        ]
        out = []
        for a in range(b):
            norm = torch.sqrt(sum(raw[a][c] * raw[a][c] for c in range(b)))
            out.append([raw[a][c] / norm for c in range(b)])
        return out

    def hinge(s, margin):
        cost_col, cost_row = 0.0, 0.0
        for c in range(b):
            col_terms = [s[a][c] - s[c][c] + margin if a != c else s[c][c] * 0.0 for a in range(b)]
            row_terms = [s[a][c] - s[a][a] + margin if a != c else s[c][c] * 0.0 for a in range(b)]
            cost_col = cost_col + _logsumexp(col_terms)
            cost_row = cost_row + _logsumexp(row_terms)
        return cost_col / b + cost_row / b

    return hinge(scores(tokens), m_text) + hinge(scores(patches), m_image)


def _efa_paper_reference(img, txt, mask, m_text, m_image, pids=None, tau=0.1):
    b, n, _ = img.shape
    patches = [[_unit(img[i, k]) for k in range(n)] for i in range(b)]
    tokens, joints = [], []
    for i in range(b):
        real = [pos for pos in range(txt.shape[1]) if mask[i, pos]]
        kept = real[1:-1] or real
        tokens.append([_unit(txt[i, pos]) for pos in kept])
        row = []
        for tok in tokens[i]:
            w = _sparse_weights([_dot(tok, p) for p in patches[i]], n)
            row.append(_unit([sum(w[k] * patches[i][k][dd] for k in range(n)) for dd in range(len(tok))]))
        joints.append(row)

    def score(queries, joint_set):
        return tau * _logsumexp([max((_dot(x, j) for j in joint_set), key=_f) / tau for x in queries])

    def neg(a, c):
        return a != c and (pids is None or pids[a] != pids[c])

    def hinge(s, margin):
        total = s[0][0] * 0.0  # stays in the graph when no pair is a negative
        for a in range(b):
            terms = [s[a][c] - s[a][a] + margin for c in range(b) if neg(a, c)]
            total = total + (_logsumexp([s[a][a] * 0.0] + terms) if terms else 0.0) / b
        for c in range(b):
            terms = [s[a][c] - s[c][c] + margin for a in range(b) if neg(a, c)]
            total = total + (_logsumexp([s[c][c] * 0.0] + terms) if terms else 0.0) / b
        return total

    s_text = [[score(tokens[a], joints[c]) for c in range(b)] for a in range(b)]
    s_image = [[score(patches[a], joints[c]) for c in range(b)] for a in range(b)]
    return hinge(s_text, m_text) + hinge(s_image, m_image)


EFA_PIDS = {"repeated": [0, 0, 1], "single_identity": [2, 2, 2], "none": None}


@pytest.mark.parametrize("pids", sorted(EFA_PIDS))
def test_efa_code_form_matches_loop_reference(pids):
    img, txt, mask = _efa_inputs(21)
    pid_t = None if EFA_PIDS[pids] is None else torch.tensor(EFA_PIDS[pids])
    # Defaults of the code form: margins 0.1 (text) / 0.9 (image), T = 1; pids are ignored.
    _check(
        lambda a, t: losses.efa(a, t, mask, pids=pid_t),
        lambda a, t: _efa_code_reference(a, t, 0.1, 0.9),
        [img, txt],
    )


def test_efa_code_form_explicit_margins_and_temperature():
    img, txt, mask = _efa_inputs(22, b=4, n=5, length=4)
    _check(
        lambda a, t: losses.efa(a, t, mask, 0.3, 0.5, pool_temperature=0.5, form="code"),
        lambda a, t: _efa_code_reference(a, t, 0.3, 0.5, temp=0.5),
        [img, txt],
    )


@pytest.mark.parametrize("pids", sorted(EFA_PIDS))
def test_efa_paper_form_matches_loop_reference(pids):
    img, txt, mask = _efa_inputs(23)
    pid_list = EFA_PIDS[pids]
    pid_t = None if pid_list is None else torch.tensor(pid_list)
    _check(
        lambda a, t: losses.efa(a, t, mask, 0.2, 0.8, pids=pid_t, form="paper"),
        lambda a, t: _efa_paper_reference(a, t, mask, 0.2, 0.8, pids=pid_list),
        [img, txt],
    )


def test_efa_paper_form_single_identity_is_zero():
    img, txt, mask = _efa_inputs(24)
    assert losses.efa(img, txt, mask, pids=torch.tensor([1, 1, 1]), form="paper").item() == 0.0


def test_efa_forms_differ_and_code_uses_every_position():
    img, txt, mask = _efa_inputs(25)
    pids = torch.tensor([0, 0, 1])
    code = losses.efa(img, txt, mask, pids=pids)
    assert code.item() == losses.efa(img, txt, mask, pids=pids, form="code").item()
    paper = losses.efa(img, txt, mask, pids=pids, form="paper")
    assert code.item() != pytest.approx(paper.item(), rel=1e-3)
    # Padding of caption 2 (length 3): the code form uses it, the paper form does not.
    changed = txt.clone()
    changed[2, 3:] = 5.0
    assert losses.efa(img, changed, mask, pids=pids, form="paper").item() == pytest.approx(
        paper.item(), rel=1e-6
    )
    assert losses.efa(img, changed, mask, pids=pids).item() != pytest.approx(code.item(), rel=1e-4)
    # The code form has no identity handling; the mask does not select tokens there.
    assert losses.efa(img, txt, mask).item() == code.item()
    assert losses.efa(img, txt, torch.ones_like(mask)).item() == code.item()


def test_efa_code_gradient_is_much_smaller_than_paper():
    g = torch.Generator().manual_seed(26)
    img = torch.randn(4, 16, 32, generator=g, requires_grad=True)
    txt = torch.randn(4, 12, 32, generator=g, requires_grad=True)
    mask = torch.ones(4, 12, dtype=torch.long)
    norms = {}
    for form in ("paper", "code"):
        gi, gt = torch.autograd.grad(losses.efa(img, txt, mask, pids=torch.arange(4), form=form), [img, txt])
        norms[form] = float(torch.cat([gi.flatten(), gt.flatten()]).norm())
    assert norms["paper"] > 5 * norms["code"] > 0


# --------------------------------------------------------------------------- errors


def test_unknown_forms_name_the_allowed_values():
    pids = torch.tensor(_PIDS)
    with pytest.raises(ValueError, match="'paper', 'code'"):
        losses.a_sdm(_V, _T, pids, form="authors")
    with pytest.raises(ValueError, match="'sum', 'l2'"):
        losses.cmpm(_V, _T, pids, label_norm="l1")
    with pytest.raises(ValueError, match="'joint', 'separate'"):
        losses.mla([_V], [_T], pids, form="sum")
    img, txt, mask = _efa_inputs(27)
    with pytest.raises(ValueError, match="'paper', 'code'"):
        losses.efa(img, txt, mask, form="Code")
    with pytest.raises(ValueError, match="same length"):
        losses.mla([_V, _V], [_T], pids)
    with pytest.raises(ValueError, match="no real token"):
        losses.efa(img, txt, torch.zeros_like(mask))
