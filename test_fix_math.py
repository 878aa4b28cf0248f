"""Tests of issue 18's exactness fixes: the leave-one-out KD baseline under the KD masks, and the exact KL (and the
other reductions of the loss) under bfloat16 autocast.

Part 1 enumerates every pair of sequences of test_kdrl's tabular policies (a group of G = 2) and takes expectations
exactly. Part 2 runs the float32 code under CPU bfloat16 autocast, which applies the same op policy as CUDA's
(matmuls in bfloat16, reductions kept in float32), against float64 references.
"""
import dataclasses

import pytest
import torch

import kdrl
from test_kdrl import (
    _FIX_L,
    _FIX_STUDENT,
    _FIX_TEACHER,
    _FIX_V,
    _LOO_MASKS,
    CHARS,
    F64,
    _fixed,
    _largest_case,
    _rollouts_for,
    _tiny,
    _token_logp,
    _tree,
)
from train_tiny import char_tokenizer

_U32 = 2.0**-23  # float32 machine epsilon


# -----------------------------------------------------------------------------
# 1. The leave-one-out KD baseline under each KD mask, by exact enumeration.


def _pair_returns_grad(student, teacher, V, L, kd_mask, leave_one_out, gamma=1.0):
    """Σ over every ordered pair of sequences (G = 2) of P_i P_j ∇(−Σ_t R_t log π_t), with R = kd_reward_returns
    of the pair: the expected policy gradient of the KD return alone (what β·R adds to the advantage, μ = 1).
    A sequence is correct when its first token is 1, as in test_kdrl's _pair_kd_grad."""
    tok, ctx, mask, *_ = _tree(V, L)
    n = tok.shape[0]
    i, j = (x.reshape(-1) for x in torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"))
    rows = torch.stack([i, j], dim=1).reshape(-1)  # (2 n²,): pair k is rows 2k and 2k + 1
    logp = _token_logp(student, tok[rows], ctx[rows], mask[rows])  # (2 n², L)
    tlogp = _token_logp(teacher, tok[rows], ctx[rows], mask[rows])  # (2 n², L)
    P = logp.sum(1).exp().detach()  # (2 n²,)
    pair_prob = (P[0::2] * P[1::2]).repeat_interleave(2)[:, None]  # (2 n², 1)
    correct = tok[rows, 0] == 1  # (2 n²,)
    keep = kdrl.kd_response_mask(correct, kd_mask, 2)[:, None] & mask[rows]  # (2 n², L)
    returns = kdrl.kd_reward_returns(logp, tlogp, mask[rows], keep, gamma, 2, leave_one_out)  # (2 n², L)
    return torch.autograd.grad(-(pair_prob * returns * logp).sum(), student)[0]


def _loo_accepted(kd_mask: str) -> bool:
    try:
        kdrl.validate_config(kdrl.KDRLConfig.from_method("kdrl-seq", kd_mask=kd_mask, kd_baseline="loo"))
    except kdrl.KDRLError:
        return False
    return True


def test_loo_baseline_is_refused_exactly_where_it_biases_the_gradient():
    """Why kdrl refuses kd_baseline="loo" with kd_mask="group": under "group" whether the other response keeps its
    return depends on whether this one is correct, so the baseline depends on this response and the expected
    gradient moves (by 0.2 here, against a gradient of 1), while under "none" and "response" it is unchanged to
    float64 rounding. validate_config accepts loo with exactly the masks where it is unbiased."""
    student, teacher = _fixed(_FIX_STUDENT, grad=True), _fixed(_FIX_TEACHER)
    for kd_mask in kdrl._CHOICES["kd_mask"]:
        with_loo = _pair_returns_grad(student, teacher, _FIX_V, _FIX_L, kd_mask, True)
        without = _pair_returns_grad(student, teacher, _FIX_V, _FIX_L, kd_mask, False)
        gap = (with_loo - without).abs().max().item()
        assert gap > 0.1 if kd_mask == "group" else gap < 1e-14
        assert _loo_accepted(kd_mask) == (gap < 1e-14), kd_mask
    V, L, (student, teacher) = _largest_case(2)  # and on the largest tree (121 sequences, 14,641 pairs)
    with_loo = _pair_returns_grad(student, teacher, V, L, "group", True)
    assert (with_loo - _pair_returns_grad(student, teacher, V, L, "group", False)).abs().max() > 1e-3


def test_loo_enumeration_covers_every_mask_kdrl_accepts_with_loo():
    """test_kdrl's enumeration of the leave-one-out baseline (test_enum_leave_one_out_kd_baseline_keeps_the_expected_
    gradient) runs over _LOO_MASKS: exactly the masks validate_config accepts with kd_baseline="loo"."""
    accepted = tuple(m for m in kdrl._CHOICES["kd_mask"] if _loo_accepted(m))
    assert accepted == _LOO_MASKS == ("none", "response")


def test_loo_baseline_with_group_mask_is_refused_by_name():
    """validate_config names the fields, the reason and the way out; the alternatives it suggests are accepted."""
    cfg = kdrl.KDRLConfig.from_method("kdrl-seq", kd_mask="group")  # kd_baseline="loo" is the default
    with pytest.raises(kdrl.KDRLError) as err:
        kdrl.validate_config(cfg)
    message = str(err.value)
    reason = "depends on whether this response is correct"
    for part in ("kd_baseline='loo'", "kd_mask='group'", "kd_mode='reward'", reason, "kd_baseline='none'"):
        assert part in message
    kdrl.validate_config(dataclasses.replace(cfg, kd_baseline="none"))  # the ways out are accepted
    kdrl.validate_config(dataclasses.replace(cfg, kd_mask="response"))
    kdrl.validate_config(dataclasses.replace(cfg, kd_mode="loss", method="kdrl-mask"))  # loss mode has no baseline
    # kdrl_loss, which people copy without validate_config, refuses it too
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="kd_baseline='loo' with kd_mask='group'"):
        kdrl.kdrl_loss(logp, logp.detach(), logp.detach(), torch.zeros(2), mask, torch.zeros(2, dtype=torch.bool),
                       dataclasses.replace(cfg, group_size=2), 0.1)


