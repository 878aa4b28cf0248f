"""
kdrl.py: KDRL (GRPO + reverse-KL distillation from a teacher, in one loss) and RLAD/TRRD, in one file.

KDRL, Xu et al. 2025, arXiv 2506.02208, maximises

    J_KDRL(θ) = J_GRPO(θ) − β · KL(π_θ ‖ π_T)

on the student's own rollouts: the teacher π_T takes the place of GRPO's reference policy. RLAD/TRRD,
Zhang et al. 2026, arXiv 2602.22495, instead puts the teacher inside GRPO's clipped ratio,
ρ = (π/π_old)^α · (π/π_T)^(1−α), and keeps no separate KD term.

The file reads top to bottom like the papers:
    config (KDRLConfig, METHODS)  →  pure math (kl_estimate, full_kl, kl_reward_to_go, grpo_advantages,
    kdrl_loss, beta_schedule)  →  models (sample_rollouts, token_logprobs)  →  rewards (math_reward)
    →  the training loop (train)  →  the CLI (main).
The math functions take tensors and return tensors: copy any of them into your own trainer unchanged.

Where this differs from the papers, or pins down what they leave open:
- The KD term is a token-level masked mean, like the paper. We say plainly what each estimator's
  *gradient* is (see kl_estimate): k2, the paper's choice, follows the token-level reverse KL with the
  contexts held fixed; k3, the default in TRL and verl, follows the *forward* KL. kd_mode="reward" with
  γ = 1 gives the sequence-level reverse KL instead (kdrl-seq).
- Off-policy minibatches (μ > 1) weight the per-token KD estimate by the detached ratio π/π_old, so its
  expected gradient stays the on-policy one. The paper is silent on this.
- Dropout is off while training (models stay in eval mode), so the update scores the same policy that
  sampled. Log-probs are taken at the sampling temperature (logits / T), for student and teacher alike.
- One optimizer step per μ-epoch over the whole batch; minibatches only bound memory (gradients are
  accumulated with the full-batch normaliser, so the maths does not depend on the minibatch size).

Run:  python kdrl.py --student PATH --teacher PATH --train data.jsonl --method kdrl --steps 100
Demo: python train_tiny.py      Tests: python -m pytest -q
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config: every hyperparameter has one source of truth, saved with every run and checkpoint.


@dataclass
class KDRLConfig:
    # --- run ---
    student: str = ""
    """local path of the student (a Hugging Face causal LM)"""
    teacher: str = ""
    """local path of the teacher; it must share the student's tokenizer"""
    train: str = ""
    """training prompts, JSONL rows {"prompt": ..., "answer": ...}"""
    eval: str = ""
    """evaluation prompts, same format (optional)"""
    out: str = "runs/kdrl"
    """output directory: metrics.jsonl, config.json, checkpoint/"""
    method: str = "kdrl"
    """named preset from METHODS; explicit flags override it"""
    steps: int = 100
    """number of training steps (one step = one batch of rollouts)"""
    seed: int = 0
    """seed for torch, python and the data order"""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda" """
    dtype: str = "auto"
    """model dtype: "auto" (bf16 on cuda, fp32 on cpu), "float32", "bfloat16" """
    gradient_checkpointing: bool = False
    """recompute the student's activations in the backward pass to save memory"""
    resume: bool = False
    """continue from <out>/checkpoint"""
    save_every: int = 0
    """save a checkpoint every N steps (0: only at the end)"""
    eval_every: int = 0
    """evaluate every N steps (0: only at the end)"""
    eval_limit: int = 256
    """evaluate on at most this many eval prompts"""
    progress: bool = True
    """show tqdm progress bars"""
    # --- sampling ---
    prompts_per_step: int = 8
    """prompts per step; the batch holds prompts_per_step × group_size responses"""
    group_size: int = 8
    """G, responses sampled per prompt (paper: 8)"""
    max_new_tokens: int = 1024
    """response length cap; longer responses are truncated and flagged"""
    temperature: float = 1.0
    """sampling temperature; log-probs of student and teacher are taken at the same T"""
    # --- GRPO ---
    clip_eps_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 − ε_low (paper: 0.2)"""
    clip_eps_high: float = 0.2
    """ε_high: the ratio is clipped above at 1 + ε_high (paper: 0.2; DAPO uses 0.28)"""
    scale_adv_by_std: bool = True
    """divide the group-centred reward by the group std (GRPO); False gives Dr.GRPO's advantage"""
    adv_eps: float = 1e-6
    """added to the group std before dividing"""
    loss_agg: str = "token-mean"
    """"token-mean" (paper), "seq-mean", or "constant" (Dr.GRPO: divide by max_new_tokens × B)"""
    use_reward: bool = True
    """False zeroes the advantages: pure on-policy distillation (the kd preset)"""
    format_bonus: float = 0.0
    """added to the reward when the response has an extractable final answer; never counts as correct"""
    # --- KD (KDRL) ---
    beta: float = 5e-3
    """β, the KD coefficient (paper: 5e-3); the start value when annealing"""
    beta_min: Optional[float] = None
    """annealing: β decays linearly to beta_min over beta_decay_steps (paper: 1e-3)"""
    beta_decay_steps: int = 0
    """annealing length in steps (0: constant β)"""
    kd_mode: str = "loss"
    """"loss": β × a per-token KL estimate is added to the loss; "reward": β × KL reward-to-go joins the advantage"""
    kd_kind: str = "k2"
    """loss-mode estimator: "k1", "k2" (paper), "k3", or "full" (exact KL over the vocabulary)"""
    kd_gamma: float = 1.0
    """reward-mode discount: 1 gives the sequence-level reverse KL, 0 the per-token one"""
    kd_mask: str = "none"
    """"none", "response" (KD only on incorrect responses: KDRL-Mask), "group" (only in all-wrong groups)"""
    # --- RLAD / TRRD ---
    trrd_alpha: Optional[float] = None
    """α of TRRD's ratio (π/π_old)^α (π/π_T)^(1−α) (paper: 0.5); None disables TRRD"""
    trrd_clamp: float = 1.0
    """TRRD clamps log(π/π_T) to [−c, c] (paper: 1)"""
    # --- SFT baseline ---
    sft: bool = False
    """train by NLL on the teacher's correct samples instead of RL (the papers' SFT baseline)"""
    # --- optimisation ---
    lr: float = 1e-6
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (0 disables)"""
    mu: int = 1
    """μ, optimisation epochs per batch; μ = 1 is on-policy (the GRPO ratio is exactly 1)"""
    minibatch_size: int = 64
    """responses per forward/backward; gradients are accumulated, so this bounds memory only"""
    logprob_chunk: int = 256
    """positions per chunk when computing log-probs over the vocabulary"""


# Each method is a set of overrides on KDRLConfig: the one place that defines it.
METHODS: dict[str, dict] = {
    "grpo": dict(beta=0.0),
    "kd": dict(use_reward=False, beta=1.0, kd_kind="k2"),
    "kdrl": dict(kd_kind="k2"),
    "kdrl-anneal": dict(kd_kind="k2", beta=5e-3, beta_min=1e-3, beta_decay_steps=80),
    "kdrl-mask": dict(kd_kind="k2", kd_mask="response"),
    "kdrl-seq": dict(kd_mode="reward", kd_gamma=1.0),
    "kdrl-full": dict(kd_kind="full"),
    "rlad": dict(trrd_alpha=0.5, beta=0.0),
    "sft": dict(sft=True, beta=0.0),
}

_CHOICES = dict(
    loss_agg=("token-mean", "seq-mean", "constant"),
    kd_mode=("loss", "reward"),
    kd_kind=("k1", "k2", "k3", "full"),
    kd_mask=("none", "response", "group"),
    device=("auto", "cpu", "cuda"),
    dtype=("auto", "float32", "bfloat16"),
)


def validate_config(cfg: KDRLConfig) -> None:
    """Raise ValueError naming the first bad field."""
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ValueError(f"config field {name}={getattr(cfg, name)!r}: must be one of {choices}")
    if cfg.method not in METHODS:
        raise ValueError(f"config field method={cfg.method!r}: must be one of {tuple(METHODS)}")
    for name in ("steps", "group_size", "prompts_per_step", "max_new_tokens", "mu", "minibatch_size", "logprob_chunk"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"config field {name}={getattr(cfg, name)}: must be >= 1")
    if cfg.trrd_alpha is not None and not 0.0 <= cfg.trrd_alpha <= 1.0:
        raise ValueError(f"config field trrd_alpha={cfg.trrd_alpha}: must be in [0, 1]")
    if cfg.temperature < 0:
        raise ValueError(f"config field temperature={cfg.temperature}: must be >= 0")


def field_docs(cls) -> dict[str, str]:
    """The one-line docstring under each dataclass field, read from the source (used for --help)."""
    docs, body = {}, ast.parse(inspect.getsource(cls)).body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


# -----------------------------------------------------------------------------
# The math: pure functions, tensors in, tensors out. Notation: d = log π − log π_T on the sampled token.


def kl_estimate(logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str, clamp: float = 20.0) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_T) from the log-probs of the sampled tokens. Any shape in, same shape out.

    With d = logp − teacher_logp (teacher detached: it is a constant, even if it requires grad):
      k1 = d               value: unbiased for KL.    gradient as a loss: **zero** in expectation
                           (E_π[∇log π] = 0), so on its own it is pure noise.
      k2 = d² / 2          value: not the KL.         gradient: d·∇log π, whose on-policy expectation is
                           the gradient of the **token-level reverse KL** Σ_s KL(π(·|s) ‖ π_T(·|s)) with
                           the contexts s held fixed (KDRL's choice).
      k3 = e^(−d) − 1 + d  value: unbiased for KL, low variance.  gradient: (1 − π_T/π)·∇log π, whose
                           expectation is the gradient of the token-level **forward** KL(π_T ‖ π): the
                           wrong direction, though TRL and verl use it as their default "KL loss".
    "On-policy" means the token was sampled from π itself at the scoring temperature. Token-level
    gradients ignore how a token changes which later contexts occur; see kl_reward_to_go for the
    sequence-level gradient.

    k3 stays finite in float32 for any d: below d = −clamp, e^(−d) (which overflows near d = −88) is
    continued by its tangent line at −clamp, so the value grows linearly and the gradient is held at its
    value at the boundary, 1 − e^clamp < 0, keeping its sign. Everywhere else value and gradient are exact
    (for d ≫ 0, e^(−d) underflows to 0 harmlessly). The output itself is never clamped.
    """
    d = logp - teacher_logp.detach()
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        dc = d.clamp(min=-clamp)
        exp_neg_d = torch.exp(-dc) * (1 + dc - d)  # exactly e^(−d) when d ≥ −clamp, its tangent below
        return exp_neg_d - 1 + d
    raise ValueError(f"kl_estimate: kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def _vocab_log_softmax(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)


class _FullKL(torch.autograd.Function):
    """KL(softmax(s) ‖ softmax(t)) per row, chunked, with the analytic gradient ∇_s = p ⊙ (log p − log q − KL)."""

    @staticmethod
    def forward(ctx, s, t, vocab_size, chunk_size):  # s, t: (N, ≥vocab_size)
        out = s.new_empty(s.shape[0], dtype=torch.float32)
        for i in range(0, s.shape[0], chunk_size):
            logp = _vocab_log_softmax(s[i : i + chunk_size], vocab_size)  # (chunk, V) float32
            logq = _vocab_log_softmax(t[i : i + chunk_size], vocab_size)
            out[i : i + chunk_size] = (logp.exp() * (logp - logq)).sum(-1)
        ctx.save_for_backward(s, t, out)
        ctx.vocab_size, ctx.chunk_size = vocab_size, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (N,)
        s, t, kl = ctx.saved_tensors
        V, C = ctx.vocab_size, ctx.chunk_size
        grad = torch.zeros_like(s)  # padded columns ≥ vocab_size carry no probability and get no gradient
        for i in range(0, s.shape[0], C):
            logp = _vocab_log_softmax(s[i : i + C], V)
            logq = _vocab_log_softmax(t[i : i + C], V)
            g = logp.exp() * (logp - logq - kl[i : i + C, None]) * grad_out[i : i + C, None]
            grad[i : i + C, :V] = g.to(s.dtype)
        return grad, None, None, None


def full_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: Optional[int] = None, chunk_size: int = 1024
) -> torch.Tensor:
    """Exact per-position KL(π ‖ π_T) = Σ_v p_v (log p_v − log q_v) over the vocabulary. (..., V) → (...) float32.

    vocab_size: take both distributions over the first vocab_size columns only, renormalised. Use it when
    the checkpoints pad their logits to different widths (Qwen2.5-0.5B: 151,936; 7B: 152,064) although
    the tokenizer is the same. Without it, the widths must match.
    The gradient flows to student_logits only (teacher constant), as ∇_s KL = p ⊙ (log p − log q − KL).
    Memory: rows are processed chunk_size at a time, so the extra memory is O(chunk_size · V) float32, with
    grad or without; nothing of size O(N · V) is saved beyond the two input tensors, which autograd already
    holds (the backward writes one gradient the size of student_logits).
    """
    s, t = student_logits, teacher_logits
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"full_kl: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ before the vocab dim")
    if vocab_size is None:
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"full_kl: vocab widths differ (student {s.shape[-1]}, teacher {t.shape[-1]}); "
                "pass vocab_size=len(tokenizer) to compare the shared columns"
            )
        vocab_size = s.shape[-1]
    if vocab_size > min(s.shape[-1], t.shape[-1]):
        raise ValueError(f"full_kl: vocab_size={vocab_size} exceeds a logit width ({s.shape[-1]}, {t.shape[-1]})")
    lead = s.shape[:-1]
    out = _FullKL.apply(s.reshape(-1, s.shape[-1]), t.detach().reshape(-1, t.shape[-1]), vocab_size, chunk_size)
    return out.reshape(lead)


