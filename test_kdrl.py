"""Tests of kdrl.py and train_tiny.py.

Part 1, the math: the central tests enumerate every sequence of a tiny autoregressive model (a table of
logits per prefix) and take expectations exactly, so the claims in kl_estimate's and kl_reward_to_go's
docstrings are checked as identities at float64 rounding level, with no sampling. Estimators are always
evaluated by calling kdrl's own functions; only the *references* (true KLs and their gradients) are
written out here, from their definitions.

Part 2, the model-facing half: sampling, log-probs, rewards, the loop, checkpoints and the CLI, on tiny
Llama and Qwen2 models and a character tokenizer built in code and saved to temporary directories.
Nothing is downloaded. They run on CPU, or on a GPU with `KDRL_TEST_DEVICE=cuda python -m pytest -q` (the few
that only mean something on CPU say why they skip there).
"""
import copy
import dataclasses
import functools
import itertools
import math
import os
import types
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import kdrl
import train
from train_tiny import char_tokenizer


def _test_device(name: str) -> str:
    """KDRL_TEST_DEVICE, validated: "cpu" (the default) or "cuda". "cuda" without a GPU is an error, not a silent
    CPU run or a skip of everything."""
    if name not in ("cpu", "cuda"):
        raise RuntimeError(f"KDRL_TEST_DEVICE={name!r}: must be 'cpu' or 'cuda'")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"KDRL_TEST_DEVICE=cuda, but torch {torch.__version__} sees no CUDA device (built for CUDA "
                           f"{torch.version.cuda}): unset KDRL_TEST_DEVICE to run the tests on CPU")
    return name


# The device of the model-facing tests (sampling, log-probs, the loop, resume, the demo, train_trl in one process);
# the pure math runs on CPU whatever it is, in float64.
DEVICE = _test_device(os.environ.get("KDRL_TEST_DEVICE", "cpu"))
if DEVICE == "cuda":
    # Reruns and resumes on one GPU are compared bit for bit: cuBLAS needs a fixed workspace for that (set before its
    # first call), and ops that have a deterministic CUDA kernel must use it. warn_only: the few without one warn
    # rather than fail; attention over these short sequences never splits its keys, so it stays deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    # float32 matmuls in IEEE float32, not TF32, so the float32 tolerances mean on the GPU what they mean on CPU
    torch.set_float32_matmul_precision("highest")

F64 = torch.float64
_U64 = 2.0**-52  # float64 machine epsilon (spacing at 1; twice the unit roundoff)
_SETTINGS = dict(derandomize=True, deadline=None, database=None)


def _cfg(**overrides) -> kdrl.KDRLConfig:
    """A config for the pure-math tests, whose batches are not groups: no leave-one-out KD baseline unless asked."""
    return kdrl.KDRLConfig(**{"kd_baseline": "none", **overrides})