# -----------------------------------------------------------------------------
# 2. The exact KL and the loss's reductions under bfloat16 autocast, against float64.


def _bf16_autocast(enabled: bool = True) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _logits(*shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def _ref_kl(s, t):
    """KL(softmax(s) ‖ softmax(t)) per row, float64, from the definition."""
    logp, logq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _f32_tol(s, t):
    """Per-row float32 rounding bound: a few ulps of the largest log-prob magnitude involved (as in test_kdrl)."""
    return 4 * _U32 * (s.abs().amax(-1) + t.abs().amax(-1) + 1)


@pytest.mark.parametrize("V, N", [(5000, 12), (151936, 4)])
def test_full_kl_is_float32_exact_under_bf16_autocast(V, N):
    """full_kl of float32 logits under CPU bfloat16 autocast, and without it: value and gradient within float32
    rounding of the float64 definition (also at Qwen2.5's V = 151,936), and each gradient row sums to 0 up to the
    rounding of its own terms. Before the fix, autocast ran the Σ_v of the value as a bfloat16 bmm."""
    s64, t64, g_out = _logits(N, V, seed=1), _logits(N, V, seed=2), _logits(N, seed=3, scale=1.0)
    s_ref = s64.clone().requires_grad_(True)
    ref = _ref_kl(s_ref, t64)  # (N,)
    (ref_grad,) = torch.autograd.grad((ref * g_out).sum(), s_ref)  # (N, V)
    tol = _f32_tol(s64, t64)  # (N,)
    for autocast in (False, True):
        s = s64.float().requires_grad_(True)
        with _bf16_autocast(autocast):
            out = kdrl.full_kl(s, t64.float(), chunk_size=3)  # (N,), in chunks of 3 rows
            (out * g_out.float()).sum().backward()
        assert out.dtype == s.grad.dtype == torch.float32
        assert ((out.double() - ref.detach()).abs() <= tol).all()
        assert ((s.grad.double() - ref_grad).abs() <= tol[:, None] * g_out.abs()[:, None]).all()
        row_sums = s.grad.double().sum(-1).abs()  # (N,): Σ_v p (log p − log q − KL) = 0
        assert (row_sums <= 16 * _U32 * s.grad.double().abs().sum(-1)).all()
    assert ref_grad.abs().max() > 1000 * tol.max()  # the tolerance is far below the signal


def _heads(H, H_T, V, seed=0):
    """Two output heads padded past V to different widths, as Qwen2.5-0.5B and 7B are."""
    torch.manual_seed(seed)
    return torch.nn.Linear(H, V + 3, bias=False), torch.nn.Linear(H_T, V + 7, bias=False).requires_grad_(False)


def test_head_logprobs_kl_is_float32_exact_under_bf16_autocast():
    """The chunked path under CPU bfloat16 autocast (kdrl's update on CUDA with dtype=auto). The output heads run in
    bfloat16, as the model does; everything after them (the tempered log-softmax gather, the exact KL and its
    gradient) is within float32 rounding of float64 computed from the same bfloat16 logits. With identity heads
    (rows that are already float32 logits) the gradient is checked too."""
    V, N, tau = 5000, 13, 0.7
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    head, teacher_head = _heads(16, 24, V)
    hidden, teacher_hidden = _logits(N, 16, seed=5, scale=1.5).float(), _logits(N, 24, seed=6, scale=1.5).float()
    with _bf16_autocast(), torch.no_grad():
        logits, teacher_logits = head(hidden), teacher_head(teacher_hidden)  # (N, V + 3), (N, V + 7)
        logp, kl = kdrl.head_logprobs(head, hidden, targets, tau, V, chunk_size=5, teacher=(teacher_head,
                                                                                           teacher_hidden))
    assert logits.dtype == torch.bfloat16  # the head itself is bfloat16 under autocast: expected
    s, t = logits[:, :V].double() / tau, teacher_logits[:, :V].double() / tau  # (N, V) each
    tol = _f32_tol(s, t)  # (N,)
    assert logp.dtype == kl.dtype == torch.float32
    assert ((logp.double() - torch.log_softmax(s, -1).gather(1, targets[:, None]).squeeze(1)).abs() <= tol).all()
    assert ((kl.double() - _ref_kl(s, t)).abs() <= tol).all()

    # identity heads: float32 logits in, so the float64 reference of the gradient is exact
    s_ref = logits[:, :V].double().requires_grad_(True)
    ref_logp = torch.log_softmax(s_ref / tau, -1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    ref_kl = _ref_kl(s_ref / tau, t)  # (N,)
    (ref_grad,) = torch.autograd.grad((ref_logp + ref_kl).sum(), s_ref)  # (N, V)
    x = logits[:, :V].float().requires_grad_(True)
    with _bf16_autocast():
        logp, kl = kdrl.head_logprobs(torch.nn.Identity(), x, targets, tau, V, chunk_size=5,
                                      teacher=(torch.nn.Identity(), teacher_logits.float()))
        (logp + kl).sum().backward()
    assert ((logp.double() - ref_logp.detach()).abs() <= tol).all()
    assert ((kl.double() - ref_kl.detach()).abs() <= tol).all()
    assert ((x.grad.double() - ref_grad).abs() <= tol[:, None] / tau).all()


def test_token_logprobs_kl_teacher_is_float32_exact_under_bf16_autocast():
    """token_logprobs(..., kl_teacher=...) under CPU bfloat16 autocast: its log-probs and exact KL are within float32
    rounding of float64 computed from the models' own bfloat16 logits at the response positions (each rebuilt from
    the final hidden states that return_hidden=True gives, by the same head under the same autocast)."""
    tok = char_tokenizer(CHARS)
    V, tau = len(tok), 0.9
    student, teacher = _tiny("llama", 24, 0), _tiny("qwen2", 32, 1).requires_grad_(False)
    ro = _rollouts_for(tok, student, ["12+3=", "7=", "1+1+1="], group_size=3, max_new_tokens=9, temperature=tau)
    mask = ro.response_mask  # (B, T)
    kw = dict(temperature=tau, vocab_size=V, chunk_size=5)
    with _bf16_autocast():
        with torch.no_grad():
            _, t_hidden = kdrl.token_logprobs(teacher, ro.input_ids, ro.attention_mask, mask, return_hidden=True, **kw)
            _, s_hidden = kdrl.token_logprobs(student, ro.input_ids, ro.attention_mask, mask, return_hidden=True, **kw)
            s_logits = student.get_output_embeddings()(s_hidden)  # (B, T, 24) bfloat16
            t_logits = teacher.get_output_embeddings()(t_hidden)  # (B, T, 32) bfloat16
        logp, kl = kdrl.token_logprobs(student, ro.input_ids, ro.attention_mask, mask,
                                       kl_teacher=(teacher.get_output_embeddings(), t_hidden), **kw)
    s, t = s_logits[..., :V].double() / tau, t_logits[..., :V].double() / tau  # (B, T, V) each
    ref_logp = torch.log_softmax(s, -1).gather(2, ro.response_ids[..., None]).squeeze(-1)  # (B, T)
    tol = _f32_tol(s, t)[mask]  # (n,)
    assert ((logp.double() - ref_logp)[mask].abs() <= tol).all()
    assert ((kl.double() - _ref_kl(s, t))[mask].abs() <= tol).all()
    assert _ref_kl(s, t)[mask].min() > 1000 * tol.max()  # the models differ by far more than the tolerance


def test_kdrl_loss_and_gradient_under_bf16_autocast_equal_float32():
    """Given the same float32 inputs, every method's loss, metrics and gradient are bit for bit the same under CPU
    bfloat16 autocast as without it: no reduction of the loss (the aggregations, the masked means, kdrl-seq's
    returns and leave-one-out baseline, kdrl-full's exact KL through full_kl) is downcast."""
    B, T, V, G = 6, 5, 300, 3
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    s_logits, t_logits = _logits(B, T, V, seed=7).float(), _logits(B, T, V, seed=8).float()
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9))
    advantages = torch.linspace(-1, 1, B)
    correct = torch.tensor([False, True, False, False, False, False])
    methods = dict(kdrl={}, kdrl_mask=dict(kd_mask="group"), kdrl_seq=dict(kd_baseline="loo"), rlad={},
                   kdrl_full={}, kd={})
    for name, overrides in methods.items():
        cfg = kdrl.KDRLConfig.from_method(name.replace("_", "-"), group_size=G, max_new_tokens=T, **overrides)
        kdrl.validate_config(cfg)
        results = []
        for autocast in (False, True):
            s = s_logits.clone().requires_grad_(True)
            with _bf16_autocast(autocast):
                lsm = torch.log_softmax(s, -1)  # (B, T, V)
                logp = lsm.gather(2, targets[..., None]).squeeze(-1)  # (B, T)
                teacher_logp = torch.log_softmax(t_logits, -1).gather(2, targets[..., None]).squeeze(-1)  # (B, T)
                old_logp = logp.detach() + 0.1 * torch.sin(torch.arange(B * T).view(B, T).float())
                exact_kl = kdrl.full_kl(s, t_logits) if cfg.kd_kind == "full" else None  # (B, T)
                loss, metrics = kdrl.kdrl_loss(logp, old_logp, teacher_logp, advantages, mask, correct, cfg, 0.3,
                                               exact_kl=exact_kl)
                loss.backward()
            assert loss.dtype == torch.float32
            results.append((loss.detach(), metrics, s.grad))
        (loss32, metrics32, grad32), (loss_ac, metrics_ac, grad_ac) = results
        assert torch.equal(loss_ac, loss32), name
        assert metrics_ac == metrics32, name
        assert torch.equal(grad_ac, grad32), name
        assert grad32.abs().max() > 0, name