def kl_reward_to_go(logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-token KD return G_t = Σ_{t'≥t} γ^(t'−t) (teacher_logp − logp)_{t'} within each response. (B, T) → (B, T).

    The reward −d_t = log π_T − log π is MiniLLM's / on-policy distillation's per-token reward. Masked
    positions add nothing and get G = 0; the result is detached (it is a reward, not a loss).
    γ = 1: −Σ_t G_t ∇log π_t is, on-policy, an unbiased gradient of the **sequence-level** reverse KL
           KL(π(y|x) ‖ π_T(y|x)), provided the per-token terms are summed or divided by a constant (the
           "constant" loss_agg). A per-sample length normaliser (token-mean, seq-mean) reweights
           samples by their length and biases it.
    γ = 0: G_t = −d_t, and −G_t ∇log π_t = d_t ∇log π_t = ∇k2_t: the per-token (myopic) gradient.
    """
    r = torch.where(mask.bool(), teacher_logp.detach() - logp.detach(), 0.0)  # (B, T)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(mask.bool(), out, 0.0)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's sequence advantage A_i = (R_i − mean_g) / (std_g + eps). (B,) → (B,), groups contiguous.

    std is the sample std (Bessel-corrected, like torch.std, TRL and verl); eps = 1e-6 is added to it, so
    a positive affine map of the rewards changes A by at most a relative eps/std. scale_by_std=False gives
    Dr.GRPO's mean-only advantage. A group whose rewards are all equal, and any group of size 1, gets
    exactly 0: centring [0.1, 0.1, 0.1] leaves float residue that the std division would blow up to ±0.8.
    """
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"grpo_advantages: rewards {tuple(rewards.shape)} is not a flat batch of groups of {group_size}")
    r = rewards.view(-1, group_size)  # (num_groups, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(constant, 0.0, centred).view(-1)


def beta_schedule(step: int, beta: float, beta_min: Optional[float] = None, decay_steps: int = 0) -> float:
    """KDRL-Annealing: β linear from `beta` at step 0 to `beta_min` at `decay_steps`, then held.
    Constant when beta_min is None or decay_steps is 0. Paper: 5e-3 → 1e-3."""
    if beta_min is None or decay_steps <= 0:
        return beta
    return beta + (beta_min - beta) * min(step / decay_steps, 1.0)


def _aggregate(x: torch.Tensor, mask: torch.Tensor, loss_agg: str, num_tokens, num_seqs, max_new_tokens: int) -> torch.Tensor:
    """Sum of x over response tokens, normalised by the *full batch's* count (so minibatch grads add up)."""
    x = torch.where(mask, x, 0.0)  # where, not multiply: padded positions may hold inf/nan
    if loss_agg == "token-mean":
        return x.sum() / num_tokens
    if loss_agg == "seq-mean":
        return (x.sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    if loss_agg == "constant":
        return x.sum() / (max_new_tokens * num_seqs)
    raise ValueError(f"loss_agg must be 'token-mean', 'seq-mean' or 'constant', got {loss_agg!r}")


def kd_response_mask(correct: torch.Tensor, kd_mask: str, group_size: int) -> torch.Tensor:
    """Which responses receive KD. (B,) bool → (B,) bool.
    "none": all.  "response": incorrect ones only (KDRL-Mask, reward-guided KD).  "group": only groups where
    no response is correct (a re-implementation variant, not the paper's)."""
    if kd_mask == "none":
        return torch.ones_like(correct, dtype=torch.bool)
    if kd_mask == "response":
        return ~correct.bool()
    if kd_mask == "group":
        return ~correct.bool().view(-1, group_size).any(dim=1, keepdim=True).expand(-1, group_size).reshape(-1)
    raise ValueError(f"kd_mask must be 'none', 'response' or 'group', got {kd_mask!r}")


def kdrl_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    correct: torch.Tensor,
    cfg: KDRLConfig,
    beta: float,
    student_logits: Optional[torch.Tensor] = None,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    num_tokens: Optional[float] = None,
    num_seqs: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, dict]:
    """The KDRL loss −J_KDRL = clipped GRPO surrogate + β · KD, for one (mini)batch. Returns (loss, metrics).

    logp, old_logp, teacher_logp, mask: (B, T) over response tokens; advantages: (B,); correct: (B,) bool
    (the KD masks use correctness, not the reward, since a format bonus makes them differ).
    student_logits, teacher_logits: (B, T, V), needed only for kd_kind="full".
    num_tokens / num_seqs: the response-token / response count of the *whole* batch when this is one
    minibatch of it, so that accumulated gradients equal the full-batch gradient (default: this batch's).

    Policy term (GRPO, token level): −min(ρ A_t, clip(ρ, 1 − ε_low, 1 + ε_high) A_t) with ρ = π/π_old.
      RLAD/TRRD (cfg.trrd_alpha = α): log ρ = α log(π/π_old) + (1 − α) clamp(log(π/π_T), −c, c). α = 1 is
      exactly GRPO. The hard clamp passes no gradient outside [−c, c]: there the token's gradient falls to
      α ∇log π (times ρ A). The ratio is not 1 even at μ = 1, so the clip is active from the first step.
    KD term, cfg.kd_mode:
      "loss":   β · aggregate(w_t · k_t) with k = kl_estimate(kd_kind) or full_kl. w_t = π/π_old (detached)
                on the sampled token makes a minibatch sampled by π_old give the on-policy expected gradient
                (w = 1 exactly at μ = 1). kind "full" sums over the vocabulary and needs no such weight.
      "reward": β · kl_reward_to_go(γ = kd_gamma) is added to the token advantage inside the surrogate.
    cfg.kd_mask removes KD from whole responses (see kd_response_mask); their KD gradient is exactly 0.
    cfg.loss_agg: "token-mean" divides by num_tokens; "seq-mean" averages each response over its tokens,
    then divides by num_seqs; "constant" (Dr.GRPO) divides by max_new_tokens × num_seqs.
    With beta = 0 this is exactly the GRPO loss; with zero advantages in "loss" mode, exactly β · KD.
    """
    mask = mask.bool()
    num_tokens = mask.sum().item() if num_tokens is None else num_tokens
    num_seqs = mask.shape[0] if num_seqs is None else num_seqs
    agg = lambda x: _aggregate(x, mask, cfg.loss_agg, max(num_tokens, 1), max(num_seqs, 1), cfg.max_new_tokens)
    old_logp, teacher_logp = old_logp.detach(), teacher_logp.detach()
    kd_keep = kd_response_mask(correct, cfg.kd_mask, cfg.group_size)[:, None] & mask  # (B, T)

    # Policy term: GRPO's clipped surrogate, or TRRD's teacher-anchored ratio.
    log_ratio = logp - old_logp
    if cfg.trrd_alpha is not None:
        a = cfg.trrd_alpha
        log_ratio = a * log_ratio + (1 - a) * (logp - teacher_logp).clamp(-cfg.trrd_clamp, cfg.trrd_clamp)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.detach()[:, None].to(logp.dtype).expand_as(logp)  # (B, T)
    if cfg.kd_mode == "reward":
        adv = adv + beta * torch.where(kd_keep, kl_reward_to_go(logp, teacher_logp, mask, cfg.kd_gamma), 0.0)
    lo, hi = 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high
    surrogate = torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)
    pg_loss = agg(-surrogate)

    # KD term (loss mode): per-token KL estimate, importance-weighted when the minibatch is off-policy.
    if cfg.kd_kind == "full":
        if student_logits is None or teacher_logits is None:
            raise ValueError("kdrl_loss: kd_kind='full' needs student_logits and teacher_logits")
        kd_tok = full_kl(student_logits, teacher_logits, vocab_size)
    else:
        w = torch.exp(torch.where(mask, logp.detach() - old_logp, 0.0))  # π/π_old of the sampled token
        kd_tok = w * kl_estimate(logp, teacher_logp, cfg.kd_kind)
    kd_loss = agg(torch.where(kd_keep, kd_tok, 0.0))
    loss = pg_loss + beta * kd_loss if cfg.kd_mode == "loss" else pg_loss

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        mean = lambda x: (torch.where(mask, x, 0.0).sum() / n).item()
        clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
        metrics = dict(
            pg_loss=pg_loss.item(),
            kd_loss=kd_loss.item(),
            kl_k1=mean(kl_estimate(logp, teacher_logp, "k1")),
            kl_k3=mean(kl_estimate(logp, teacher_logp, "k3")),
            entropy=-mean(logp),
            clip_frac=mean(clipped.to(logp.dtype)),
            ratio=mean(ratio),
            kd_frac=(kd_keep.sum() / n).item(),
        )
    return loss, metrics


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, num_tokens: float) -> tuple[torch.Tensor, dict]:
    """The SFT baseline: NLL of the kept responses (teacher samples that were correct), token mean.
    logp, mask: (B, T); keep: (B,) bool; num_tokens: kept tokens in the whole batch."""
    m = mask.bool() & keep.bool()[:, None]
    loss = -torch.where(m, logp, 0.0).sum() / max(num_tokens, 1)
    return loss, dict(sft_loss=loss.item(), sft_kept=keep.float().mean().item())