def _close(actual, expected, rel=1e-10):
    """assert_close with atol scaled to the magnitude of the reference (float64 rounding level)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


# -----------------------------------------------------------------------------
# The tiny autoregressive model, enumerated exactly.
# Vocab {0..V-1}, token 0 = EOS. A sequence ends at its first EOS (scored, part of the response) or is
# truncated at length L. The "table" holds one row of logits per non-terminal prefix (no EOS, length < L).


@functools.lru_cache(maxsize=None)
def _tree(V: int, L: int):
    """Index tensors for every complete sequence and every non-terminal prefix.

    Returns (tok, ctx, mask, ptok, pctx, pmask): for sequence i and position t, tok[i, t] is the token and
    ctx[i, t] the table row of its context (padded slots: token 0, row 0, mask False). (ptok, pctx, pmask)
    describe each non-terminal prefix the same way, so that P(reach prefix) = exp(Σ masked log-probs).
    """
    prefixes = [p for n in range(L) for p in itertools.product(range(1, V), repeat=n)]
    row = {p: i for i, p in enumerate(prefixes)}
    seqs = [p + (0,) for p in prefixes] + list(itertools.product(range(1, V), repeat=L))

    def index(items, width):
        tok = torch.zeros(len(items), width, dtype=torch.long)
        ctx = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.bool)
        for i, s in enumerate(items):
            for t, y in enumerate(s):
                tok[i, t], ctx[i, t], mask[i, t] = y, row[s[:t]], True
        return tok, ctx, mask

    return index(seqs, L) + index(prefixes, max(L - 1, 1))


def _num_rows(V: int, L: int) -> int:
    return sum((V - 1) ** n for n in range(L))


def _token_logp(table, tok, ctx, mask):
    """(N, W) log-probs of the given tokens under the table; padded slots hold 0 (harmless)."""
    lsm = torch.log_softmax(table, dim=-1)  # (rows, V)
    return torch.where(mask, lsm[ctx, tok], 0.0)


def _seq_batch(table, V, L):
    tok, ctx, mask, *_ = _tree(V, L)
    return _token_logp(table, tok, ctx, mask), mask


def _reach(table, V, L):
    """P(reach s) for every non-terminal prefix s (row order of the table). Differentiable."""
    *_, ptok, pctx, pmask = _tree(V, L)
    return _token_logp(table, ptok, pctx, pmask).sum(1).exp()


def _row_kl(a, b):
    """KL(softmax(a) ‖ softmax(b)) per row, from the definition."""
    return (torch.softmax(a, -1) * (torch.log_softmax(a, -1) - torch.log_softmax(b, -1))).sum(-1)


def _grad(scalar, table):
    return torch.autograd.grad(scalar, table)[0]


def _expected_kd_grad(student, teacher, V, L, cfg, sampler=None, old=None):
    """Σ_seq P_sampler(seq) · ∇[L · kdrl_loss(seq)], one sequence per kdrl_loss call (B = 1, num_seqs = 1).

    sampler: the table that samples (weights P(seq), detached; default the student itself).
    old: the table whose log-probs are passed as old_logp (default: logp.detach(), i.e. μ = 1).
    """
    logp, mask = _seq_batch(student, V, L)
    tlogp, _ = _seq_batch(teacher, V, L)
    old_logp = logp.detach() if old is None else _seq_batch(old, V, L)[0]
    weights = (logp if sampler is None else _seq_batch(sampler, V, L)[0]).sum(1).exp().detach()
    zero_adv, not_correct = torch.zeros(1, dtype=F64), torch.zeros(1, dtype=torch.bool)
    total = 0.0
    for i in range(logp.shape[0]):
        loss, _ = kdrl.kdrl_loss(
            logp[i : i + 1], old_logp[i : i + 1], tlogp[i : i + 1], zero_adv, mask[i : i + 1], not_correct, cfg, 1.0,
            num_seqs=1,
        )
        total = total + weights[i] * loss * L
    return _grad(total, student)


def _enum_cfg(L, **overrides):
    return _cfg(**{**dict(loss_agg="constant", max_new_tokens=L, kd_mode="loss", beta=1.0), **overrides})


@st.composite
def _tables(draw, n: int):
    """(V, L, [n logit tables]) with V in 2..4, L in 2..4, logits in [-5, 5]; the first one requires grad."""
    V, L = draw(st.integers(2, 4)), draw(st.integers(2, 4))
    size = _num_rows(V, L) * V
    logit = st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False)
    tabs = [torch.tensor(draw(st.lists(logit, min_size=size, max_size=size)), dtype=F64).view(-1, V) for _ in range(n)]
    tabs[0].requires_grad_(True)
    return V, L, tabs


def _largest_case(n: int):
    """An explicit (V, L) = (4, 4) example (121 sequences), so the largest tree is always exercised."""
    rows = _num_rows(4, 4)
    tabs = [5 * torch.linspace(-3.0 + k, 4.0 + 2 * k, rows * 4, dtype=F64).view(rows, 4).sin() for k in range(n)]
    tabs[0].requires_grad_(True)
    return 4, 4, tabs


# Fixed, hand-picked tables (V = 3, L = 3: 7 non-terminal prefixes) for the "differs by a clear margin" tests.
_FIX_V, _FIX_L = 3, 3
_FIX_STUDENT = [[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [-2.0, 1.0, 0.3], [0.0, 2.5, -1.5],
                [1.0, -0.7, 0.4], [-0.3, 0.8, -2.2], [2.0, 0.1, -1.0]]  # fmt: skip
_FIX_TEACHER = [[-0.5, 1.2, 0.3], [0.2, -1.3, 1.7], [1.1, 0.4, -0.9], [-1.4, 0.6, 2.1],
                [0.3, 1.9, -0.2], [1.6, -0.8, 0.5], [-0.6, -1.1, 1.3]]  # fmt: skip
_FIX_OLD = [[1.5, -0.2, 0.0], [-1.0, 0.9, 0.4], [0.7, -1.6, 1.2], [2.0, -0.5, 0.1],
            [-1.2, 0.3, 1.0], [0.4, -2.0, 0.6], [0.9, 1.4, -0.8]]  # fmt: skip


def _fixed(rows, grad=False):
    return torch.tensor(rows, dtype=F64, requires_grad=grad)


def test_tree_enumeration_is_a_distribution():
    """The enumeration is complete and disjoint: exact probabilities of all sequences sum to 1, and the
    sequence count is Σ_{n<L} (V−1)^n ended by EOS plus (V−1)^L truncated."""
    for V, L in itertools.product(range(2, 5), range(2, 5)):
        table = torch.linspace(-3, 4, _num_rows(V, L) * V, dtype=F64).view(-1, V).sin() * 5
        logp, mask = _seq_batch(table, V, L)
        assert logp.shape[0] == _num_rows(V, L) + (V - 1) ** L
        assert abs(logp.sum(1).exp().sum().item() - 1.0) < 1e-13


# -----------------------------------------------------------------------------
# 1. Exact enumeration through the real functions.


@settings(max_examples=25, **_SETTINGS)
@given(_tables(2))
@example(_largest_case(2))
def test_enum_k1_k3_values_are_unbiased_for_sequence_kl(data):
    """(a) E[Σ_t k1] = E[Σ_t k3] = KL(P ‖ P_T) over whole sequences, exactly (kl_estimate on the masked batch)."""
    V, L, (student, teacher) = data
    logp, mask = _seq_batch(student.detach(), V, L)
    tlogp, _ = _seq_batch(teacher, V, L)
    P, PT = logp.sum(1).exp(), tlogp.sum(1).exp()
    seq_kl = (P * (P.log() - PT.log())).sum()
    for kind in ("k1", "k3"):
        per_seq = torch.where(mask, kdrl.kl_estimate(logp, tlogp, kind), 0.0).sum(1)
        _close((P * per_seq).sum(), seq_kl)
    assert seq_kl.item() >= -1e-12


@settings(max_examples=20, **_SETTINGS)
@given(_tables(2))
@example(_largest_case(2))
def test_enum_loss_gradients_k1_k2_k3(data):
    """(b) E[∇ Σ k2] = ∇ token-level reverse KL Σ_s P(s)·KL(π(·|s) ‖ π_T(·|s)) (P(s) held fixed);
    (c) E[∇ Σ k3] = ∇ token-level *forward* KL Σ_s P(s)·KL(π_T(·|s) ‖ π(·|s));
    (d) E[∇ Σ k1] = 0. All through kdrl_loss, one sequence per call."""
    V, L, (student, teacher) = data
    reach = _reach(student, V, L).detach()
    reverse = _grad((reach * _row_kl(student, teacher)).sum(), student)
    forward = _grad((reach * _row_kl(teacher, student)).sum(), student)
    _close(_expected_kd_grad(student, teacher, V, L, _enum_cfg(L, kd_kind="k2")), reverse)
    _close(_expected_kd_grad(student, teacher, V, L, _enum_cfg(L, kd_kind="k3")), forward)
    g1 = _expected_kd_grad(student, teacher, V, L, _enum_cfg(L, kd_kind="k1"))
    torch.testing.assert_close(g1, torch.zeros_like(g1), rtol=0, atol=1e-12)


@settings(max_examples=20, **_SETTINGS)
@given(_tables(2))
@example(_largest_case(2))
def test_enum_reward_to_go_gamma1_is_sequence_kl_gradient(data):
    """(e) kd_mode="reward", γ = 1, constant agg: E[∇loss] is the *full* gradient of the sequence-level reverse
    KL Σ P log(P/P_T) (P not detached), and equals −E[Σ_t G_t ∇log π_t] built from kl_reward_to_go.
    With γ = 0 it is the token-level reverse KL gradient of (b)."""
    V, L, (student, teacher) = data
    logp, mask = _seq_batch(student, V, L)
    tlogp, _ = _seq_batch(teacher, V, L)
    P, PT = logp.sum(1).exp(), tlogp.sum(1).exp()
    seq_kl_grad = _grad((P * (P.log() - PT.log())).sum(), student)

    via_loss = _expected_kd_grad(student, teacher, V, L, _enum_cfg(L, kd_mode="reward", kd_gamma=1.0))
    _close(via_loss, seq_kl_grad)
    logp, _ = _seq_batch(student, V, L)  # fresh graph
    G = kdrl.kl_reward_to_go(logp, tlogp, mask, 1.0)
    assert not G.requires_grad
    direct = _grad(-(P.detach()[:, None] * G * logp).sum(), student)
    _close(direct, seq_kl_grad)

    reach = _reach(student, V, L).detach()
    token_reverse = _grad((reach * _row_kl(student, teacher)).sum(), student)
    via_loss0 = _expected_kd_grad(student, teacher, V, L, _enum_cfg(L, kd_mode="reward", kd_gamma=0.0))
    _close(via_loss0, token_reverse)


def _pair_kd_grad(student, teacher, V, L, gamma, baseline, weighted=True, kd_mask="none"):
    """Σ over every ordered pair of sequences (a group of G = 2) of P_i P_j ∇loss (weighted=False: of ∇loss), with
    kd_mode="reward", zero advantages, the constant normaliser. A sequence is "correct" when its first token is 1,
    so that kd_mask="response" (KD only on incorrect responses) depends on the response itself."""
    tok, ctx, mask, *_ = _tree(V, L)
    n = tok.shape[0]
    i, j = (x.reshape(-1) for x in torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"))
    rows = torch.stack([i, j], dim=1).reshape(-1)  # (2 n²,): pair k is rows 2k and 2k + 1
    cfg = _enum_cfg(L, kd_mode="reward", kd_gamma=gamma, group_size=2, kd_baseline=baseline, beta=1.0, kd_mask=kd_mask)
    logp = _token_logp(student, tok[rows], ctx[rows], mask[rows])  # (2 n², L)
    tlogp = _token_logp(teacher, tok[rows], ctx[rows], mask[rows])
    P = logp.sum(1).exp().detach()  # (2 n²,)
    if weighted:
        pair_prob = (P[0::2] * P[1::2]).repeat_interleave(2)[:, None]  # (2 n², 1)
    else:
        pair_prob = torch.ones_like(P)[:, None]  # (2 n², 1)
    zeros = torch.zeros(len(rows), dtype=F64)
    correct = tok[rows, 0] == 1  # (2 n²,)
    loss, _ = kdrl.kdrl_loss(logp, logp.detach(), tlogp, zeros, mask[rows], correct, cfg, 1.0, num_seqs=2,
                             sampler_weight=pair_prob.expand_as(logp))
    return _grad(loss, student)


# Every kd_mask that validate_config accepts with kd_baseline="loo" (test_loo_enumeration_covers_every_mask_kdrl_
# accepts_with_loo checks the list against it): "group" is refused, because there the baseline is biased (shown by
# enumeration in test_loo_baseline_is_refused_exactly_where_it_biases_the_gradient).
_LOO_MASKS = ("none", "response")


@settings(max_examples=10, **_SETTINGS)
@given(_tables(2), st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from(_LOO_MASKS))
@example(_largest_case(2), 1.0, "none")
@example(_largest_case(2), 1.0, "response")
@example(_largest_case(2), 0.5, "response")
def test_enum_leave_one_out_kd_baseline_keeps_the_expected_gradient(data, gamma, kd_mask):
    """kd_baseline="loo" (kdrl-seq's default) is unbiased, exactly, under every KD mask kdrl accepts with it: over
    every *pair* of sequences (G = 2, each response's baseline is the other's masked return), E[∇loss] =
    Σ P_i P_j ∇loss equals the same sum without the baseline (for γ = 1 and no mask, the gradient of the
    sequence-level reverse KL: test above), also when the KD mask depends on the response's own correctness
    ("response": the other's masked return still depends on the other response alone)."""
    V, L, (student, teacher) = data
    with_loo = _pair_kd_grad(student, teacher, V, L, gamma, "loo", kd_mask=kd_mask)
    without = _pair_kd_grad(student, teacher, V, L, gamma, "none", kd_mask=kd_mask)
    scale = max(1.0, without.abs().max().item())
    torch.testing.assert_close(with_loo, without, rtol=1e-10, atol=1e-10 * scale)  # float64 rounding level


def test_leave_one_out_kd_baseline_changes_each_pairs_gradient():
    """The test above is not vacuous: pair by pair (unweighted) the baseline changes the gradient by a clear margin;
    only its expectation is unchanged."""
    student, teacher = _fixed(_FIX_STUDENT, grad=True), _fixed(_FIX_TEACHER)
    loo = _pair_kd_grad(student, teacher, _FIX_V, _FIX_L, 1.0, "loo", weighted=False)
    none = _pair_kd_grad(student, teacher, _FIX_V, _FIX_L, 1.0, "none", weighted=False)
    assert (loo - none).abs().max() > 0.1
    expected_loo = _pair_kd_grad(student, teacher, _FIX_V, _FIX_L, 1.0, "loo")
    _close(expected_loo, _pair_kd_grad(student, teacher, _FIX_V, _FIX_L, 1.0, "none"))


def _kdrl_seq(L, **overrides) -> kdrl.KDRLConfig:
    """The kdrl-seq preset as a user builds it, for a group of G = 2 responses of at most L tokens, β = 1."""
    return kdrl.KDRLConfig.from_method("kdrl-seq", **{"group_size": 2, "max_new_tokens": L, "beta": 1.0, **overrides})


def _accepted(cfg) -> bool:
    try:
        train.validate_config(cfg)
    except kdrl.KDRLError:
        return False
    return True


def _pairs_expected_grad(student, teacher, V, L, cfg, weighted=True):
    """Σ over every ordered pair of sequences (one group of G = 2, one batch) of P_i P_j ∇kdrl_loss(pair) under cfg,
    zero advantages (weighted=False: of ∇kdrl_loss(pair)). Each pair is normalised as a batch of its own: the pair's
    probability enters as sampler_weight, divided by the pair's token count under token-mean (num_tokens=1). A
    sequence is "correct" when its first token is 1, so kd_mask="response" depends on the response itself."""
    tok, ctx, mask, *_ = _tree(V, L)
    n = tok.shape[0]
    i, j = (x.reshape(-1) for x in torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"))
    rows = torch.stack([i, j], dim=1).reshape(-1)  # (2 n²,): pair k is rows 2k and 2k + 1
    logp = _token_logp(student, tok[rows], ctx[rows], mask[rows])  # (2 n², L)
    tlogp = _token_logp(teacher, tok[rows], ctx[rows], mask[rows])  # (2 n², L)
    P = logp.sum(1).exp().detach()  # (2 n²,)
    weight = (P[0::2] * P[1::2]).repeat_interleave(2) if weighted else torch.ones_like(P)  # (2 n²,)
    pair_tokens = mask[rows].sum(1).view(-1, 2).sum(1).repeat_interleave(2)  # (2 n²,)
    token_mean = cfg.loss_agg == "token-mean"
    weight = weight / pair_tokens if token_mean else weight
    loss, _ = kdrl.kdrl_loss(logp, logp.detach(), tlogp, torch.zeros(len(rows), dtype=F64), mask[rows],
                             tok[rows, 0] == 1, cfg, cfg.beta, num_tokens=1 if token_mean else None, num_seqs=2,
                             sampler_weight=weight[:, None].expand_as(logp))
    return _grad(loss, student)


def _sequence_kl_grad(student, teacher, V, L):
    """∇ KL(P ‖ P_T) over whole sequences, P not detached: the sequence-level reverse KL's full gradient."""
    logp, _ = _seq_batch(student, V, L)
    tlogp, _ = _seq_batch(teacher, V, L)
    P, PT = logp.sum(1).exp(), tlogp.sum(1).exp()
    return _grad((P * (P.log() - PT.log())).sum(), student)


@settings(max_examples=8, **_SETTINGS)
@given(_tables(2))
@example(_largest_case(2))
def test_enum_kdrl_seq_preset_is_the_sequence_level_kl_gradient(data):
    """The kdrl-seq preset itself (its loss_agg, its leave-one-out baseline), G = 2, over every pair of responses of any
    lengths: L · E[∇loss] is the gradient of the sequence-level reverse KL, to float64 rounding (constant divisor
    L · 2: E[∇loss] = 2 · ∇KL / (2L))."""
    V, L, (student, teacher) = data
    cfg = _kdrl_seq(L)
    assert _accepted(cfg) and cfg.kd_baseline == "loo"
    _close(L * _pairs_expected_grad(student, teacher, V, L, cfg), _sequence_kl_grad(student, teacher, V, L))


def test_enum_kdrl_seq_every_accepted_aggregation_and_mask(monkeypatch):
    """Every (loss_agg, kd_mask, kd_baseline) of kd_mode="reward", on a fixed table, over every pair of responses of
    different lengths, through kdrl_loss: validate_config accepts the leave-one-out baseline exactly where it leaves
    the expected gradient unchanged (constant divisor, kd_mask "none" or "response"; elsewhere it moves it by more than
    1e-4), and what the docs say of each accepted one holds: with the constant divisor and no mask, the
    sequence-level reverse KL's gradient exactly; with token-mean or seq-mean, close to it but biased (cosines 0.998
    and 0.985 on this table; directions apart by more than 1e-4)."""
    student, teacher = _fixed(_FIX_STUDENT, grad=True), _fixed(_FIX_TEACHER)
    V, L = _FIX_V, _FIX_L
    reference = _sequence_kl_grad(student, teacher, V, L)
    combos = list(itertools.product(_AGGS, train._CHOICES["kd_mask"], ("none", "loo")))
    accepted = {combo: _accepted(_kdrl_seq(L, loss_agg=combo[0], kd_mask=combo[1], kd_baseline=combo[2]))
                for combo in combos}
    monkeypatch.setattr(kdrl, "leave_one_out_bias", _no_bias)  # so kdrl_loss computes the refused ones too
    grads = {combo: _pairs_expected_grad(student, teacher, V, L, _kdrl_seq(L, loss_agg=combo[0], kd_mask=combo[1],
                                                                             kd_baseline=combo[2]))
             for combo in combos}
    for agg, kd_mask, baseline in combos:
        gap = (grads[agg, kd_mask, "loo"] - grads[agg, kd_mask, "none"]).abs().max().item()
        if baseline == "loo":
            assert accepted[agg, kd_mask, "loo"] == (agg == "constant" and kd_mask != "group"), (agg, kd_mask)
            assert gap < 1e-15 if accepted[agg, kd_mask, "loo"] else gap > 1e-4, (agg, kd_mask, gap)
            continue
        assert accepted[agg, kd_mask, "none"], (agg, kd_mask)
        if kd_mask != "none":
            continue
        scaled = L * grads[agg, kd_mask, "none"] if agg == "constant" else grads[agg, kd_mask, "none"]
        if agg == "constant":
            _close(scaled, reference)
        else:  # other normalisers: a different scale, and a bias
            cosine = (scaled * reference).sum() / (scaled.norm() * reference.norm())
            direction_gap = (scaled / scaled.norm() - reference / reference.norm()).abs().max()
            assert 0.98 < cosine < 1 - 1e-4 and direction_gap > 1e-4, (agg, cosine.item(), direction_gap.item())


def _no_bias(cfg) -> None:
    """kdrl.leave_one_out_bias switched off, to measure what the refused configurations would compute."""
    return None


def _per_sequence_moments(student, teacher, V, L):
    """For every sequence: its probability P (n,), its KD return-to-go r (n, L) (γ = 1, 0 past its end) and its
    score rows S (n, L, D), S[t] = ∇ log π(y_t | y_<t) over the table's D entries (0 past its end)."""
    tok, ctx, mask, *_ = _tree(V, L)
    logp = _token_logp(student, tok, ctx, mask)  # (n, L)
    returns = kdrl.kl_reward_to_go(logp, _token_logp(teacher, tok, ctx, mask), mask, 1.0)  # (n, L)
    scores = torch.zeros(*mask.shape, student.numel(), dtype=F64)  # (n, L, D)
    for i, t in mask.nonzero().tolist():
        scores[i, t] = torch.autograd.grad(logp[i, t], student, retain_graph=True)[0].reshape(-1)
    return logp.sum(1).exp().detach(), returns, scores


def _group_second_moment(P, r, S, G, leave_one_out):
    """E‖Σ_i g_i‖² in closed form for a group of G independent responses, g_i = Σ_t (r_i[t] − b_i[t]) S_i[t] with
    b_i the mean of the other G − 1 returns (leave_one_out) or 0. From single-sequence moments only, using
    E[S[t]] = 0 (the score's expectation) and independence: what test_kdrl checks the loss against, and what gives
    the second moment at group sizes too large to enumerate."""
    x = torch.einsum("nl,nld->nd", r, S)  # (n, D): Σ_t r[t] S[t]
    second = G * (P @ x.pow(2).sum(1)) + G * (G - 1) * (P @ x).pow(2).sum()
    if not leave_one_out:
        return second.item()
    Q = torch.einsum("n,nld,nmd->lm", P, S, S)  # (L, L): E[S Sᵀ]
    q = torch.einsum("n,nld,nmd,nm->l", P, S, S, r)  # (L,): E[S Sᵀ r]
    mean_r = P @ r  # (L,)
    R2 = torch.einsum("n,nl,nm->lm", P, r, r)  # (L, L): E[r rᵀ]
    W = torch.einsum("n,na,nbd->abd", P, r, S)  # (L, L, D): E[r[a] S[b]]
    cross = torch.einsum("abd,bad->", W, W)  # E[(S_iᵀ r_k)·(S_kᵀ r_i)], i ≠ k
    extra = (-2 * q @ mean_r + (torch.trace(Q @ R2) + cross) / (G - 1) + (G - 2) / (G - 1) * mean_r @ Q @ mean_r)
    return (second + G * extra).item()


def _enumerated_second_moment(student, teacher, V, L, G, baseline):
    """Σ over every G-tuple of sequences of Π P ‖∇kdrl_loss(group)‖², kdrl-seq at a constant divisor of G (so the
    gradient is Σ_i g_i, as in _group_second_moment)."""
    tok, ctx, mask, *_ = _tree(V, L)
    P = _token_logp(student, tok, ctx, mask).sum(1).exp().detach()  # (n,)
    cfg = _kdrl_seq(1, group_size=G, kd_baseline=baseline)  # max_new_tokens 1: the divisor is G
    total = 0.0
    for group in itertools.product(range(len(tok)), repeat=G):
        rows = torch.tensor(group)
        logp = _token_logp(student, tok[rows], ctx[rows], mask[rows])  # (G, L)
        teacher_logp = _token_logp(teacher, tok[rows], ctx[rows], mask[rows])  # (G, L)
        loss, _ = kdrl.kdrl_loss(logp, logp.detach(), teacher_logp, torch.zeros(G, dtype=F64), mask[rows],
                                 torch.zeros(G, dtype=torch.bool), cfg, 1.0)
        total += P[rows].prod() * (G * _grad(loss, student)).pow(2).sum()
    return total.item()


def test_enum_leave_one_out_baseline_variance_exactly():
    """The baseline exists to lower the variance of kdrl-seq's gradient; whether it does depends on the returns, and
    this measures it exactly. The second moment of a group's gradient, enumerated over every group of G = 2 and 3
    responses through kdrl_loss, equals the closed form built from single sequences (so a baseline added instead of
    subtracted, which leaves every mean alone, fails here). The closed form then gives any G: on a random table the
    baseline lowers the variance (× 0.58 at G = 2), on the fixed table it raises it at every G from 2 to 64 (× 1.97 at
    G = 2, × 1.18 at G = 8): its returns-to-go, 0 past each response's end, make a poor per-position baseline."""
    torch.manual_seed(0)
    rows = _num_rows(3, 2)
    random_student = (2 * torch.randn(rows, 3, dtype=F64)).requires_grad_(True)
    random_teacher = 2 * torch.randn(rows, 3, dtype=F64)
    fixed_student, fixed_teacher = _fixed(_FIX_STUDENT, grad=True), _fixed(_FIX_TEACHER)
    cases = [(random_student, random_teacher, 3, 2, 2), (random_student, random_teacher, 3, 2, 3),
             (fixed_student, fixed_teacher, _FIX_V, _FIX_L, 2)]
    for student, teacher, V, L, G in cases:
        moments = _per_sequence_moments(student, teacher, V, L)
        for baseline in ("none", "loo"):
            enumerated = _enumerated_second_moment(student, teacher, V, L, G, baseline)
            closed_form = _group_second_moment(*moments, G, baseline == "loo")
            assert abs(enumerated - closed_form) <= 1e-12 * closed_form, (G, baseline, enumerated, closed_form)

    def variance_ratio(student, teacher, V, L, G):
        P, r, S = _per_sequence_moments(student, teacher, V, L)
        mean_sq = (G * (P @ torch.einsum("nl,nld->nd", r, S))).pow(2).sum().item()  # ‖E Σ g‖², the same for both
        return (_group_second_moment(P, r, S, G, True) - mean_sq) / (_group_second_moment(P, r, S, G, False) - mean_sq)

    assert variance_ratio(random_student, random_teacher, 3, 2, 2) == pytest.approx(0.579, abs=1e-3)
    fixed = [variance_ratio(fixed_student, fixed_teacher, _FIX_V, _FIX_L, G) for G in (2, 8, 64)]
    assert fixed == pytest.approx([1.966, 1.179, 1.062], abs=1e-3)
    # the returns themselves: each response's KD return minus the other's, position by position
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.0]], dtype=F64)
    teacher_logp = torch.tensor([[-1.5, -1.0], [-1.0, -3.0]], dtype=F64)
    both = torch.ones(2, 2, dtype=torch.bool)
    returns = kdrl.kl_reward_to_go(logp, teacher_logp, both, 1.0)  # [[0.5, 1.0], [1.5, -2.0]]
    expected = torch.stack([returns[0] - returns[1], returns[1] - returns[0]])
    assert torch.equal(kdrl.kd_reward_returns(logp, teacher_logp, both, both, 1.0, 2, leave_one_out=True), expected)


def test_leave_one_out_baseline_is_the_mean_of_the_others():
    returns = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0], [10.0, 0.0], [0.0, 0.0], [7.0, 7.0]])
    expected = torch.tensor([[4.0, 6.5], [3.0, 5.5], [2.0, 3.0], [3.5, 3.5], [8.5, 3.5], [5.0, 0.0]])
    assert torch.equal(kdrl.leave_one_out_baseline(returns, 3), expected)
    assert torch.equal(kdrl.leave_one_out_baseline(returns, 1), torch.zeros_like(returns))


def test_enum_sequence_and_token_level_gradients_differ():
    """On a fixed table the γ = 1 (sequence-level) and γ = 0 / k2 (token-level) gradients differ clearly:
    token-level losses miss how a token changes which later contexts occur."""
    student, teacher = _fixed(_FIX_STUDENT, grad=True), _fixed(_FIX_TEACHER)
    V, L = _FIX_V, _FIX_L
    g_seq = _expected_kd_grad(student, teacher, V, L, _enum_cfg(L, kd_mode="reward", kd_gamma=1.0))
    g_k2 = _expected_kd_grad(student, teacher, V, L, _enum_cfg(L, kd_kind="k2"))
    assert (g_seq - g_k2).abs().max().item() > 1e-3


@settings(max_examples=15, **_SETTINGS)
@given(_tables(3))
@example(_largest_case(3))
def test_enum_off_policy_ratio_weight_is_exact(data):
    """Samples from an old table θ_old (weights P_old, old_logp from θ_old), k2, advantages 0: the detached
    per-token weight π/π_old makes E_old[∇loss] = ∇ Σ_s P_old(s) · KL(π_θ(·|s) ‖ π_T(·|s)) exactly."""
    V, L, (student, teacher, old) = data
    reach_old = _reach(old, V, L)
    ref = _grad((reach_old * _row_kl(student, teacher)).sum(), student)
    weighted = _expected_kd_grad(student, teacher, V, L, _enum_cfg(L, kd_kind="k2"), sampler=old, old=old)
    scale = max(1.0, ref.abs().max().item())  # the tolerance of _close, written out
    torch.testing.assert_close(weighted, ref, rtol=1e-10, atol=1e-10 * scale)


def test_enum_off_policy_weight_is_needed():
    """Without the weight (old_logp = logp.detach() on the same P_old samples) the result is clearly wrong,
    so the previous test is not vacuous."""
    student, teacher, old = _fixed(_FIX_STUDENT, grad=True), _fixed(_FIX_TEACHER), _fixed(_FIX_OLD)
    V, L = _FIX_V, _FIX_L
    ref = _grad((_reach(old, V, L) * _row_kl(student, teacher)).sum(), student)
    cfg = _enum_cfg(L, kd_kind="k2")
    weighted = _expected_kd_grad(student, teacher, V, L, cfg, sampler=old, old=old)
    unweighted = _expected_kd_grad(student, teacher, V, L, cfg, sampler=old)
    _close(weighted, ref)
    assert (unweighted - ref).abs().max().item() > 1e-3


# -----------------------------------------------------------------------------
# 2. kl_estimate


def _k3_grid(dtype):
    d = torch.linspace(-100, 100, 2001, dtype=F64)
    d = d[d.abs() > 1e-3]
    extra = torch.tensor([-100.0, -88.0, -87.5, -20.5, -20.0, -19.99, -1e-2, 1e-2, 20.0, 88.0, 100.0], dtype=F64)
    return torch.cat([d, extra]).to(dtype)


def test_kl_estimate_k3_float32_finite_with_correct_gradient_sign():
    """k3 in float32 on d ∈ [−100, 100]: value and gradient finite everywhere (no exp overflow), value ≥ 0 up to
    rounding, and the gradient has the sign of d, also beyond the clamp (d < −20)."""
    d = _k3_grid(torch.float32).requires_grad_(True)
    teacher = torch.zeros_like(d)
    k = kdrl.kl_estimate(d, teacher, "k3")
    k.sum().backward()
    assert torch.isfinite(k).all() and torch.isfinite(d.grad).all()
    assert (k >= -1e-6).all()
    assert torch.equal(torch.sign(d.grad), torch.sign(d.detach()))


def test_kl_estimate_k3_exact_inside_clamp_and_tangent_outside():
    """float64: |d| ≤ clamp: value e^(−d) − 1 + d and gradient 1 − e^(−d) to rounding. d < −clamp: the
    tangent continuation, value e^c (1 − c − d) − 1 + d and gradient held at 1 − e^c (docstring contract)."""
    for clamp in (20.0, 5.0):
        d = torch.linspace(-clamp, clamp, 4001, dtype=F64).requires_grad_(True)
        k = kdrl.kl_estimate(d, torch.zeros_like(d), "k3", clamp=clamp)
        (g,) = torch.autograd.grad(k.sum(), d)
        x = d.detach()
        tol = 4 * _U64 * (torch.exp(-x) + 1 + x.abs()) * (1 + x.abs())
        assert ((k.detach() - (torch.exp(-x) - 1 + x)).abs() <= tol).all()
        assert ((g - (1 - torch.exp(-x))).abs() <= tol).all()

        d = torch.linspace(-clamp - 80, -clamp - 1e-3, 999, dtype=F64).requires_grad_(True)
        k = kdrl.kl_estimate(d, torch.zeros_like(d), "k3", clamp=clamp)
        (g,) = torch.autograd.grad(k.sum(), d)
        x, ec = d.detach(), math.exp(clamp)
        tangent = ec * (1 - clamp - x) - 1 + x
        _close(k.detach(), tangent, rel=1e-13)
        _close(g, torch.full_like(g, 1 - ec), rel=1e-13)


def test_kl_estimate_k1_k2_and_teacher_is_constant():
    """k1 = d, k2 = d²/2 with gradients 1 and d; the teacher never receives a gradient even when it
    requires grad; an unknown kind raises ValueError."""
    logp = torch.tensor([-0.3, -2.0, -5.5, -0.01], dtype=F64, requires_grad=True)
    teacher = torch.tensor([-1.3, -0.2, -5.5, -7.0], dtype=F64, requires_grad=True)
    d = (logp - teacher).detach()
    k1 = kdrl.kl_estimate(logp, teacher, "k1")
    k2 = kdrl.kl_estimate(logp, teacher, "k2")
    assert torch.equal(k1.detach(), d) and torch.equal(k2.detach(), 0.5 * d * d)
    assert torch.equal(torch.autograd.grad(k1.sum(), logp)[0], torch.ones_like(d))
    assert torch.equal(torch.autograd.grad(k2.sum(), logp)[0], d)
    for kind in ("k1", "k2", "k3"):
        kdrl.kl_estimate(logp, teacher, kind).sum().backward()
        assert teacher.grad is None and logp.grad is not None
    for kind in ("k4", "full", "K2"):
        with pytest.raises(ValueError):
            kdrl.kl_estimate(logp, teacher, kind)


# -----------------------------------------------------------------------------
# 3. full_kl (computes in float32 by design: tolerances are float32 rounding, 2^-24 ≈ 6e-8).

_U32 = 2.0**-23  # float32 machine epsilon


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def _f32_tol(s, t):
    """Per-row float32 rounding bound: a few ulps of the largest log-prob magnitude involved."""
    m = s.abs().amax(-1) + t.abs().amax(-1) + 1
    return 4 * _U32 * m


def test_full_kl_matches_definition_value_and_gradient():
    """full_kl = Σ_v p (log p − log q) and its custom backward = autograd of that formula (float64 reference,
    float64 in, float64 out, to rounding; float32 in, float32 out, to float32 rounding; the teacher gets no gradient."""
    s = _logits(13, 7, seed=1).requires_grad_(True)
    t = _logits(13, 7, seed=2).requires_grad_(True)
    g_out = _logits(13, seed=3, scale=1.0)
    ref = _row_kl(s, t)
    (ref_grad,) = torch.autograd.grad((ref * g_out).sum(), s)
    out = kdrl.full_kl(s, t)
    assert out.shape == (13,) and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (out * g_out).sum().backward()
    assert s.grad.dtype == F64 and t.grad is None
    torch.testing.assert_close(s.grad, ref_grad, rtol=1e-10, atol=1e-12)
    s32 = s.detach().float().requires_grad_(True)
    out32 = kdrl.full_kl(s32, t.detach().float())
    assert out32.dtype == torch.float32
    assert ((out32.double() - ref.detach()).abs() <= _f32_tol(s, t).detach()).all()
    (out32.double() * g_out).sum().backward()
    assert ((s32.grad.double() - ref_grad).abs() <= _f32_tol(s, t).detach()[:, None]).all()
    assert ref_grad.abs().max() > 1000 * _f32_tol(s, t).max()  # the tolerance is far below the signal


def test_full_kl_chunking_is_invisible():
    """chunk_size = 1, 3 on 13 (prime) positions gives bit-identical values and gradients to one chunk."""
    s, t, g_out = _logits(13, 11, seed=4), _logits(13, 11, seed=5), _logits(13, seed=6, scale=1.0)
    results = []
    for chunk in (1, 3, 1024):
        x = s.clone().requires_grad_(True)
        out = kdrl.full_kl(x, t, chunk_size=chunk)
        out.backward(g_out.float())
        results.append((out, x.grad))
    for out, grad in results[:-1]:
        assert torch.equal(out, results[-1][0]) and torch.equal(grad, results[-1][1])


def test_full_kl_leading_dims():
    """(B, T, V) → (B, T), each position equal to the flat computation."""
    s, t = _logits(2, 3, 5, seed=7), _logits(2, 3, 5, seed=8)
    out = kdrl.full_kl(s, t)
    assert out.shape == (2, 3)
    assert torch.equal(out, kdrl.full_kl(s.reshape(6, 5), t.reshape(6, 5)).view(2, 3))
    assert ((out.double() - _row_kl(s, t)).abs() <= _f32_tol(s, t)).all()


def test_full_kl_padded_vocab_widths():
    """Student width 6, teacher width 9, vocab_size 5: the KL of the first 5 columns renormalised (the padded
    columns hold large logits that would dominate if used), and the padded student column gets exactly 0 grad."""
    s = _logits(4, 3, 6, seed=9)
    t = _logits(4, 3, 9, seed=10)
    s[..., 5:] = 30.0
    t[..., 5:] = 40.0
    s.requires_grad_(True)
    ref = _row_kl(s[..., :5], t[..., :5])
    (ref_grad,) = torch.autograd.grad(ref.sum(), s)
    out = kdrl.full_kl(s, t, vocab_size=5)
    assert out.shape == (4, 3)
    tol = _f32_tol(s[..., :5], t[..., :5]).detach()
    assert ((out.double() - ref.detach()).abs() <= tol).all()
    out.sum().backward()
    assert torch.equal(s.grad[..., 5:], torch.zeros_like(s.grad[..., 5:]))
    assert ((s.grad[..., :5] - ref_grad[..., :5]).abs() <= tol[..., None]).all()


def test_full_kl_rejects_bad_shapes():
    """Different widths without vocab_size, different leading dims, vocab_size above a width: ValueError."""
    with pytest.raises(ValueError):
        kdrl.full_kl(_logits(2, 6), _logits(2, 9))
    with pytest.raises(ValueError):
        kdrl.full_kl(_logits(2, 3, 5), _logits(3, 2, 5))
    with pytest.raises(ValueError):
        kdrl.full_kl(_logits(6, 5), _logits(2, 3, 5))
    with pytest.raises(ValueError):
        kdrl.full_kl(_logits(2, 6), _logits(2, 9), vocab_size=7)
    with pytest.raises(ValueError):
        kdrl.full_kl(_logits(2, 6), _logits(2, 6), vocab_size=7)


# -----------------------------------------------------------------------------
# kl_reward_to_go (small direct checks; its gradient claims are proved by enumeration above)


def test_kl_reward_to_go_masks_and_detaches():
    """G_t = Σ_{t'≥t} γ^(t'−t) (teacher − logp)_t' within the mask, 0 on padding (even garbage), detached."""
    logp = torch.tensor(
        [[-1.0, -2.0, -0.5, float("nan")], [-0.25, float("inf"), 7.0, 1.0]], dtype=F64, requires_grad=True
    )
    teacher = torch.tensor([[-2.0, -1.0, -1.5, float("-inf")], [-0.75, 3.0, float("nan"), 1.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    G1 = kdrl.kl_reward_to_go(logp, teacher, mask, 1.0)
    Gh = kdrl.kl_reward_to_go(logp, teacher, mask, 0.5)
    G0 = kdrl.kl_reward_to_go(logp, teacher, mask, 0.0)
    assert not G1.requires_grad
    assert torch.equal(G1, torch.tensor([[-1.0, 0.0, -1.0, 0.0], [-0.5, 0, 0, 0]], dtype=F64))
    assert torch.equal(
        Gh, torch.tensor([[-1.0 + 0.5 * (1.0 + 0.5 * -1.0), 1.0 + 0.5 * -1.0, -1.0, 0.0], [-0.5, 0, 0, 0]], dtype=F64)
    )
    assert torch.equal(G0, torch.tensor([[-1.0, 1.0, -1.0, 0.0], [-0.5, 0, 0, 0]], dtype=F64))


# -----------------------------------------------------------------------------
# 4. grpo_advantages, against an exact rational reference.


def _adv_reference(rewards, G, eps, scale_by_std=True):
    """Exact-arithmetic reference (Fractions, then one rounding) and a float64 rounding bound per entry.

    Returns (A_ref, tol, std_ref). tol covers the float error of computing mean, centring and the sample std:
    |ΔA| ≲ (G+2)·u·max|r|·(1+|A|)/(s+eps) + (G+2)·u·|A|, times a safety factor 4.
    """
    A, tol, S = [], [], []
    for g in range(len(rewards) // G):
        r = [Fraction(x) for x in rewards[g * G : (g + 1) * G]]
        m = sum(r) / G
        var = sum((x - m) ** 2 for x in r) / (G - 1) if G > 1 else Fraction(0)
        s = math.sqrt(float(var))
        denom = (s + eps) if (scale_by_std and G > 1) else 1.0
        M = float(max(abs(x) for x in r))
        for x in r:
            if var != 0 and denom == 0:  # eps = 0 and the std underflows: no finite reference, no claim
                A.append(0.0)
                tol.append(math.inf)
                S.append(s)
                continue
            a = 0.0 if var == 0 else float(x - m) / denom
            A.append(a)
            tol.append(0.0 if var == 0 else 4 * (G + 2) * _U64 * (M * (1 + abs(a)) / denom + abs(a)))
            S.append(s)
    return torch.tensor(A, dtype=F64), torch.tensor(tol, dtype=F64), torch.tensor(S, dtype=F64)


@st.composite
def _reward_batches(draw, lo=-1e6, hi=1e6):
    G, n = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    val = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    rewards = []
    for _ in range(n):
        if draw(st.booleans()):
            rewards += draw(st.lists(val, min_size=G, max_size=G))
        else:
            rewards += [draw(val)] * G  # a constant group
    return G, rewards


@settings(max_examples=200, **_SETTINGS)
@given(_reward_batches())
def test_grpo_advantages_exact_reference_zero_mean_and_constant_groups(batch):
    """A = (r − mean)/(std_Bessel + eps) per group to float64 rounding; per-group mean 0; constant groups and
    groups of size 1 exactly 0; never NaN."""
    G, rewards = batch
    r = torch.tensor(rewards, dtype=F64)
    A = kdrl.grpo_advantages(r, G)
    A_ref, tol, _ = _adv_reference(rewards, G, 1e-6)
    assert A.shape == r.shape and torch.isfinite(A).all()
    assert ((A - A_ref).abs() <= tol).all()
    for g in range(len(rewards) // G):
        sl = slice(g * G, (g + 1) * G)
        if G == 1 or len(set(rewards[sl])) == 1:
            assert torch.equal(A[sl], torch.zeros(G, dtype=F64))
        assert abs(A[sl].sum().item()) <= tol[sl].sum().item() + 4 * G * _U64 * (1 + A[sl].abs().max().item())


def test_grpo_advantages_constant_group_residue_is_exactly_zero():
    """[0.1, 0.1, 0.1] centres to float residue in general; the result must still be exactly 0 (not ±0.8)."""
    for dtype in (torch.float32, F64):
        r = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 1.0, 0.3, 0.3, 0.3], dtype=dtype)
        A = kdrl.grpo_advantages(r, 3)
        assert torch.equal(A[:3], torch.zeros(3, dtype=dtype)) and torch.equal(A[6:], torch.zeros(3, dtype=dtype))
        assert (A[3:6] != 0).all()
    assert torch.equal(kdrl.grpo_advantages(torch.tensor([0.3, -2.0, 5.0], dtype=F64), 1), torch.zeros(3, dtype=F64))


@settings(max_examples=200, **_SETTINGS)
@given(_reward_batches(-1e3, 1e3), st.floats(1e-3, 1e3), st.floats(-1e3, 1e3))
def test_grpo_advantages_affine_invariance(batch, a, b):
    """r → a·r + b (a > 0). eps = 0: A unchanged to float64 rounding. Default eps:
    A' − A = A·eps(1 − 1/a)/(s + eps/a) exactly before rounding, so the relative change is bounded by
    eps·|1 − 1/a|/(s + eps/a) and the bound is attained."""
    G, rewards = batch
    r = torch.tensor(rewards, dtype=F64)
    r2 = a * r + b
    A_ref, tol, s = _adv_reference(rewards, G, 0.0)
    _, tol2, _ = _adv_reference(r2.tolist(), G, 0.0)
    M = (a * r).abs().view(-1, G).amax(1).repeat_interleave(G) + abs(b)
    # rounding of a·r + b itself (≤ u·(|a·r| + |b|) per reward), seen through A: ≤ 2u·M/(a·s)·(1 + |A|).
    round_tol = torch.where(s > 0, 4 * _U64 * M / (a * s) * (1 + A_ref.abs()), 0.0)
    total_tol = tol + tol2 + round_tol
    ok = torch.isfinite(total_tol)  # eps = 0 makes no claim where the float std underflows to 0

    A0, A0b = kdrl.grpo_advantages(r, G, eps=0.0), kdrl.grpo_advantages(r2, G, eps=0.0)
    assert ((A0b - A0).abs() <= total_tol)[ok].all()

    eps = 1e-6
    A, Ab = kdrl.grpo_advantages(r, G), kdrl.grpo_advantages(r2, G)
    predicted = torch.where(s > 0, A.abs() * eps * abs(1 - 1 / a) / (s + eps / a), 0.0)
    assert ((Ab - A).abs() <= predicted + total_tol)[ok].all()
    assert ((Ab - A).abs() >= predicted - total_tol)[ok].all()


@settings(max_examples=100, **_SETTINGS)
@given(_reward_batches(), st.randoms(use_true_random=False))
def test_grpo_advantages_permutation_equivariant(batch, rnd):
    """Permuting responses within a group permutes their advantages (to summation-order rounding)."""
    G, rewards = batch
    perm = []
    for g in range(len(rewards) // G):
        idx = list(range(g * G, (g + 1) * G))
        rnd.shuffle(idx)
        perm += idx
    perm = torch.tensor(perm)
    r = torch.tensor(rewards, dtype=F64)
    _, tol, _ = _adv_reference(rewards, G, 1e-6)
    A, Ap = kdrl.grpo_advantages(r, G), kdrl.grpo_advantages(r[perm], G)
    assert ((Ap - A[perm]).abs() <= 2 * tol[perm]).all()


@settings(max_examples=100, **_SETTINGS)
@given(st.integers(2, 6), st.lists(st.tuples(st.floats(-9.99, 9.99), st.integers(-300, 150)), min_size=12, max_size=12))
def test_grpo_advantages_finite_for_huge_and_tiny_rewards(G, parts):
    """Rewards of magnitude 1e-300 … 1e151, mixed within a group: every advantage is finite and |A| ≤ (G−1)/√G
    (Samuelson's bound for the Bessel std); a group of size 1 is still exactly 0."""
    rewards = [m * 10.0**e for m, e in parts][: (12 // G) * G]
    r = torch.tensor(rewards, dtype=F64)
    A = kdrl.grpo_advantages(r, G)
    assert torch.isfinite(A).all()
    assert (A.abs() <= (G - 1) / math.sqrt(G) * (1 + 1e-12)).all()
    assert torch.equal(kdrl.grpo_advantages(r, 1), torch.zeros_like(r))


@settings(max_examples=100, **_SETTINGS)
@given(_reward_batches())
def test_grpo_advantages_mean_only(batch):
    """scale_by_std=False (Dr.GRPO): plain centring r − mean, to rounding; constant groups exactly 0."""
    G, rewards = batch
    A = kdrl.grpo_advantages(torch.tensor(rewards, dtype=F64), G, scale_by_std=False)
    A_ref, tol, _ = _adv_reference(rewards, G, 0.0, scale_by_std=False)
    assert ((A - A_ref).abs() <= tol).all()


def test_grpo_advantages_wrong_shape_raises():
    """A 2-D batch or a length that is not a multiple of group_size raises ValueError."""
    with pytest.raises(ValueError):
        kdrl.grpo_advantages(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError):
        kdrl.grpo_advantages(torch.zeros(7), 3)


# -----------------------------------------------------------------------------
# 5. beta_schedule


def test_beta_schedule():
    """Constant without beta_min or decay_steps; KDRL-Annealing 5e-3 → 1e-3 over 80 steps is linear, then held;
    the kdrl-anneal preset uses exactly these numbers."""
    for step in (0, 1, 79, 10_000):
        assert kdrl.beta_schedule(step, 5e-3) == 5e-3
        assert kdrl.beta_schedule(step, 5e-3, None, 80) == 5e-3
        assert kdrl.beta_schedule(step, 5e-3, 1e-3, 0) == 5e-3
    p = kdrl.METHODS["kdrl-anneal"]
    args = (p["beta"], p["beta_min"], p["beta_decay_steps"])
    assert args == (5e-3, 1e-3, 80)
    expected = {0: 5e-3, 20: 4e-3, 40: 3e-3, 80: 1e-3, 81: 1e-3, 200: 1e-3}
    for step, beta in expected.items():
        assert kdrl.beta_schedule(step, *args) == pytest.approx(beta, rel=1e-14, abs=0)
    values = [kdrl.beta_schedule(s, *args) for s in range(100)]
    assert all(x >= y for x, y in itertools.pairwise(values))


# -----------------------------------------------------------------------------
# 6. kdrl_loss


def _batch(B=4, T=6, seed=0, lengths=(6, 4, 1, 3)):
    """A float64 response batch with old ≠ logp (so the clip bites) and a teacher far enough to clamp in TRRD."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.rand(*shape, generator=g, dtype=F64)

    logp = -3 * rnd(B, T) - 0.05
    old = logp + 0.6 * (rnd(B, T) - 0.5)
    teacher = logp + 3.0 * (rnd(B, T) - 0.5)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths[:B])[:, None]
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9, -0.2][:B], dtype=F64)
    correct = torch.tensor([True, False, False, True, False, False][:B])
    return logp.requires_grad_(True), old, teacher, adv, mask, correct


def _call(logp, old, teacher, adv, mask, correct, cfg, beta, **kw):
    loss, metrics = kdrl.kdrl_loss(logp, old, teacher, adv, mask, correct, cfg, beta, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


def _grpo_loop(logp, old, adv, mask, cfg):
    """Naive per-token reference of GRPO's clipped surrogate, written with Python loops and min/max."""
    lo, hi = 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high
    B, T = logp.shape
    seq_sums, seq_lens = [], []
    for b in range(B):
        total, n = 0.0, 0
        A = float(adv[b])
        for t in range(T):
            if mask[b, t]:
                rho = torch.exp(logp[b, t] - old[b, t])
                clipped = min(max(rho, lo), hi)
                total = total - min(rho * A, clipped * A)
                n += 1
        seq_sums.append(total)
        seq_lens.append(n)
    if cfg.loss_agg == "token-mean":
        return sum(seq_sums) / sum(seq_lens)
    if cfg.loss_agg == "seq-mean":
        return sum(s / max(n, 1) for s, n in zip(seq_sums, seq_lens, strict=True)) / B
    return sum(seq_sums) / (cfg.max_new_tokens * B)


_AGGS = ("token-mean", "seq-mean", "constant")


@pytest.mark.parametrize("agg", _AGGS)
def test_kdrl_loss_beta0_is_grpo(agg):
    """beta = 0: value and gradient equal the naive loop of −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), for each
    aggregation, with clipping active on some but not all tokens and ε_low ≠ ε_high."""
    logp, old, teacher, adv, mask, correct = _batch()
    cfg = _cfg(beta=0.0, clip_eps_low=0.1, clip_eps_high=0.15, loss_agg=agg, max_new_tokens=8)
    loss, grad, metrics = _call(logp, old, teacher, adv, mask, correct, cfg, 0.0)
    ref = _grpo_loop(logp, old, adv, mask, cfg)
    (ref_grad,) = torch.autograd.grad(ref, logp)
    assert 0 < metrics["clip_frac"] < 1
    assert (ref_grad[mask] == 0).any() and (ref_grad[mask] != 0).any()  # clipped tokens pass no gradient
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("agg", _AGGS)
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_trrd_alpha1_is_grpo_exactly(agg, beta):
    """TRRD with α = 1 is bit-for-bit GRPO (value, gradient), with and without a KD term."""
    logp, old, teacher, adv, mask, correct = _batch()
    base = _cfg(loss_agg=agg, max_new_tokens=8, clip_eps_high=0.28)
    a = _call(logp, old, teacher, adv, mask, correct, base, beta)
    b = _call(logp, old, teacher, adv, mask, correct, dataclasses.replace(base, trrd_alpha=1.0), beta)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("switched, alone", [(False, "kd"), (True, "grpo")])
def test_kd_then_grpo_phases_are_the_kd_and_grpo_presets(switched, alone):
    """phase_config: before the switch, kd-then-grpo's config is the kd preset's, after it the grpo preset's, in
    every field but the method's name (no switch left in either, so train_step takes it), the knobs carried over;
    so every function that reads a config computes for a phase exactly what it computes for that preset."""
    knobs = dict(group_size=2, max_new_tokens=8, clip_eps_low=0.1, clip_eps_high=0.15, lr=3e-4, temperature=0.7)
    seq = kdrl.KDRLConfig.from_method("kd-then-grpo", switch_step=3, switch_patience=2, **knobs)
    phase, ref = kdrl.phase_config(seq, switched), kdrl.KDRLConfig.from_method(alone, **knobs)
    differ = {f.name for f in dataclasses.fields(ref) if getattr(phase, f.name) != getattr(ref, f.name)}
    assert differ == {"method"} and phase.method == "kd-then-grpo"
    assert kdrl.needs_teacher(phase) is (not switched)
    assert seq.switch_step == 3  # the caller's config is left alone


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.0])
def test_trrd_clamp_gradient(alpha):
    """With the clip out of the way, ∂loss/∂logp_t = −A·ρ_t·(∂log ρ_t/∂logp_t)/n, so ∂log ρ/∂logp is
    read off the loss gradient: exactly α where |logp − teacher| > c (the clamp passes nothing), 1 inside.
    ρ is the definition α·log(π/π_old) + (1−α)·clamp(log(π/π_T), −c, c) and metrics["ratio"] is its token
    mean."""
    logp = torch.tensor([[-1.0, -0.2, -3.0, -0.7, -2.0, -0.4]], dtype=F64, requires_grad=True)
    teacher = torch.tensor([[-3.5, -0.5, -1.2, -0.1, -2.0, -4.0]], dtype=F64)  # d = 2.5, .3, −1.8, −.6, 0, 3.6
    old = logp.detach() + torch.tensor([[0.1, -0.2, 0.05, 0.0, 0.3, -0.1]], dtype=F64)
    mask = torch.ones_like(logp, dtype=torch.bool)
    A = 0.8
    cfg = _cfg(beta=0.0, trrd_alpha=alpha, trrd_clamp=1.0, clip_eps_low=0.99, clip_eps_high=50.0)
    _, grad, metrics = _call(logp, old, teacher, torch.tensor([A], dtype=F64), mask, torch.tensor([False]), cfg, 0.0)
    x = logp.detach()
    rho = torch.exp(alpha * (x - old) + (1 - alpha) * (x - teacher).clamp(-1.0, 1.0))
    dlog_rho = -grad * mask.sum() / (A * rho)
    outside = (x - teacher).abs() > 1
    expected = torch.where(outside, torch.full_like(x, alpha), torch.ones_like(x))
    torch.testing.assert_close(dlog_rho, expected, rtol=1e-14, atol=1e-14)
    assert metrics["clip_frac"] == 0.0
    assert metrics["ratio"] == pytest.approx(rho.mean().item(), rel=1e-14)


def test_trrd_ratio_not_one_on_policy():
    """At μ = 1 (old_logp = logp.detach()) GRPO's ratio is exactly 1 but TRRD's is exp((1−α)·clamp(d)),
    so the clip is active from the first minibatch."""
    logp, _, teacher, adv, mask, correct = _batch()
    old = logp.detach()
    grpo = _call(logp, old, teacher, adv, mask, correct, _cfg(beta=0.0), 0.0)[2]
    assert grpo["ratio"] == 1.0 and grpo["clip_frac"] == 0.0
    m = _call(logp, old, teacher, adv, mask, correct, _cfg(beta=0.0, trrd_alpha=0.5), 0.0)[2]
    d = (logp.detach() - teacher)[mask]
    assert m["ratio"] != 1.0
    assert m["ratio"] == pytest.approx(torch.exp(0.5 * d.clamp(-1, 1)).mean().item(), rel=1e-14)
    assert m["clip_frac"] > 0


@pytest.mark.parametrize("kd_mode", ["loss", "reward"])
@pytest.mark.parametrize("kd_mask", ["none", "response", "group"])
def test_kd_mask_removes_kd_gradient(kd_mode, kd_mask):
    """Advantages 0: excluded responses (correct ones for "response"; groups with any correct for "group") get
    exactly zero gradient, every token of the included ones a nonzero one; kd_frac counts the kept tokens."""
    logp, _, teacher, _, mask, _ = _batch(B=6, lengths=(6, 4, 2, 3, 5, 1))
    old = logp.detach()  # on-policy: no token is clipped, so every kept token has a nonzero KD gradient
    correct = torch.tensor([False, True, False, False, False, False])  # group 0 has a correct response
    cfg = _cfg(group_size=3, kd_mask=kd_mask, kd_mode=kd_mode, kd_kind="k2", beta=1.0)
    _, grad, metrics = _call(logp, old, teacher, torch.zeros(6, dtype=F64), mask, correct, cfg, 1.0)
    excluded = {"none": [], "response": [1], "group": [0, 1, 2]}[kd_mask]
    for b in range(6):
        if b in excluded:
            assert torch.equal(grad[b], torch.zeros_like(grad[b]))
        else:
            assert (grad[b][mask[b]] != 0).all() and (grad[b][~mask[b]] == 0).all()
    kept = sum(mask[b].sum().item() for b in range(6) if b not in excluded)
    assert metrics["kd_frac"] == kept / mask.sum().item()


def _pad(x, values):
    return torch.cat([x, torch.tensor(values, dtype=x.dtype).expand(x.shape[0], -1)], dim=1)


_GARBAGE = dict(
    logp=[float("nan"), float("inf"), float("-inf"), 0.0],
    teacher=[float("inf"), float("nan"), float("-inf"), -1e30],
    old=[float("-inf"), float("nan"), float("inf"), 1e30],
)


@pytest.mark.parametrize("trrd", [None, 0.5])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("kd_mode", ["loss", "reward"])
@pytest.mark.parametrize("agg", _AGGS)
def test_padding_columns_change_nothing(agg, kd_mode, kind, trrd):
    """Appending mask-0 columns holding inf/nan garbage in logp, teacher and old leaves loss, metrics and the
    gradient of every real position unchanged (float64, rtol 1e-12)."""
    logp, old, teacher, adv, mask, correct = _batch()
    cfg = _cfg(loss_agg=agg, kd_mode=kd_mode, kd_kind=kind, trrd_alpha=trrd, max_new_tokens=12, clip_eps_high=0.28)
    loss, grad, metrics = _call(logp, old, teacher, adv, mask, correct, cfg, 0.7)

    logp_pad = _pad(logp, _GARBAGE["logp"])  # gradient flows back to the real columns of `logp`
    args = (_pad(old, _GARBAGE["old"]), _pad(teacher, _GARBAGE["teacher"]), adv, _pad(mask, [False] * 4), correct)
    loss_p, metrics_p = kdrl.kdrl_loss(logp_pad, *args, cfg, 0.7)
    (grad_p,) = torch.autograd.grad(loss_p, logp)
    torch.testing.assert_close(loss_p.detach(), loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_p, grad, rtol=1e-12, atol=1e-300)
    assert metrics_p.keys() == metrics.keys()
    for k in metrics:
        assert metrics_p[k] == pytest.approx(metrics[k], rel=1e-12, abs=1e-300), k


@pytest.mark.parametrize("kd_mode", ["loss", "reward"])
def test_padding_garbage_gives_zero_gradient_on_padded_slots(kd_mode):
    """Masked positions of logp must receive exactly zero gradient even when old/teacher hold garbage there:
    in a real model logp[pad] is a gather from the student's log-softmax, so a NaN there reaches every weight.
    A where() after the arithmetic guards only the forward pass (0 · exp(inf) = NaN in the backward)."""
    logp, old, teacher, adv, mask, correct = _batch()
    leaf = _pad(logp.detach(), [-1.0, -2.0, -3.0, -4.0]).requires_grad_(True)  # finite, like a real model's
    args = (_pad(old, _GARBAGE["old"]), _pad(teacher, _GARBAGE["teacher"]), adv, _pad(mask, [False] * 4), correct)
    loss, _ = kdrl.kdrl_loss(leaf, *args, _cfg(kd_mode=kd_mode, kd_kind="k2"), 0.7)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(grad[:, -4:], torch.zeros_like(grad[:, -4:]))


def test_teacher_never_gets_gradient():
    """teacher_logp / teacher logits requiring grad receive none: every kd_kind and kd_mode, TRRD on and off."""
    logp, old, teacher, adv, mask, correct = _batch()
    B, T = logp.shape
    s_logits = _logits(B, T, 5, seed=11).requires_grad_(True)
    t_logits = _logits(B, T, 5, seed=12).requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    for kind, mode, trrd in itertools.product(("k1", "k2", "k3", "full"), ("loss", "reward"), (None, 0.5)):
        cfg = _cfg(kd_kind=kind, kd_mode=mode, trrd_alpha=trrd)
        exact_kl = kdrl.full_kl(s_logits, t_logits)
        loss, _ = kdrl.kdrl_loss(logp, old, teacher, adv, mask, correct, cfg, 0.5, exact_kl=exact_kl)
        loss.backward()
        assert teacher.grad is None and t_logits.grad is None
        assert logp.grad is not None
    assert s_logits.grad is not None and (s_logits.grad != 0).any()


@pytest.mark.parametrize("trrd", [None, 0.5])
@pytest.mark.parametrize("kd", [("loss", "k2"), ("loss", "k3"), ("reward", "k2")])
@pytest.mark.parametrize("agg", _AGGS)
def test_minibatch_gradients_add_up(agg, kd, trrd):
    """Splitting the batch and passing the full batch's num_tokens/num_seqs: minibatch losses and gradients
    sum to the full-batch ones, for every loss_agg (also with the group KD mask, splits on group borders)."""
    logp, old, teacher, adv, mask, _ = _batch(B=6, lengths=(6, 4, 1, 3, 5, 2))
    correct = torch.tensor([False, True, False, False, False, False])
    mode, kind = kd
    for kd_mask, splits in (("none", [(0, 2), (2, 5), (5, 6)]), ("group", [(0, 3), (3, 6)])):
        cfg = _cfg(loss_agg=agg, kd_mode=mode, kd_kind=kind, trrd_alpha=trrd, kd_mask=kd_mask, group_size=3,
                   max_new_tokens=8)
        loss, grad, _ = _call(logp, old, teacher, adv, mask, correct, cfg, 0.4)
        n_tok, n_seq = mask.sum().item(), mask.shape[0]
        total = 0.0
        for i, j in splits:
            part, _ = kdrl.kdrl_loss(logp[i:j], old[i:j], teacher[i:j], adv[i:j], mask[i:j], correct[i:j], cfg, 0.4,
                                     num_tokens=n_tok, num_seqs=n_seq)  # fmt: skip
            total = total + part
        (grad_mb,) = torch.autograd.grad(total, logp)
        torch.testing.assert_close(total.detach(), loss, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(grad_mb, grad, rtol=1e-13, atol=1e-15)


def _one_token_expected_grad(student, teacher, sampler, adv, cfg, beta, weighted):
    """Σ_y q(y) ∇kdrl_loss(y) over one-token responses y ~ q = softmax(sampler) (π_old = π: on-policy scoring),
    each with sampler_weight π_old(y)/q(y) when weighted."""
    logp_all = torch.log_softmax(student, 0)
    old_all, teacher_all, logq = logp_all.detach(), torch.log_softmax(teacher, 0), torch.log_softmax(sampler, 0)
    total = 0
    for y in range(student.shape[0]):
        weight = (old_all[y] - logq[y]).exp().view(1, 1) if weighted else None
        loss, _ = kdrl.kdrl_loss(logp_all[y].view(1, 1), old_all[y].view(1, 1), teacher_all[y].view(1, 1), adv,
                                 torch.ones(1, 1, dtype=torch.bool), torch.tensor([False]), cfg, beta,
                                 sampler_weight=weight)
        total = total + logq[y].exp() * loss
    return _grad(total, student)


@settings(max_examples=25, **_SETTINGS)
@given(st.integers(2, 5), st.sampled_from(["loss", "reward"]), st.sampled_from([None, 0.5]), st.floats(-2, 2),
       st.data())
def test_sampler_weight_corrects_another_sampler_for_both_terms(V, kd_mode, trrd, a, data):
    """One-token responses sampled by another engine q (vLLM) instead of π_old: with sampler_weight = π_old/q,
    Σ_y q(y) ∇loss(y) = Σ_y π_old(y) ∇loss(y) exactly. With advantage 0 in loss mode the whole gradient is the
    KD term's, so the weight reaches the KD term too (TRL's own correction weights the policy term only)."""

    def draw():
        """One row of V logits drawn by hypothesis."""
        return torch.tensor(data.draw(st.lists(st.floats(-3, 3), min_size=V, max_size=V)), dtype=F64)

    student, teacher, sampler = draw().requires_grad_(True), draw(), draw()
    cfg = _cfg(kd_kind="k2", kd_mode=kd_mode, trrd_alpha=trrd, group_size=1, max_new_tokens=1)
    for adv in (torch.tensor([a], dtype=F64), torch.zeros(1, dtype=F64)):
        on_policy = _one_token_expected_grad(student, teacher, student.detach(), adv, cfg, 0.7, weighted=False)
        reweighted = _one_token_expected_grad(student, teacher, sampler, adv, cfg, 0.7, weighted=True)
        scale = max(1.0, on_policy.abs().max().item())
        torch.testing.assert_close(reweighted, on_policy, rtol=1e-10, atol=1e-10 * scale)


def test_sampler_weight_is_needed():
    """Sampling from q without the weight gives a clearly different gradient, so the test above is not vacuous."""
    student = torch.tensor([0.5, -1.0, 2.0], dtype=F64, requires_grad=True)
    teacher, sampler = torch.tensor([1.0, 0.0, -1.0], dtype=F64), torch.tensor([-1.0, 1.5, 0.0], dtype=F64)
    cfg = _cfg(kd_kind="k2", group_size=1, max_new_tokens=1)
    adv = torch.zeros(1, dtype=F64)
    on_policy = _one_token_expected_grad(student, teacher, student.detach(), adv, cfg, 0.7, weighted=False)
    unweighted = _one_token_expected_grad(student, teacher, sampler, adv, cfg, 0.7, weighted=False)
    assert (unweighted - on_policy).abs().max().item() > 1e-2


def test_sampler_weight_none_is_exactly_the_unweighted_loss():
    """sampler_weight=None and a weight of ones give the same loss and gradient, bit for bit."""
    logp, old, teacher, adv, mask, correct = _batch()
    for cfg in (_cfg(kd_kind="k2"), _cfg(kd_mode="reward"), _cfg(trrd_alpha=0.5, kd_mask="response")):
        a = _call(logp, old, teacher, adv, mask, correct, cfg, 0.3)
        b = _call(logp, old, teacher, adv, mask, correct, cfg, 0.3, sampler_weight=torch.ones_like(logp))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("agg", _AGGS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_zero_advantage_loss_is_beta_times_kd(agg, kind):
    """Loss mode, advantages 0: pg_loss = 0 and loss = β · kd_loss exactly, where kd_loss is the metric reported
    at β = 1 (same inputs, old ≠ logp so the importance weight is not 1)."""
    logp, old, teacher, _, mask, correct = _batch()
    cfg = _cfg(loss_agg=agg, kd_kind=kind, max_new_tokens=8)
    zeros = torch.zeros(4, dtype=F64)
    _, _, m1 = _call(logp, old, teacher, zeros, mask, correct, cfg, 1.0)
    for beta in (0.3, 5e-3, 1.0):
        loss, _, m = _call(logp, old, teacher, zeros, mask, correct, cfg, beta)
        assert m["pg_loss"] == 0.0 and m["kd_loss"] == m1["kd_loss"]
        assert loss.item() == beta * m1["kd_loss"]


def test_zero_advantage_loss_full_kind():
    """kind "full": loss = β · kd_loss (float64 logits: float64 rounding), and
    kd_loss is the token mean of full_kl over the response."""
    logp, old, teacher, _, mask, correct = _batch()
    B, T = logp.shape
    s_logits, t_logits = _logits(B, T, 5, seed=13), _logits(B, T, 5, seed=14)
    cfg = _cfg(kd_kind="full")
    zeros = torch.zeros(B, dtype=F64)
    exact_kl = kdrl.full_kl(s_logits, t_logits)
    _, m1 = kdrl.kdrl_loss(logp, old, teacher, zeros, mask, correct, cfg, 1.0, exact_kl=exact_kl)
    ref = _row_kl(s_logits, t_logits)[mask].mean().item()
    assert m1["kd_loss"] == pytest.approx(ref, rel=1e-12)
    loss, m = kdrl.kdrl_loss(logp, old, teacher, zeros, mask, correct, cfg, 0.3, exact_kl=exact_kl)
    assert m["pg_loss"] == 0.0
    assert loss.item() == pytest.approx(0.3 * m1["kd_loss"], rel=1e-12)


def test_full_kind_needs_exact_kl():
    """kd_kind="full" without exact_kl raises ValueError, naming it."""
    logp, old, teacher, adv, mask, correct = _batch()
    with pytest.raises(ValueError, match="exact_kl"):
        kdrl.kdrl_loss(logp, old, teacher, adv, mask, correct, _cfg(kd_kind="full"), 0.1)


def test_metrics_are_floats_and_consistent():
    """Metrics are plain Python floats with the documented keys; kl_k1 / kl_k3 / entropy are token means over
    the response of kl_estimate and −logp."""
    logp, old, teacher, adv, mask, correct = _batch()
    _, metrics = kdrl.kdrl_loss(logp, old, teacher, adv, mask, correct, _cfg(), 0.1)
    required = {"pg_loss", "kd_loss", "kl_k1", "kl_k3", "entropy", "clip_frac", "ratio", "kd_frac"}
    assert required <= metrics.keys()
    assert all(type(v) is float for v in metrics.values())
    x = logp.detach()
    assert metrics["kl_k1"] == pytest.approx((x - teacher)[mask].mean().item(), rel=1e-13)
    assert metrics["kl_k3"] == pytest.approx(kdrl.kl_estimate(x, teacher, "k3")[mask].mean().item(), rel=1e-13)
    assert metrics["entropy"] == pytest.approx(-x[mask].mean().item(), rel=1e-13)
    assert metrics["kd_frac"] == 1.0
    assert kdrl.kdrl_loss(logp, old, teacher, adv, mask, correct, _cfg(), 0.0)[1]["kd_frac"] == 0.0  # β = 0: no KD


# -----------------------------------------------------------------------------
# 7. sft_loss


def test_sft_loss_is_token_mean_nll_of_kept():
    """sft_loss = −Σ logp over tokens of kept responses / kept token count (garbage on padding ignored);
    gradient −1/n on kept tokens, 0 elsewhere."""
    logp, _, _, _, mask, _ = _batch()
    keep = torch.tensor([True, False, True, True])
    garbage = torch.where(mask, logp, torch.tensor(float("nan"), dtype=F64))
    n = sum(int(mask[b].sum()) for b in range(4) if keep[b])
    ref = -sum(float(logp.detach()[b, t]) for b in range(4) for t in range(6) if keep[b] and mask[b, t]) / n
    loss, metrics = kdrl.sft_loss(garbage, mask, keep, n)
    assert loss.item() == pytest.approx(ref, rel=1e-14)
    (grad,) = torch.autograd.grad(loss, logp)
    expected = torch.where(mask & keep[:, None], torch.tensor(-1.0 / n, dtype=F64), torch.tensor(0.0, dtype=F64))
    torch.testing.assert_close(grad, expected, rtol=1e-15, atol=0)
    assert metrics == {"sft_loss": loss.item()}

# =============================================================================
# Part 2: sampling, log-probs, rewards, the training loop, checkpoints, the CLI.

CHARS = "0123456789+=#| "

def _tiny(kind: str, vocab_size: int, seed: int):
    """A random tiny causal LM whose logit width vocab_size pads past the tokenizer's length, on DEVICE."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2,
                  pad_token_id=0, bos_token_id=None)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval().to(DEVICE)
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval().to(DEVICE)

def test_train_step_refuses_a_config_that_still_switches():
    """A copier who loops over kdrl.train_step with KDRLConfig.from_method("kd-then-grpo") would distil forever,
    silently: train_step refuses it before sampling, naming phase_config; each phase of it runs."""
    tok = char_tokenizer(CHARS)
    student, teacher = _tiny("llama", len(tok) + 2, 0), _tiny("qwen2", len(tok) + 5, 1)
    batch = [{"prompt": "1+2=", "answer": 3}]
    seq = kdrl.KDRLConfig.from_method("kd-then-grpo", group_size=2, prompts_per_step=1, max_new_tokens=4, lr=1e-2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=seq.lr)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match=r"switches at step 50.*phase_config"):
        kdrl.train_step(seq, 0, student, teacher, tok, optimizer, batch, kdrl.math_reward)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    for switched in (False, True):
        row = kdrl.train_step(kdrl.phase_config(seq, switched), 0, student, teacher, tok, optimizer, batch,
                              kdrl.math_reward)
        assert ("kl_k1" in row) is (not switched) and row["beta"] == (0.0 if switched else 1.0)


def test_test_device_is_validated():
    """KDRL_TEST_DEVICE is "cpu" or "cuda"; anything else, or "cuda" on a machine without CUDA, stops the run at
    import with the reason, rather than running on CPU or skipping everything."""
    assert _test_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match="KDRL_TEST_DEVICE='gpu': must be 'cpu' or 'cuda'"):
        _test_device("gpu")
    if torch.cuda.is_available():
        assert _test_device("cuda") == "cuda"
    else:
        with pytest.raises(RuntimeError, match="KDRL_TEST_DEVICE=cuda, but torch .* sees no CUDA device"):
            _test_device("cuda")

class _Scripted(torch.nn.Module):
    """A fake causal LM: after position p it emits '5' while p < stop, then `end` (default EOS) (+100 logits)."""

    def __init__(self, tok, stop, width, end=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.five = tok.convert_tokens_to_ids("5")
        self.eos = end or tok.eos_token_id
        self.stop, self.width = stop, width

    def forward(self, input_ids, attention_mask, position_ids, **kw):
        B, L = input_ids.shape
        logits = torch.zeros(B, L, self.width, device=input_ids.device)
        target = torch.where(position_ids < self.stop, self.five, self.eos)
        logits.scatter_(2, target[..., None], 100.0)
        logits[..., self.width - 1] = 1000.0  # a padded column (≥ len(tokenizer)): must never be sampled
        return types.SimpleNamespace(logits=logits, past_key_values=None)

@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_response_mask_keeps_eos_drops_padding_flags_truncation(pad_is_eos):
    """The mask includes the first EOS (also when pad == EOS), excludes what follows, and flags truncation.
    The padded logit column (≥ len(tokenizer)), though it has the largest logit, is never sampled."""
    tok = char_tokenizer(CHARS)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    model = _Scripted(tok, stop=3, width=len(tok) + 3).to(DEVICE)
    ro = kdrl.sample_rollouts(model, tok, ["1", "123", "12"], 1, 3, temperature=0.0)
    # after positions 0..2 the model says '5', after position ≥ 3 EOS; prompts end at positions 0, 2, 1
    assert ro.response_mask.tolist() == [[True, True, True], [True, True, False], [True, True, True]]
    assert ro.truncated.tolist() == [True, False, False]
    assert kdrl.decode(tok, ro) == ["555", "5", "55"]
    five, eos = tok.convert_tokens_to_ids("5"), tok.eos_token_id
    assert ro.response_ids[1].tolist()[:2] == [five, eos] and ro.response_ids[2].tolist() == [five, five, eos]
    assert ro.attention_mask[:, -3:].tolist() == ro.response_mask.long().tolist()

def _naive_logprobs(model, ro, V, temperature=1.0):
    T = ro.response_mask.shape[1]
    positions = kdrl._positions(ro.attention_mask)
    logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=positions).logits
    logp = torch.log_softmax(logits[:, -T - 1 : -1, :V].float() / temperature, -1)
    return logp.gather(2, ro.response_ids[..., None]).squeeze(-1) * ro.response_mask

def _first_sample_where(premise, sample, tries: int = 20):
    """sample(seed) for the first seed 0, 1, ... whose batch meets the test's premise (ragged lengths, early ends),
    so the premise holds by construction on every device (a GPU draws other samples from the same seed)."""
    for seed in range(tries):
        batch = sample(seed)
        if premise(batch):
            return batch
    raise AssertionError(f"no seed in 0..{tries - 1} gave a batch that meets the premise")

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_token_logprobs_match_naive(kind, chunk):
    """Chunked, checkpointed log-probs equal log_softmax + gather, in value and gradient, at T = 0.7."""
    tok = char_tokenizer(CHARS)
    model = _tiny(kind, len(tok) + 5, seed=2)

    def sample(seed):
        torch.manual_seed(seed)
        return kdrl.sample_rollouts(model, tok, ["12+3=", "7=", "1+1+1="], 4, 24, temperature=0.7)

    def ends_early(ro):
        return (ro.response_mask.sum(1) < 12).float().mean() >= 0.25 and ro.response_mask.shape[1] > 12

    # a quarter of the rows end before half-way, so the sampler has dropped finished rows from its KV cache
    ro = _first_sample_where(ends_early, sample)
    weights = torch.randn(ro.response_mask.shape, device=DEVICE)

    def grads(fn):
        model.zero_grad()
        out = fn()
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    ours, g1 = grads(lambda: kdrl.token_logprobs(model, ro.input_ids, ro.attention_mask, ro.response_mask,
                                                 temperature=0.7, vocab_size=len(tok), chunk_size=chunk))
    ref, g2 = grads(lambda: _naive_logprobs(model, ro, len(tok), 0.7))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the sampler's own log-probs are of the same (tempered, unpadded) distribution
    torch.testing.assert_close(ro.logprobs, ref, atol=1e-5, rtol=0)

def test_greedy_sampler_matches_no_cache_loop():
    """At T = 0 the KV-cached sampler picks the same tokens as a plain loop that re-runs the whole prefix
    (both in float64, so ties cannot flip)."""
    tok = char_tokenizer(CHARS)
    model = _tiny("llama", len(tok) + 3, seed=4).double()
    prompts = ["12+3=", "9=", "4+4+4="]
    ro = kdrl.sample_rollouts(model, tok, prompts, 1, 10, temperature=0.0)
    for i, p in enumerate(prompts):
        ids = tok(p)["input_ids"]
        for _ in range(10):
            logits = model(input_ids=torch.tensor([ids], device=DEVICE)).logits[0, -1, : len(tok)]
            ids.append(int(logits.argmax()))
            if ids[-1] == tok.eos_token_id:
                break
        n = len(ids) - len(tok(p)["input_ids"])
        assert ro.response_ids[i, :n].tolist() == ids[-n:] and int(ro.response_mask[i].sum()) == n

@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("so \\boxed{3} then \\boxed{\\frac{1}{2}}", "0.5", 1.0),  # the last box, a LaTeX fraction
        ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0),  # nested braces, string comparison
        ("\\boxed{{12}}", "12", 0.0),  # '{12}' is not the number 12
        ("work... #### 1,234", "1234", 1.0),  # thousands separator
        ("#### 12\n#### -7", "-7", 1.0),  # the last '####'
        ("Answer: +3.50", "3.5", 1.0),  # sign, trailing zero
        ("Answer: 3/4", "0.75", 1.0),
        ("answer: Paris.", "paris", 1.0),  # normalised string
        ("#### 13", "12", 0.0),
        ("no final answer 12", "12", 0.0),
    ],
)
def test_math_reward(completion, answer, expected):
    assert kdrl.math_reward("q", completion, {"answer": answer}) == expected

def test_correct_ignores_format_bonus_and_reward_errors_name_the_example():
    """The format bonus raises the reward, never `correct`; a failing reward function names its example."""
    examples = [{"prompt": "1+1=", "answer": 2, "_line": 7}]
    completions = ["#### 3", "#### 2", "nothing"]
    rewards, correct = kdrl.score_completions(kdrl.math_reward, examples, completions, 3, format_bonus=0.1)
    torch.testing.assert_close(rewards, torch.tensor([0.1, 1.1, 0.0]))
    assert correct.tolist() == [False, True, False]

    def broken(prompt, completion, example):
        raise KeyError("gold")

    with pytest.raises(kdrl.KDRLError, match=r"line 7 .*'1\+1='.*KeyError"):
        kdrl.score_completions(broken, examples, ["x"], 1)

def _rollouts_for(tok, model, prompts, group_size=2, max_new_tokens=7, temperature=0.9, seed=0):
    torch.manual_seed(seed)
    return kdrl.sample_rollouts(model, tok, prompts, group_size, max_new_tokens, temperature)

@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_chunked_full_kl_equals_the_full_logits_computation(chunk, temperature):
    """kdrl-full's path (teacher: log-probs and final hidden states; student: log-probs and the exact KL, both
    models' logits rebuilt chunk by chunk) gives the loss, the KL and every student gradient of the (B, T, V)
    computation: both models' full logits, tempered, full_kl over the tokenizer's columns. Logits padded to
    different widths (24 and 32 for a 18-token tokenizer), responses of different lengths."""
    tok = char_tokenizer(CHARS)
    V = len(tok)
    student, teacher = _tiny("llama", 24, 0), _tiny("qwen2", 32, 1).requires_grad_(False)

    def sample(seed):
        prompts = ["12+3=", "7=", "1+1+1="]
        return _rollouts_for(tok, student, prompts, group_size=3, max_new_tokens=9, temperature=temperature, seed=seed)

    def ragged(ro):
        return len(set(ro.response_mask.sum(1).tolist())) > 1

    ro = _first_sample_where(ragged, sample)  # responses of different lengths
    mask, T = ro.response_mask, ro.response_mask.shape[1]
    B = mask.shape[0]
    adv = torch.linspace(-1, 1, B, device=DEVICE)
    correct = torch.arange(B, device=DEVICE) % 2 == 0
    cfg = kdrl.KDRLConfig.from_method("kdrl-full", group_size=3, logprob_chunk=chunk)

    def reference():
        pos = kdrl._positions(ro.attention_mask)
        s = student(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits[:, -T - 1 : -1]
        with torch.no_grad():
            t = teacher(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                        position_ids=pos).logits[:, -T - 1 : -1]
        s, t = s / temperature, t / temperature  # (B, T, 24), (B, T, 32)
        logp = torch.log_softmax(s[..., :V], -1).gather(2, ro.response_ids[..., None]).squeeze(-1)
        t_logp = torch.log_softmax(t[..., :V], -1).gather(2, ro.response_ids[..., None]).squeeze(-1)
        return logp, t_logp, kdrl.full_kl(s, t, vocab_size=V)

    def chunked():
        with torch.no_grad():
            t_logp, t_hidden = kdrl.token_logprobs_and_hidden(teacher, ro.input_ids, ro.attention_mask, mask,
                                                              temperature=temperature, vocab_size=V, chunk_size=chunk)
        assert t_hidden.shape == (B, T, teacher.config.hidden_size)  # what is kept between the passes: no V in it
        logp, kl = kdrl.token_logprobs_and_kl(student, ro.input_ids, ro.attention_mask, mask,
                                              teacher.get_output_embeddings(), t_hidden, temperature=temperature,
                                              vocab_size=V, chunk_size=chunk)
        return logp, t_logp, kl

    results = []
    for fn in (reference, chunked):
        student.zero_grad()
        logp, t_logp, kl = fn()
        loss, metrics = kdrl.kdrl_loss(logp, logp.detach(), t_logp, adv, mask, correct, cfg, 0.7, exact_kl=kl)
        loss.backward()
        grads = [p.grad.clone() for p in student.parameters()]
        results.append((loss.detach(), torch.where(mask, kl, 0.0).detach(), metrics, grads))
    (loss_ref, kl_ref, m_ref, g_ref), (loss_new, kl_new, m_new, g_new) = results
    torch.testing.assert_close(kl_new, kl_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(loss_new, loss_ref, atol=2e-6, rtol=1e-5)
    assert m_new["kd_loss"] == pytest.approx(m_ref["kd_loss"], rel=1e-5)
    for a, b in zip(g_new, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)
    assert kl_ref[mask].min() > 0  # the models differ, so the KL term is not vacuous

def test_no_head_call_sees_more_than_a_chunk_in_a_training_step():
    """Never (B, T, V): in a whole kdrl-full step (teacher pass and update, μ = 2), every call of either model's
    output head gets at most logprob_chunk rows, and the logits of both models are never computed by the model's own
    forward (which would build (B, T, V)); the same for kdrl (k2)."""
    tok = char_tokenizer(CHARS)
    student, teacher = _tiny("llama", 24, 0), _tiny("qwen2", 32, 1).requires_grad_(False)
    ro = _rollouts_for(tok, student, ["12+3=", "7=", "1+1+1=", "4+4="], group_size=4, max_new_tokens=9)
    correct = torch.arange(16, device=DEVICE) % 3 == 0
    adv = kdrl.grpo_advantages(correct.double(), 4).float()
    for method in ("kdrl-full", "kdrl"):
        rows, full_forwards = [], []
        def count_rows(module, args, out, rows=rows):
            rows.append(args[0].shape[0])

        def count_full_forward(module, args, out, full_forwards=full_forwards):
            full_forwards.append(1)

        hooks = [m.get_output_embeddings().register_forward_hook(count_rows) for m in (student, teacher)]
        hooks += [m.register_forward_hook(count_full_forward) for m in (student, teacher)]
        cfg = kdrl.KDRLConfig.from_method(method, group_size=4, mu=2, minibatch_size=8, logprob_chunk=5)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        scores = kdrl.teacher_pass(cfg, student, teacher, ro, len(tok))
        kdrl.policy_update(cfg, student, teacher, optimizer, rollouts=ro, advantages=adv, trained_on=correct,
                           beta=cfg.beta, scores=scores, vocab_size=len(tok), step=0)
        for h in hooks:
            h.remove()
        assert rows and max(rows) <= 5 and full_forwards == []
        assert (scores["teacher_hidden"] is not None) == (method == "kdrl-full")

class _OldCacheApi(torch.nn.Module):
    """A causal LM whose forward() names the cache `past_key_values` (transformers before 5.2x); records the name."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.seen = model, []

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        self.seen.append(past_key_values is not None)
        cache = {kdrl._cache_argument(self.inner): past_key_values}
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, logits_to_keep=logits_to_keep, **cache)
        return types.SimpleNamespace(logits=out.logits, past_key_values=kdrl._returned_cache(out))

def test_sampler_passes_the_cache_under_the_name_the_model_takes():
    """transformers 5.2x deprecates forward(past_key_values=...) (removed in 5.40) for `cache`: the sampler uses
    `cache` where the model takes it (no deprecation warning) and `past_key_values` where that is the name, with the
    same tokens either way."""
    import warnings

    tok = char_tokenizer(CHARS)
    model = _tiny("llama", len(tok), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        new = _rollouts_for(tok, model, ["12+3=", "7="], group_size=2, max_new_tokens=6)
    old_api = _OldCacheApi(model)
    old = _rollouts_for(tok, old_api, ["12+3=", "7="], group_size=2, max_new_tokens=6)
    # the cache went in by its old name
    assert old_api.seen[0] is False and all(old_api.seen[1:]) and len(old_api.seen) > 1
    assert torch.equal(new.input_ids, old.input_ids) and torch.equal(new.response_mask, old.response_mask)

@pytest.mark.parametrize("mu", [1, 2])
def test_the_update_never_reads_the_samplers_logprobs(mu):
    """The old policy is rescored (μ > 1) or is the current one detached (μ = 1): Rollouts.logprobs, a by-product of
    sampling, never reaches the loss. Filled with NaN, the update is unchanged."""
    tok = char_tokenizer(CHARS)
    teacher = _tiny("qwen2", 32, 1).requires_grad_(False)
    ro = _rollouts_for(tok, _tiny("llama", 24, 0), ["12+3=", "7="], group_size=2, max_new_tokens=6)
    correct = torch.tensor([True, False, False, True], device=DEVICE)
    adv = kdrl.grpo_advantages(correct.double(), 2).float()
    weights = []
    for logprobs in (ro.logprobs, torch.full_like(ro.logprobs, float("nan"))):
        student = _tiny("llama", 24, 0)
        cfg = kdrl.KDRLConfig.from_method("kdrl", group_size=2, mu=mu, lr=1e-2)
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
        batch = dataclasses.replace(ro, logprobs=logprobs)
        scores = kdrl.teacher_pass(cfg, student, teacher, batch, len(tok))
        kdrl.policy_update(cfg, student, teacher, optimizer, rollouts=batch, advantages=adv, trained_on=correct,
                           beta=cfg.beta, scores=scores, vocab_size=len(tok), step=0)
        weights.append(student.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert all(torch.isfinite(v).all() for v in weights[1].values())
    start = _tiny("llama", 24, 0).state_dict()
    assert not all(torch.equal(start[k], weights[0][k]) for k in start)  # the update did move the weights

@pytest.mark.parametrize("mu", [1, 2])
def test_the_update_scores_student_and_teacher_at_the_sampling_temperature(mu):
    """At τ = 0.5, every scoring of the step is of softmax(logits / τ), the distribution that was sampled: the
    teacher's log-probs (teacher_pass), the old policy's (μ = 2), and the student's inside the loss (its entropy and
    KL metrics in the first epoch), each against log_softmax(logits / τ); at τ = 1 they would differ by far more."""
    tok = char_tokenizer(CHARS)
    V, tau = len(tok), 0.5
    student, teacher = _tiny("llama", V + 2, 0), _tiny("qwen2", V + 5, 1).requires_grad_(False)
    ro = _rollouts_for(tok, student, ["12+3=", "7="], group_size=2, max_new_tokens=6, temperature=tau)
    mask = ro.response_mask
    with torch.no_grad():
        student_ref, teacher_ref = (_naive_logprobs(model, ro, V, tau)[mask] for model in (student, teacher))
        at_one = _naive_logprobs(teacher, ro, V, 1.0)[mask]
    assert (at_one - teacher_ref).abs().max() > 0.1  # τ matters here
    cfg = kdrl.KDRLConfig.from_method("kdrl", group_size=2, mu=mu, temperature=tau, max_new_tokens=6, lr=1e-2)
    scores = kdrl.teacher_pass(cfg, student, teacher, ro, V)
    torch.testing.assert_close(scores["teacher_logp"][mask], teacher_ref, atol=1e-5, rtol=0)
    if mu == 2:
        torch.testing.assert_close(scores["old_logp"][mask], student_ref, atol=1e-5, rtol=0)
    correct = torch.tensor([True, False, False, True], device=DEVICE)
    first_epoch = dataclasses.replace(cfg, mu=1)  # its metrics are of the weights before any step
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    _, parts = kdrl.policy_update(first_epoch, student, teacher, optimizer, rollouts=ro, trained_on=correct,
                                  advantages=kdrl.grpo_advantages(correct.double(), 2).float(), beta=cfg.beta,
                                  scores=scores, vocab_size=V, step=0)
    metrics = kdrl._loss_metrics(cfg, parts)
    assert metrics["entropy"] == pytest.approx(-student_ref.mean().item(), abs=1e-5)
    assert metrics["kl_k1"] == pytest.approx((student_ref - teacher_ref).mean().item(), abs=1e-5)


def test_each_epoch_steps_on_its_own_gradient():
    """μ = 2 is two optimizer steps, each on the gradient of its own epoch: one policy_update at μ = 2 gives, bit for
    bit, the weights of two μ = 1 updates that score the same old policy (the μ = 2 teacher_pass's old_logp). A
    gradient left over from the first epoch would leak into the second step."""
    tok = char_tokenizer(CHARS)
    teacher = _tiny("qwen2", 32, 1).requires_grad_(False)
    ro = _rollouts_for(tok, _tiny("llama", 24, 0), ["12+3=", "7="], group_size=2, max_new_tokens=6)
    correct = torch.tensor([True, False, False, True], device=DEVICE)
    cfg = kdrl.KDRLConfig.from_method("kdrl", group_size=2, mu=2, lr=1e-2, max_new_tokens=6)
    scores = kdrl.teacher_pass(cfg, _tiny("llama", 24, 0), teacher, ro, len(tok))
    weights = []
    for epochs, config in ((1, cfg), (2, dataclasses.replace(cfg, mu=1))):
        student = _tiny("llama", 24, 0)
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
        for _ in range(epochs):
            kdrl.policy_update(config, student, teacher, optimizer, rollouts=ro, trained_on=correct, beta=cfg.beta,
                               advantages=kdrl.grpo_advantages(correct.double(), 2).float(), scores=scores,
                               vocab_size=len(tok), step=0)
        weights.append(student.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_every_end_id_ends_a_response():
    """A model that emits the second end id (listed by its generation_config, not the tokenizer's EOS) stops there,
    with that token kept in the mask and truncated False; without it listed, the response runs on to the cap."""
    tok = char_tokenizer(CHARS)
    second = tok.convert_tokens_to_ids("#")
    model = _Scripted(tok, stop=2, width=len(tok) + 3, end=second).to(DEVICE)
    model.generation_config = types.SimpleNamespace(eos_token_id=[tok.eos_token_id, second])
    assert kdrl.end_token_ids(tok, model) == sorted({tok.eos_token_id, second})
    ro = kdrl.sample_rollouts(model, tok, ["1", "12"], 1, 5, temperature=0.0)
    five = tok.convert_tokens_to_ids("5")
    # after positions 0 and 1 the model says '5', then the second end id; the prompts end at positions 0 and 1
    assert ro.response_mask.tolist() == [[True, True, True], [True, True, False]]
    assert ro.response_ids[0].tolist() == [five, five, second] and ro.response_ids[1, :2].tolist() == [five, second]
    assert ro.truncated.tolist() == [False, False]
    ro = kdrl.sample_rollouts(model, tok, ["1", "12"], 1, 5, temperature=0.0, end_ids=[tok.eos_token_id])
    assert ro.response_mask.all() and ro.truncated.all()

@settings(max_examples=200, **_SETTINGS)
@given(st.lists(st.floats(-1, 1), min_size=4, max_size=12), st.integers(0, 1000), st.sampled_from([2, 4]))
def test_grpo_advantages_exact_under_power_of_two_scaling(rewards, k, G):
    """With eps = 0 the advantage is scale-free, and scaling by 2^k is exact in floating point: A(r · 2^k) equals
    A(r) bit for bit for k up to 1000 (rewards to ~1e301), where the plain formula's variance overflows to NaN."""
    r = torch.tensor(rewards[: len(rewards) // G * G], dtype=F64)
    A = kdrl.grpo_advantages(r, G, eps=0.0)
    big = kdrl.grpo_advantages(r * 2.0**k, G, eps=0.0)
    assert torch.isfinite(big).all()
    assert torch.equal(big, A)
    r32 = r.float()
    assert torch.equal(kdrl.grpo_advantages(r32 * 2.0 ** min(k, 120), G, eps=0.0),
                       kdrl.grpo_advantages(r32, G, eps=0.0))


# -----------------------------------------------------------------------------
# The leave-one-out baseline under the KD masks; the exact KL and the loss under bfloat16 autocast.


_U32 = 2.0**-23  # float32 machine epsilon


# -----------------------------------------------------------------------------
# 1. The leave-one-out KD baseline under each KD mask, by exact enumeration.


def _pair_returns_grad(student, teacher, V, L, kd_mask, leave_one_out, gamma=1.0):
    """Σ over every ordered pair of sequences (G = 2) of P_i P_j ∇(−Σ_t R_t log π_t), with R = kd_reward_returns
    of the pair: the expected policy gradient of the KD return alone (what β·R adds to the advantage, μ = 1).
    A sequence is correct when its first token is 1, as in _pair_kd_grad."""
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
        train.validate_config(kdrl.KDRLConfig.from_method("kdrl-seq", kd_mask=kd_mask, kd_baseline="loo"))
    except kdrl.KDRLError:
        return False
    return True


def test_loo_baseline_is_refused_exactly_where_it_biases_the_gradient():
    """Why kdrl refuses kd_baseline="loo" with kd_mask="group": under "group" whether the other response keeps its
    return depends on whether this one is correct, so the baseline depends on this response and the expected
    gradient moves (by 0.2 here, against a gradient of 1), while under "none" and "response" it is unchanged to
    float64 rounding. validate_config accepts loo with exactly the masks where it is unbiased."""
    student, teacher = _fixed(_FIX_STUDENT, grad=True), _fixed(_FIX_TEACHER)
    for kd_mask in train._CHOICES["kd_mask"]:
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
    accepted = tuple(m for m in train._CHOICES["kd_mask"] if _loo_accepted(m))
    assert accepted == _LOO_MASKS == ("none", "response")


def test_loo_baseline_with_group_mask_is_refused_by_name():
    """validate_config names the fields, the reason and the way out; the alternatives it suggests are accepted."""
    cfg = kdrl.KDRLConfig.from_method("kdrl-seq", kd_mask="group")  # kd_baseline="loo" is the default
    with pytest.raises(kdrl.KDRLError) as err:
        train.validate_config(cfg)
    message = str(err.value)
    reason = "depends on whether this response is correct"
    for part in ("kd_baseline='loo'", "kd_mask='group'", "kd_mode='reward'", reason, "kd_baseline='none'"):
        assert part in message
    train.validate_config(dataclasses.replace(cfg, kd_baseline="none"))  # the ways out are accepted
    train.validate_config(dataclasses.replace(cfg, kd_mask="response"))
    train.validate_config(dataclasses.replace(cfg, kd_mode="loss", method="kdrl-mask"))  # loss mode has no baseline
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


def _ref_kl(s, t):
    """KL(softmax(s) ‖ softmax(t)) per row, float64, from the definition."""
    logp, logq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


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
        logp, kl = kdrl.head_logprobs_and_kl(head, hidden, targets, tau, V, teacher_head, teacher_hidden, chunk_size=5)
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
        logp, kl = kdrl.head_logprobs_and_kl(torch.nn.Identity(), x, targets, tau, V, torch.nn.Identity(),
                                             teacher_logits.float(), chunk_size=5)
        (logp + kl).sum().backward()
    assert ((logp.double() - ref_logp.detach()).abs() <= tol).all()
    assert ((kl.double() - ref_kl.detach()).abs() <= tol).all()
    assert ((x.grad.double() - ref_grad).abs() <= tol[:, None] / tau).all()


def test_token_logprobs_kl_teacher_is_float32_exact_under_bf16_autocast():
    """token_logprobs_and_kl under CPU bfloat16 autocast: its log-probs and exact KL are within float32
    rounding of float64 computed from the models' own bfloat16 logits at the response positions (each rebuilt from
    the final hidden states that token_logprobs_and_hidden gives, by the same head under the same autocast)."""
    tok = char_tokenizer(CHARS)
    V, tau = len(tok), 0.9
    student, teacher = _tiny("llama", 24, 0), _tiny("qwen2", 32, 1).requires_grad_(False)
    ro = _rollouts_for(tok, student, ["12+3=", "7=", "1+1+1="], group_size=3, max_new_tokens=9, temperature=tau)
    mask = ro.response_mask  # (B, T)
    kw = dict(temperature=tau, vocab_size=V, chunk_size=5)
    with _bf16_autocast():
        with torch.no_grad():
            _, t_hidden = kdrl.token_logprobs_and_hidden(teacher, ro.input_ids, ro.attention_mask, mask, **kw)
            _, s_hidden = kdrl.token_logprobs_and_hidden(student, ro.input_ids, ro.attention_mask, mask, **kw)
            s_logits = student.get_output_embeddings()(s_hidden)  # (B, T, 24) bfloat16
            t_logits = teacher.get_output_embeddings()(t_hidden)  # (B, T, 32) bfloat16
        logp, kl = kdrl.token_logprobs_and_kl(student, ro.input_ids, ro.attention_mask, mask,
                                              teacher.get_output_embeddings(), t_hidden, **kw)
    s, t = s_logits[..., :V].double() / tau, t_logits[..., :V].double() / tau  # (B, T, V) each
    ref_logp = torch.log_softmax(s, -1).gather(2, ro.response_ids[..., None]).squeeze(-1)  # (B, T)
    tol = _f32_tol(s, t)[mask]  # (n,)
    assert ((logp.double() - ref_logp)[mask].abs() <= tol).all()
    assert ((kl.double() - _ref_kl(s, t))[mask].abs() <= tol).all()
    assert _ref_kl(s, t)[mask].min() > 1000 * tol.max()  # the models differ by far more than the tolerance


def test_kdrl_loss_and_gradient_under_bf16_autocast_equal_float32():
    """Given the same float32 inputs, every method's loss, metrics and gradient are bit for bit the same under bfloat16
    autocast on the test device (CUDA's in the GPU suite) as without it: no reduction of the loss (the aggregations,
    the masked means, kdrl-seq's returns and baseline, kdrl-full's exact KL) runs in bf16. Autocast downcasts only
    the ops on its lower-precision list (matmul, mm, bmm, linear, ...) on CPU and CUDA alike, never element-wise ops
    or sums; so what this can catch is a reduction written as one of those, and the control below shows it would:
    the same sum as a matmul, under the same autocast, comes out bf16 and off."""
    B, T, V, G = 6, 5, 300, 3
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(DEVICE)  # (B, T)
    s_logits, t_logits = (_logits(B, T, V, seed=seed).float().to(DEVICE) for seed in (7, 8))
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    advantages = torch.linspace(-1, 1, B, device=DEVICE)
    correct = torch.tensor([False, True, False, False, False, False], device=DEVICE)
    methods = dict(kdrl={}, kdrl_mask=dict(kd_mask="group"), kdrl_seq=dict(kd_baseline="loo"), rlad={},
                   kdrl_full={}, kd={})
    for name, overrides in methods.items():
        cfg = kdrl.KDRLConfig.from_method(name.replace("_", "-"), group_size=G, max_new_tokens=T, **overrides)
        train.validate_config(cfg)
        results = []
        for autocast in (False, True):
            s = s_logits.clone().requires_grad_(True)
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                lsm = torch.log_softmax(s, -1)  # (B, T, V)
                logp = lsm.gather(2, targets[..., None]).squeeze(-1)  # (B, T)
                teacher_logp = torch.log_softmax(t_logits, -1).gather(2, targets[..., None]).squeeze(-1)  # (B, T)
                old_logp = logp.detach() + 0.1 * torch.sin(torch.arange(B * T, device=DEVICE).view(B, T).float())
                exact_kl = kdrl.full_kl(s, t_logits) if cfg.kd_kind == "full" else None  # (B, T)
                loss, metrics = kdrl.kdrl_loss(logp, old_logp, teacher_logp, advantages, mask, correct, cfg, 0.3,
                                               exact_kl=exact_kl)
                loss.backward()
                as_matmul = logp.detach().flatten() @ mask.flatten().float()  # the control: Σ logp as a matmul
            assert loss.dtype == torch.float32
            results.append((loss.detach(), metrics, s.grad, as_matmul))
        (loss32, metrics32, grad32, sum32), (loss_ac, metrics_ac, grad_ac, sum_ac) = results
        assert torch.equal(loss_ac, loss32), name
        assert metrics_ac == metrics32, name
        assert torch.equal(grad_ac, grad32), name
        assert grad32.abs().max() > 0, name
        assert sum_ac.dtype == torch.bfloat16 and sum_ac.float() != sum32  # this autocast is live: it would catch it
