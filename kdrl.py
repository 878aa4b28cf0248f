"""
kdrl.py: KDRL (GRPO + reverse-KL distillation from a teacher, in one loss) and RLAD/TRRD, the method only.

KDRL, Xu et al. 2025, arXiv 2506.02208, maximises

    J_KDRL(θ) = J_GRPO(θ) − β · KL(π_θ ‖ π_T)

on the student's own rollouts: the teacher π_T takes the place of GRPO's reference policy. RLAD/TRRD,
Zhang et al. 2026, arXiv 2602.22495, instead puts the teacher inside GRPO's clipped ratio,
ρ = (π/π_old)^α · (π/π_T)^(1−α), and keeps no separate KD term.

Read top to bottom: config and presets → the maths (estimators, advantages, β, masks, the loss's pieces, composed
by kdrl_loss) → one train_step, the paper's pseudocode. Then the plumbing it calls, which a learner may skip:
sampling and log-probs, rewards, and the numerical engineering under full_kl. The maths takes tensors and returns
tensors: copy any function into your own trainer. The loop, checks, checkpoints and CLI: train.py.

Where this differs from the papers, or pins down what they leave open:
- The KD term is a token-level masked mean, like the paper. kl_estimate says what each estimator's *gradient*
  is: k2, the paper's choice, follows the token-level reverse KL with the contexts held fixed; k3, the default
  in TRL and verl, follows the *forward* KL. kd_mode="reward" with γ = 1 follows the sequence-level reverse KL
  instead, exactly under a constant divisor (kdrl-seq, whose preset sets loss_agg="constant" for that reason).
- Off-policy minibatches (μ > 1) weight the per-token KD estimate by the detached ratio π/π_old (never clipped),
  so its expected gradient is again the token-level reverse KL's. The paper is silent on this.
- Log-probs are taken at the sampling temperature (logits / τ), for student and teacher alike. One optimizer step
  per μ-epoch over the whole batch; minibatches only bound memory (full-batch normaliser).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import re
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

import torch

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
    """compute dtype: "auto" (bf16 autocast on cuda, float32 on cpu), "float32" or "bfloat16" (the teacher's too)"""
    gradient_checkpointing: bool = False
    """recompute the student's activations in the backward pass to save memory (in train mode, dropout zeroed)"""
    resume: bool = False
    """continue from <out>/checkpoint"""
    save_every: int = 0
    """save a checkpoint every N steps (0: only at the end)"""
    eval_every: int = 0
    """evaluate every N steps (0: only at the end)"""
    eval_limit: int = 256
    """evaluate on at most this many eval prompts"""
    progress: bool = True
    """show tqdm progress bars (without them, one `|`-separated line of metrics is printed per step)"""
    log_every: int = 10
    """with a progress bar, also print one `|`-separated line of metrics every N steps (0: never)"""
    # --- sampling ---
    prompts_per_step: int = 8
    """prompts per step; the batch holds prompts_per_step × group_size responses"""
    group_size: int = 8
    """G, responses sampled per prompt (paper: 8)"""
    max_new_tokens: int = 1024
    """response length cap; longer responses are truncated and flagged"""
    temperature: float = 1.0
    """sampling temperature; log-probs of student and teacher are taken at the same τ"""
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
    """"token-mean" (paper), "seq-mean", or "constant" (Dr.GRPO: divide by max_new_tokens × B; kdrl-seq's)"""
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
    """"loss": β × a per-token KL estimate joins the loss; "reward": β × the KL reward-to-go joins the advantage"""
    kd_kind: str = "k2"
    """loss-mode estimator: "k2" (paper), "k3", "full" (exact KL over the vocabulary); "k1" is refused (only noise)"""
    kd_gamma: float = 1.0
    """reward-mode discount: 1 gives the sequence-level reverse KL, 0 the per-token one"""
    kd_baseline: str = "loo"
    """reward mode: "loo" (minus the other G − 1 responses' mean KD return at each position) or "none"; loo keeps
    the expected gradient only under loss_agg="constant" and kd_mask "none"/"response", and is refused elsewhere"""
    kd_mask: str = "none"
    """"none", "response" (KD only on incorrect responses: KDRL-Mask), "group" (only in all-wrong groups)"""
    # --- RLAD / TRRD ---
    trrd_alpha: Optional[float] = None
    """α of TRRD's ratio (π/π_old)^α (π/π_T)^(1−α) (paper: 0.5); None disables TRRD"""
    trrd_clamp: float = 1.0
    """TRRD clamps log(π/π_T) to [−c, c] (paper: 1)"""
    # --- SFT baseline ---
    sft: bool = False
    """train by NLL on the teacher's samples instead of RL (the papers' SFT baseline; which ones: sft_keep)"""
    sft_keep: str = "correct"
    """SFT: "correct" keeps the teacher samples that ended and are correct; "all", every one that ended (unfiltered)"""
    # --- sequential: distil, then RL (kd-then-grpo) ---
    switch_step: int = 0
    """kd-then-grpo: on-policy KD (no reward) before this step, GRPO (β = 0, fresh AdamW moments) after; 0: none"""
    switch_patience: int = 0
    """kd-then-grpo: switch earlier, once eval greedy accuracy has not beaten its best for N evals (0: never early)"""
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
    """responses per forward/backward, in whole groups; gradients are accumulated, so it only bounds memory"""
    logprob_chunk: int = 256
    """positions per chunk when computing log-probs over the vocabulary"""

    @classmethod
    def from_method(cls, method: str = "kdrl", **overrides) -> "KDRLConfig":
        """Defaults ← METHODS[method] ← overrides (knobs; train.validate_config refuses what changes the method)."""
        if method not in METHODS:
            raise KDRLError(f"config field method={method!r}: must be one of {tuple(METHODS)}")
        return cls(**{**METHODS[method], **overrides, "method": method})


# Each method is a set of overrides on KDRLConfig, the one place that defines it: KDRLConfig.from_method(name, ...).
METHODS: dict[str, dict] = {
    "grpo": dict(beta=0.0),
    "kd": dict(use_reward=False, beta=1.0, kd_kind="k2"),
    "kdrl": dict(kd_kind="k2"),
    "kdrl-anneal": dict(kd_kind="k2", beta=5e-3, beta_min=1e-3, beta_decay_steps=80),
    "kdrl-mask": dict(kd_kind="k2", kd_mask="response"),
    "kdrl-seq": dict(kd_mode="reward", kd_gamma=1.0, loss_agg="constant"),  # the sequence-level KL, exactly
    "kdrl-full": dict(kd_kind="full"),
    "rlad": dict(trrd_alpha=0.5, beta=0.0),
    "sft": dict(sft=True, beta=0.0),
    "sft-all": dict(sft=True, beta=0.0, sft_keep="all"),
    "kd-then-grpo": dict(use_reward=False, beta=1.0, kd_kind="k2", switch_step=50),  # kd, then grpo: phase_config
}


def phase_config(cfg: KDRLConfig, switched: bool) -> KDRLConfig:
    """kd-then-grpo (distil, then RL) as two plain configs for train_step, with no switch left in either: the kd
    preset's before the switch, GRPO's after (reward on, β = 0: no teacher pass). The caller decides when (train.train:
    switch_step, or switch_patience's rule) and resets AdamW's moments there."""
    phase = dataclasses.replace(cfg, switch_step=0, switch_patience=0)
    if not switched:
        return phase
    return dataclasses.replace(phase, use_reward=True, beta=0.0, beta_min=None, beta_decay_steps=0)


class KDRLError(ValueError):
    """A user-facing problem (bad input, bad config, diverged run): train.main() prints it and exits 1."""


# -----------------------------------------------------------------------------
# The math: pure functions, tensors in, tensors out. Notation: d = log π − log π_T on the sampled token.


def kl_estimate(logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str, clamp: float = 20.0) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_T) from the log-probs of the sampled tokens. Any shape in, same shape out.
    k1, k2 and k3 are the estimators of J. Schulman's note "Approximating KL Divergence" (2020),
    http://joschu.net/blog/kl-approx.html, written for their *values*; as losses, their gradients differ:
    With d = logp − teacher_logp (teacher detached: it is a constant, even if it requires grad):
      k1 = d               value: unbiased for KL.    gradient as a loss: **zero** in expectation
                           (E_π[∇log π] = 0), so on its own it is pure noise.
      k2 = d² / 2          value: not the KL.         gradient: d·∇log π, whose on-policy expectation is
                           the gradient of the **token-level reverse KL** Σ_s KL(π(·|s) ‖ π_T(·|s)) with
                           the contexts s held fixed (KDRL's choice).
      k3 = e^(−d) − 1 + d  value: unbiased for KL, low variance.  gradient: (1 − π_T/π)·∇log π, whose
                           expectation is the gradient of the token-level **forward** KL(π_T ‖ π): the
                           wrong direction, though TRL and verl use it as their default "KL loss".
    "On-policy": sampled from π itself at the scoring temperature. Token-level gradients ignore how a token
    changes which later contexts occur; kl_reward_to_go gives the sequence-level gradient. k3 stays finite in
    float32: below d = −clamp, e^(−d) (it overflows near −88) goes on as its tangent, so the gradient keeps its
    sign (1 − e^clamp < 0); elsewhere value and gradient are exact.
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


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: Optional[int] = None,
            chunk_size: int = 1024) -> torch.Tensor:
    """Exact per-position KL(π ‖ π_T) = Σ_v p_v (log p_v − log q_v) over the vocabulary. (..., V) → (...).
    The arithmetic is float32 whatever the logits' dtype and under any autocast (float64 for float64 logits), so for
    float32 logits value and gradient are within float32 rounding of the float64 definition, also at V = 151,936
    (relative errors below 1e-6: test_kdrl). For bfloat16 logits (a bf16 forward pass) that holds for the logits *as
    given*: they carry bf16's own rounding (about 3 significant digits) from the model, which no later float32
    arithmetic undoes, so the result is the exact KL of slightly different distributions than a float32 forward's.
    vocab_size: both distributions over the first vocab_size columns, renormalised, for checkpoints that pad their
    logits to different widths (Qwen2.5-0.5B: 151,936; 7B: 152,064) over one tokenizer; without it the widths must
    match. The gradient flows to student_logits only. Extra memory: O(chunk_size · V) float32 (_FullKL, below)."""
    s, t = student_logits, teacher_logits
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"full_kl: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ "
                         "before the vocab dim")
    if vocab_size is None and s.shape[-1] != t.shape[-1]:
        raise ValueError(f"full_kl: vocab widths differ (student {s.shape[-1]}, teacher {t.shape[-1]}); pass "
                         "vocab_size=len(tokenizer) to compare the shared columns")
    vocab_size = s.shape[-1] if vocab_size is None else vocab_size
    if vocab_size > min(s.shape[-1], t.shape[-1]):
        raise ValueError(f"full_kl: vocab_size={vocab_size} exceeds a logit width ({s.shape[-1]}, {t.shape[-1]})")
    lead = s.shape[:-1]
    kl, _ = _FullKL.apply(s.reshape(-1, s.shape[-1]), t.detach().reshape(-1, t.shape[-1]), vocab_size, chunk_size, 1.0)
    return kl.reshape(lead)


def kl_reward_to_go(logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-token KD return G_t = Σ_{t'≥t} γ^(t'−t) (teacher_logp − logp)_{t'}, per response. (B, T) → (B, T).
    −d_t = log π_T − log π is on-policy distillation's per-token reward (used with γ = 0); MiniLLM's objective is
    γ = 1. Masked positions add nothing and get G = 0; the result is detached (a reward, not a loss).
    γ = 1: −Σ_t G_t ∇log π_t is, on-policy, an unbiased gradient of the **sequence-level** reverse KL
           KL(π(y|x) ‖ π_T(y|x)) when the per-token terms are summed or divided by a constant (loss_agg
           "constant", kdrl-seq's). "seq-mean" reweights samples by their length and biases it; "token-mean"
           divides by the batch's (random) token count: a ratio-estimator bias that shrinks as the batch grows.
    γ = 0: G_t = −d_t, and −G_t ∇log π_t = d_t ∇log π_t = ∇k2_t: the per-token (myopic) gradient.
    """
    r = torch.where(mask.bool(), teacher_logp.detach() - logp.detach(), 0.0)  # (B, T)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(mask.bool(), out, 0.0)


def leave_one_out_baseline(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """For each response, the mean of the *other* G − 1 responses' returns at the same position. (B, T) → (B, T),
    groups contiguous; 0 for G = 1. It depends only on the others, so subtracting it removes what every return
    shares and keeps the expected gradient, under the conditions kd_reward_returns states."""
    if group_size == 1:
        return torch.zeros_like(returns)
    grouped = returns.view(-1, group_size, returns.shape[-1])  # (num_groups, G, T)
    others = grouped.sum(dim=1, keepdim=True) - grouped  # (num_groups, G, T)
    return (others / (group_size - 1)).view_as(returns)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO's sequence advantage A_i = (R_i − mean_g) / (std_g + eps). (B,) → (B,), groups contiguous.
    std is the sample std (Bessel-corrected, like torch.std, TRL and verl), plus eps = 1e-6. scale_by_std=False
    gives Dr.GRPO's R_i − mean_g. A group whose rewards are all equal (or of size 1) gets exactly 0: centring
    [0.1, 0.1, 0.1] leaves float residue that the std division turns into ±0.8 without eps, 0.007 with it.
    """
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"grpo_advantages: rewards {tuple(rewards.shape)} is not a flat batch of groups of "
                         f"{group_size}")
    r, k = _in_power_of_two_units(rewards.view(-1, group_size))  # (num_groups, G) = rewards / 2^k, exactly
    centred = r - r.mean(dim=1, keepdim=True)  # (num_groups, G): R − mean, in units of 2^k
    if scale_by_std and group_size > 1:
        advantages = centred / (r.std(dim=1, keepdim=True) + torch.ldexp(torch.full_like(r[:, :1], eps), -k))
    else:
        advantages = torch.ldexp(centred, k)  # Dr.GRPO: back in reward units (overflows only if R − mean does)
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)  # (num_groups, 1)
    return torch.where(constant, 0.0, advantages).view(-1)


def _in_power_of_two_units(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group (row) of r divided by the power of two 2^k ≤ max |r| < 2^(k+1), and k. (n, G) → (n, G), (n, 1).
    Rewards above ~1e154 (float64) or ~1e19 (float32) would overflow the variance, tiny ones underflow it; here max
    |r| is in [1, 2). A power of two divides exactly (ldexp), so the advantage is bit for bit the unscaled formula
    wherever that is finite, and finite for any reward."""
    _, exponent = torch.frexp(r.abs().amax(dim=1, keepdim=True))  # (n, 1): max |r| = m·2^e, m in [0.5, 1)
    return torch.ldexp(r, 1 - exponent), exponent - 1


def beta_schedule(step: int, beta: float, beta_min: Optional[float] = None, decay_steps: int = 0) -> float:
    """KDRL-Annealing: β linear from `beta` at step 0 to `beta_min` at `decay_steps`, then held (paper: 5e-3 → 1e-3);
    constant when beta_min is None or decay_steps is 0."""
    if beta_min is None or decay_steps <= 0:
        return beta
    return beta + (beta_min - beta) * min(step / decay_steps, 1.0)


def _aggregate(x: torch.Tensor, mask: torch.Tensor, loss_agg: str, num_tokens: float, num_seqs: int,
               max_new_tokens: int) -> torch.Tensor:
    """Sum of x (B, T) over response tokens, normalised by the *full batch's* count (minibatch grads add up)."""
    x = torch.where(mask, x, 0.0)  # where, not multiply: padded positions may hold inf/nan
    if loss_agg == "token-mean":
        return x.sum() / num_tokens
    if loss_agg == "seq-mean":
        return (x.sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    if loss_agg == "constant":
        return x.sum() / (max_new_tokens * num_seqs)
    raise ValueError(f"loss_agg must be 'token-mean', 'seq-mean' or 'constant', got {loss_agg!r}")


def kd_response_mask(correct: torch.Tensor, kd_mask: str, group_size: int) -> torch.Tensor:
    """Which responses receive KD. (B,) bool → (B,) bool. "none": all. "response": incorrect ones only (KDRL-Mask,
    reward-guided KD). "group": only groups where no response is correct (a re-implementation variant)."""
    if kd_mask == "none":
        return torch.ones_like(correct, dtype=torch.bool)
    if kd_mask == "response":
        return ~correct.bool()
    if kd_mask == "group":
        return ~correct.bool().view(-1, group_size).any(dim=1, keepdim=True).expand(-1, group_size).reshape(-1)
    raise ValueError(f"kd_mask must be 'none', 'response' or 'group', got {kd_mask!r}")


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_eps_low: float,
                      clip_eps_high: float) -> torch.Tensor:
    """GRPO's (PPO's) clipped surrogate per token, min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A): the objective
    J_GRPO maximises, token by token (KDRL keeps it as is; RLAD changes only ρ). (B, T), (B, T) → (B, T)."""
    clipped_ratio = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)  # (B, T)
    return torch.minimum(ratio * advantages, clipped_ratio * advantages)


def trrd_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float,
                   clamp: float = 1.0) -> torch.Tensor:
    """log ρ of RLAD's Trust-Region Ratio Distillation (Zhang et al. 2026, https://arxiv.org/abs/2602.22495):
    ρ_TRRD = (π/π_old)^α · (π/π_T)^(1−α), with log(π/π_T) clamped to [−c, c] (paper: α = 0.5, c = 1).
    (B, T) each → (B, T); old_logp and teacher_logp are constants. α = 1 is exactly GRPO's. The ratio is not 1 even
    at μ = 1 (the clip is active from the first step); outside [−c, c] the token's gradient falls to α ∇log π."""
    log_ratio_old = logp - old_logp.detach()  # (B, T)
    log_ratio_teacher = (logp - teacher_logp.detach()).clamp(-clamp, clamp)  # (B, T)
    return alpha * log_ratio_old + (1 - alpha) * log_ratio_teacher


def kd_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """KDRL's per-token KD term (kd_mode="loss"): w_t · k_t, the KL estimate k_t = kl_estimate(kind) of the
    sampled token weighted by w_t = π/π_old (detached). (B, T) each → (B, T). Aggregated and times β, it is the
    β · KL(π ‖ π_T) of J_KDRL (Xu et al. 2025, https://arxiv.org/abs/2506.02208). The weight, never clipped, gives
    a minibatch that π_old sampled the on-policy expected gradient (w = 1 at μ = 1). The paper is silent on μ > 1."""
    weight = torch.exp(logp.detach() - old_logp.detach())  # (B, T), π/π_old of the sampled token
    return weight * kl_estimate(logp, teacher_logp, kind)


def kd_reward_returns(logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor,
                      gamma: float, group_size: int, leave_one_out: bool = True) -> torch.Tensor:
    """KD as a reward (kd_mode="reward", kdrl-seq): the per-token KD return that, times β, joins the token advantage
    inside the clipped surrogate. (B, T) each, keep (B, T) bool → (B, T), 0 where masked; detached.
    kl_reward_to_go(γ) on the positions `keep` selects (0 elsewhere: the KD mask), minus, with leave_one_out, the
    other G − 1 responses' mean return at the same position (leave_one_out_baseline). Whether it lowers the variance
    depends on the returns (test_kdrl: × 0.58 on one table, × 1.97 on another); it leaves the expected gradient
    exactly as it was (enumerated) under two conditions:
    - loss_agg="constant": "token-mean" and "seq-mean" divide by counts that depend on this response;
    - keeping a response depends on it alone (kd_mask "none", "response"); under "group" the others' returns
      depend on whether this one is correct. kdrl_loss and train.validate_config refuse it elsewhere."""
    returns = torch.where(keep, kl_reward_to_go(logp, teacher_logp, mask, gamma), 0.0)  # (B, T)
    if leave_one_out:
        returns = returns - leave_one_out_baseline(returns, group_size)  # (B, T)
    return torch.where(mask.bool(), returns, 0.0)


def leave_one_out_bias(cfg: KDRLConfig) -> Optional[str]:
    """Why kdrl-seq's leave-one-out baseline would move the expected gradient under cfg (see kd_reward_returns), or
    None: one rule for kdrl_loss, which people copy alone, and train.validate_config."""
    if cfg.kd_mode != "reward" or cfg.kd_baseline != "loo":
        return None
    if cfg.kd_mask == "group":
        return ("kd_mask='group': whether the other responses keep their KD returns depends on whether this response "
                "is correct, so the baseline depends on this response")
    if cfg.loss_agg != "constant":
        return (f"loss_agg={cfg.loss_agg!r}: it divides by a count that depends on this response (the batch's tokens, "
                "or its own length), so the baseline moves the expected gradient; only loss_agg='constant' keeps it")
    return None


def kdrl_loss(logp: torch.Tensor, old_logp: torch.Tensor, teacher_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, correct: torch.Tensor, cfg: KDRLConfig, beta: float, *,
              exact_kl: Optional[torch.Tensor] = None, num_tokens: Optional[float] = None,
              num_seqs: Optional[int] = None,
              sampler_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """The KDRL loss L = −J_GRPO + β · KD for one (mini)batch. Returns (loss, metrics), metrics detached floats.

        kd_mode="loss":    L = agg(−c · clipped_surrogate(ρ, A)) + β · agg(c · keep · kd_token_loss)
        kd_mode="reward":  L = agg(−c · clipped_surrogate(ρ, A + β · kd_reward_returns))
    ρ = π/π_old (RLAD: trrd_log_ratio); A = advantages; keep = kd_response_mask; agg = _aggregate, cfg.loss_agg over
    the *whole* batch's counts; kd_token_loss carries its own π/π_old weight (kd_kind="full": exact_kl, no weight).
    c = sampler_weight, (B, T) or (B, 1), detached, default 1: π_old/q when another sampler q drew the rollouts
    (vLLM), on both terms. logp, old_logp, teacher_logp, mask: (B, T); advantages, correct: (B,). exact_kl (B, T):
    for kd_kind="full", the exact KL per position (token_logprobs_and_kl). num_tokens / num_seqs: the whole batch's
    counts when this is one minibatch of it (default: this batch's). The KD mask keeps the whole batch's token count
    as its divisor: masking shrinks the KD term, it does not average over the kept tokens. metrics["kd_loss"] is
    agg(c · keep · KD); in reward mode, of the sampled-token k1, logged and never added (KD is in the advantage).
    """
    mask = mask.bool()  # (B, T)
    # Padded slots may hold anything (−inf, nan): zero them *before* any arithmetic, because where() after
    # the fact protects the forward pass but not the backward one (0 · inf = nan would reach the weights).
    logp = torch.where(mask, logp, 0.0)  # (B, T)
    old_logp = torch.where(mask, old_logp.detach(), 0.0)  # (B, T)
    teacher_logp = torch.where(mask, teacher_logp.detach(), 0.0)  # (B, T)
    num_tokens = mask.sum().item() if num_tokens is None else num_tokens
    num_seqs = mask.shape[0] if num_seqs is None else num_seqs
    counts = dict(num_tokens=max(num_tokens, 1), num_seqs=max(num_seqs, 1), max_new_tokens=cfg.max_new_tokens)
    if sampler_weight is None:
        sampler_weight = torch.ones_like(logp)  # (B, T)
    sampler_weight = torch.where(mask, sampler_weight.detach(), 0.0)  # (B, T)
    kd_keep = kd_response_mask(correct, cfg.kd_mask, cfg.group_size)[:, None] & mask  # (B, T)
    if cfg.trrd_alpha is None:  # GRPO's ratio π/π_old, or TRRD's teacher-anchored one
        log_ratio = logp - old_logp  # (B, T)
    else:
        log_ratio = trrd_log_ratio(logp, old_logp, teacher_logp, cfg.trrd_alpha, cfg.trrd_clamp)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.detach()[:, None].to(logp.dtype).expand_as(logp)  # (B, T): each response's A on its tokens

    if cfg.kd_mode == "reward":  # KD as a reward: β × the KD return joins the advantage, and no second term
        if bias := leave_one_out_bias(cfg):  # train.validate_config refuses it too; this loss is copied alone
            raise ValueError(f"kdrl_loss: kd_baseline='loo' with {bias}")
        kd_returns = kd_reward_returns(logp, teacher_logp, mask, kd_keep, cfg.kd_gamma, cfg.group_size,
                                       leave_one_out=cfg.kd_baseline == "loo")  # (B, T)
        adv = adv + beta * kd_returns  # (B, T)
        kd_per_token = kl_estimate(logp.detach(), teacher_logp, "k1")  # (B, T): for the kd_loss metric only
    elif cfg.kd_kind == "full":  # the exact KL, a sum over the vocabulary: it needs no π/π_old weight
        if exact_kl is None:
            raise ValueError("kdrl_loss: kd_kind='full' needs exact_kl, the per-token KL over the vocabulary (full_kl)")
        kd_per_token = torch.where(mask, exact_kl, 0.0)  # (B, T)
    else:
        kd_per_token = kd_token_loss(logp, old_logp, teacher_logp, cfg.kd_kind)  # (B, T)

    surrogate = clipped_surrogate(ratio, adv, cfg.clip_eps_low, cfg.clip_eps_high)  # (B, T)
    pg_loss = _aggregate(sampler_weight * -surrogate, mask, cfg.loss_agg, **counts)  # −J_GRPO, a scalar
    kd_loss = _aggregate(sampler_weight * torch.where(kd_keep, kd_per_token, 0.0), mask, cfg.loss_agg, **counts)
    loss = pg_loss + beta * kd_loss if cfg.kd_mode == "loss" else pg_loss  # L = −J_GRPO + β · KD

    with torch.no_grad():
        below = (ratio < 1 - cfg.clip_eps_low) & (adv < 0)  # (B, T): clipped tokens, whose gradient is 0
        above = (ratio > 1 + cfg.clip_eps_high) & (adv > 0)  # (B, T)
        k1, k3 = (_masked_mean(kl_estimate(logp, teacher_logp, estimator), mask) for estimator in ("k1", "k3"))
        metrics = dict(pg_loss=pg_loss.item(), kd_loss=kd_loss.item(), kl_k1=k1, kl_k3=k3,
                       entropy=-_masked_mean(logp, mask), clip_frac=_masked_mean((below | above).to(logp.dtype), mask),
                       ratio=_masked_mean(ratio, mask),
                       kd_frac=kd_keep.sum().item() / max(mask.sum().item(), 1) if beta != 0 else 0.0)  # β = 0: no KD
    return loss, metrics


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x (B, T) over the positions mask (B, T) keeps, as a Python float (0 if none)."""
    return (torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)).item()


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor,
             num_tokens: float) -> tuple[torch.Tensor, dict]:
    """The SFT baseline: NLL of the kept responses (teacher samples that were correct), token mean.
    logp, mask: (B, T); keep: (B,) bool; num_tokens: kept tokens in the whole batch."""
    kept_tokens = mask.bool() & keep.bool()[:, None]  # (B, T)
    loss = -torch.where(kept_tokens, logp, 0.0).sum() / max(num_tokens, 1)
    return loss, dict(sft_loss=loss.item())


# -----------------------------------------------------------------------------
# One training step: sample → reward → advantage → teacher → update → metrics row. train.py loops over it.


def train_step(cfg: KDRLConfig, step: int, student, teacher, tokenizer, optimizer, batch: list[dict],
               reward_fn: Callable, *, end_ids: Optional[list[int]] = None) -> dict:
    """One step of cfg.method on `batch`, rows {"prompt": ..., "answer": ...}; returns the step's metrics row.
    It does not check cfg: the caller validated it (train.validate_config), zeroed the student's dropout and put
    both models in eval mode, as train.train() does; but a sequential preset (switch_step ≥ 1) is refused, since one
    step cannot know when to switch: pass phase_config(cfg, switched). end_ids: the ids that end a response
    (default: end_token_ids). Forward passes run under bf16 autocast when cfg.dtype resolves to bfloat16.
    """
    if cfg.switch_step:  # looping over train_step with the preset itself would distil forever, silently
        raise ValueError(f"train_step: method={cfg.method!r} switches at step {cfg.switch_step}, which one step cannot "
                         "do: pass kdrl.phase_config(cfg, switched) (train.train decides when, and resets AdamW)")
    device = next(student.parameters()).device
    G, V = cfg.group_size, len(tokenizer)  # V: the tokenizer's columns (checkpoints pad their logits beyond it)
    end_ids = end_token_ids(tokenizer, student, teacher) if end_ids is None else end_ids
    beta = beta_schedule(step, cfg.beta, cfg.beta_min, cfg.beta_decay_steps)
    times = {}
    with timed(times, "sampling"), autocast_for(cfg.dtype, device):  # 1. G responses per prompt (SFT: teacher's)
        sampler = teacher if cfg.sft else student
        prompts = [ex["prompt"] for ex in batch]
        rollouts = sample_rollouts(sampler, tokenizer, prompts, G, cfg.max_new_tokens, cfg.temperature,
                                   vocab_size=V, end_ids=end_ids)
    completions = decode(tokenizer, rollouts)
    rewards, correct = score_completions(reward_fn, batch, completions, G, cfg.format_bonus)  # 2. (B,), (B,)
    rewards, correct = rewards.to(device), correct.to(device)
    advantages = torch.zeros_like(rewards)  # 3. (B,); zero without a reward: pure distillation
    if cfg.use_reward:
        advantages = grpo_advantages(rewards, G, cfg.scale_adv_by_std, cfg.adv_eps)
    with timed(times, "teacher"), autocast_for(cfg.dtype, device):  # 4. teacher (and old-policy) log-probs
        scores = teacher_pass(cfg, student, teacher, rollouts, V)
    trained_on = correct  # (B,) bool; SFT: the teacher samples that ended, correct ones only unless sft_keep="all"
    if cfg.sft:
        trained_on = (correct if cfg.sft_keep == "correct" else torch.ones_like(correct)) & ~rollouts.truncated
    with timed(times, "update"), autocast_for(cfg.dtype, device):  # 5. μ epochs, each one optimizer step
        grad_norm, parts = policy_update(cfg, student, teacher, optimizer, rollouts=rollouts, advantages=advantages,
                                         trained_on=trained_on, beta=beta, scores=scores, vocab_size=V, step=step)
    row = dict(step=step, beta=beta, grad_norm=grad_norm, **_loss_metrics(cfg, parts))  # 6. the metrics row
    row.update(_batch_metrics(cfg, rollouts, rewards, correct, advantages, trained_on))
    return dict(row, **{f"time_{phase}": seconds for phase, seconds in times.items()})


@torch.no_grad()
def teacher_pass(cfg: KDRLConfig, student, teacher, rollouts: Rollouts, vocab_size: int) -> dict:
    """Step 4, no grad, nothing that grows with V: teacher_logp (B, T); for kd_kind="full" teacher_hidden (B, T, H_T),
    from which the update rebuilds the teacher's logits chunk by chunk; for μ > 1, old_logp (B, T)."""
    scores = dict(teacher_logp=torch.zeros_like(rollouts.logprobs), teacher_hidden=None, old_logp=None)
    if uses_exact_kl(cfg):
        teacher_logp, teacher_hidden = _score(cfg, token_logprobs_and_hidden, teacher, rollouts, vocab_size)
        scores.update(teacher_logp=teacher_logp, teacher_hidden=teacher_hidden)  # (B, T), (B, T, H_T)
    elif needs_teacher(cfg):
        scores["teacher_logp"] = _score(cfg, token_logprobs, teacher, rollouts, vocab_size)  # (B, T)
    if cfg.mu > 1 and not cfg.sft:  # SFT's NLL needs no old policy
        scores["old_logp"] = _score(cfg, token_logprobs, student, rollouts, vocab_size)  # (B, T)
    return scores


def needs_teacher(cfg: KDRLConfig) -> bool:
    return not cfg.sft and (max(cfg.beta, cfg.beta_min or 0.0) > 0 or cfg.trrd_alpha is not None)


def uses_exact_kl(cfg: KDRLConfig) -> bool:
    return cfg.kd_kind == "full" and cfg.kd_mode == "loss" and needs_teacher(cfg)


def _score(cfg: KDRLConfig, scorer: Callable, model, rollouts: Rollouts, vocab_size: int, *args):
    """scorer (token_logprobs or a variant) on the rollouts at the sampling temperature (SFT: τ = 1, plain NLL)."""
    temperature = 1.0 if cfg.sft else cfg.temperature
    return scorer(model, rollouts.input_ids, rollouts.attention_mask, rollouts.response_mask, *args,
                  temperature=temperature, vocab_size=vocab_size, chunk_size=cfg.logprob_chunk)


def policy_update(cfg: KDRLConfig, student, teacher, optimizer, *, rollouts: Rollouts, advantages: torch.Tensor,
                  trained_on: torch.Tensor, beta: float, scores: dict, vocab_size: int, step: int) -> tuple:
    """Step 5: μ epochs over the batch, each one optimizer step, gradients accumulated over minibatches of whole
    groups with the full batch's normaliser. Returns the last epoch's grad norm and its (tokens, metrics) parts.
    trained_on (B,) bool: the correct responses (the KD masks read them), or for SFT the teacher samples kept.
    Train mode only when checkpointing activations (Hugging Face needs it): dropout is zeroed, so both modes agree."""
    checkpointing = any(getattr(module, "gradient_checkpointing", False) is True for module in student.modules())
    student.train(checkpointing)  # Hugging Face checkpoints activations only in train mode
    mask = rollouts.response_mask  # (B, T)
    batch_size, G = mask.shape[0], cfg.group_size
    minibatch_size = max(G, cfg.minibatch_size // G * G)  # whole groups (the "group" KD mask needs them)
    num_tokens = (mask & trained_on[:, None]).sum().item() if cfg.sft else mask.sum().item()
    for _ in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        parts = []
        for first in range(0, batch_size, minibatch_size):
            mb = slice(first, first + minibatch_size)  # mb: the rows of one minibatch
            if cfg.sft:  # the SFT baseline: NLL on the kept teacher samples
                logp = _score(cfg, token_logprobs, student, rollouts[mb], vocab_size)  # (b, T)
                loss, metrics = sft_loss(logp, mask[mb], trained_on[mb], num_tokens)
            else:
                exact_kl = None
                if scores["teacher_hidden"] is not None:  # kd_kind="full": KL over the vocabulary, chunk by chunk
                    teacher_side = (teacher.get_output_embeddings(), scores["teacher_hidden"][mb])
                    logp, exact_kl = _score(cfg, token_logprobs_and_kl, student, rollouts[mb], vocab_size,
                                            *teacher_side)  # (b, T), (b, T)
                else:
                    logp = _score(cfg, token_logprobs, student, rollouts[mb], vocab_size)  # (b, T)
                old_logp = logp.detach() if scores["old_logp"] is None else scores["old_logp"][mb]  # μ = 1: ρ = 1
                loss, metrics = kdrl_loss(logp, old_logp, scores["teacher_logp"][mb], advantages[mb], mask[mb],
                                          trained_on[mb], cfg, beta, exact_kl=exact_kl, num_tokens=num_tokens,
                                          num_seqs=batch_size)
            if not torch.isfinite(loss):
                bad = {name: value for name, value in metrics.items() if not math.isfinite(value)} or "none"
                raise KDRLError(f"non-finite loss at step {step} (loss={loss.item()}, non-finite metrics: {bad})")
            loss.backward()
            parts.append((mask[mb].sum().item(), metrics))
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm or float("inf")).item()
        if not math.isfinite(grad_norm):
            raise KDRLError(f"non-finite gradient at step {step} (grad_norm={grad_norm})")
        if cfg.sft and num_tokens == 0:  # SFT kept no sample: no step (AdamW's momentum would still move the weights)
            continue
        optimizer.step()
    student.eval()
    return grad_norm, parts


def _loss_metrics(cfg: KDRLConfig, parts: list) -> dict:
    """The last epoch's metrics over its minibatches' (tokens, metrics) parts: each *_loss is its minibatch's share
    (they add up), the others token-weighted means of minibatch means. No KL metrics when no teacher was scored."""
    total = sum(tokens for tokens, _ in parts) or 1
    row = {}
    for name in parts[0][1]:
        if name.endswith("_loss"):
            row[name] = sum(metrics[name] for _, metrics in parts)
        else:
            row[name] = sum(tokens * metrics[name] / total for tokens, metrics in parts)
    if not needs_teacher(cfg):
        for name in ("kl_k1", "kl_k3", "kd_loss"):
            row.pop(name, None)
    return row


def _batch_metrics(cfg: KDRLConfig, rollouts: Rollouts, rewards, correct, advantages, trained_on) -> dict:
    """What the step's batch was: reward, accuracy, length, truncation, tokens; for SFT the fraction of teacher
    samples trained on, otherwise the fraction of groups whose advantages are all 0 (no policy gradient)."""
    row = dict(reward=rewards.mean().item(), acc=correct.float().mean().item(),
               length=rollouts.response_mask.sum(1).float().mean().item(),
               truncated=rollouts.truncated.float().mean().item(),
               tokens=rollouts.attention_mask.sum().item())  # non-pad prompt and response tokens
    if cfg.sft:
        return dict(row, sft_kept=trained_on.float().mean().item())
    return dict(row, zero_adv_frac=(advantages.view(-1, cfg.group_size) == 0).all(dim=1).float().mean().item())


# -----------------------------------------------------------------------------
# Models: sampling and log-probs, the two hot paths (sampling, the bulk of a step; the teacher's forward, KD's cost).


@dataclass
class Rollouts:
    """G sampled responses per prompt, prompt-major (the G responses of a prompt are contiguous)."""

    input_ids: torch.Tensor  # (B, P+T) left-padded prompt, then the response, pad after its first end token
    attention_mask: torch.Tensor  # (B, P+T) 1 on prompt tokens and on response tokens up to the first end token
    response_mask: torch.Tensor  # (B, T) bool, response tokens up to and *including* the first end token
    logprobs: torch.Tensor  # (B, T) float32 log π(y_t | y_<t) at the sampling τ, 0 where masked; unused by the loss
    truncated: torch.Tensor  # (B,) bool, no end id (EOS or another, see end_token_ids) within max_new_tokens

    @property
    def response_ids(self) -> torch.Tensor:  # (B, T)
        return self.input_ids[:, -self.response_mask.shape[1] :]

    def __getitem__(self, rows) -> "Rollouts":  # a minibatch: rollouts[i:j]
        return Rollouts(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


def format_prompt(tokenizer, prompt: str) -> str:
    """Apply the chat template when the tokenizer has one (a single user turn), else the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        turn = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return prompt


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-format and left-pad prompts. Returns input_ids, attention_mask: (N, P) long."""
    templated = bool(getattr(tokenizer, "chat_template", None))  # the template already holds BOS
    rows = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=not templated)["input_ids"] for p in prompts]
    P = max(map(len, rows))  # the longest prompt
    pad = pad_token_id(tokenizer)
    ids = torch.tensor([[pad] * (P - len(row)) + row for row in rows], dtype=torch.long)  # (N, P)
    mask = torch.tensor([[0] * (P - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)  # (N, P)
    return ids, mask


def pad_token_id(tokenizer) -> int:
    """pad may equal EOS: masks are built from positions, never by dropping pad ids, so EOS is still trained."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def end_token_ids(tokenizer, *models) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and each model's generation_config.eos_token_id (an int
    or a list: Qwen2.5-Instruct names <|im_end|> and <|endoftext|>, Llama-3-Instruct three ids). Sorted, unique."""
    ids = {tokenizer.eos_token_id}
    for model in models:
        listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids |= set(listed if isinstance(listed, (list, tuple)) else [listed])
    return sorted(i for i in ids if i is not None)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as generate() computes them. (B, L) → (B, L)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _next_token(logits: torch.Tensor, temperature: float, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (or argmax at τ = 0) from logits (B, ≥V), padded columns ≥ vocab_size excluded.
    Returns token (B,) and its log-prob (B,) float32 under softmax(logits / τ) (τ = 1 when greedy)."""
    scaled = logits[:, :vocab_size].float() / (temperature or 1.0)  # (B, V); greedy (τ = 0): plain softmax
    logp = torch.log_softmax(scaled, dim=-1)  # (B, V)
    if temperature == 0:
        token = logp.argmax(-1)
    else:  # exponential race: argmax(log p − log E), E ~ Exp(1), is an exact sample, and never raises on NaN
        token = (logp - torch.empty_like(logp).exponential_().log()).argmax(-1)
    return token, logp.gather(1, token[:, None]).squeeze(1)


def _cache_argument(model) -> str:
    """The forward() argument that takes the KV cache: "cache" from transformers 5.2x, "past_key_values" before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    """The KV cache a forward() returned, under either name (see _cache_argument)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _drop_finished(cache, alive: torch.Tensor) -> torch.Tensor:
    """Shrink the KV cache to the rows still alive (alive: (rows,) bool, once a tenth has finished); their indices."""
    if not hasattr(cache, "reorder_cache"):  # a cache we cannot shrink: keep decoding every row
        return torch.arange(len(alive), device=alive.device)
    keep = alive.nonzero().squeeze(1)
    cache.reorder_cache(keep)  # index_select on every layer's keys and values (the beam-search hook)
    return keep


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompts: list[str], group_size: int, max_new_tokens: int,
                    temperature: float = 1.0, *, vocab_size: Optional[int] = None,
                    end_ids: Optional[list[int]] = None) -> Rollouts:
    """Sample group_size responses to each prompt with a KV cache; temperature 0 is greedy. N prompts in,
    B = N · group_size responses out, groups contiguous; T ≤ max_new_tokens is the longest. A response ends at its
    first token in end_ids (default end_token_ids(tokenizer, model)), which it keeps. Log-probs are of
    softmax(logits / τ), what was sampled. Logit columns ≥ vocab_size (default len(tokenizer)) are excluded.
    no_grad, not inference_mode, so the ids can enter a graph. Finished rows leave the decoding batch (_drop_finished).
    """
    V = vocab_size or len(tokenizer)
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    end_ids = torch.tensor(end_ids if end_ids is not None else end_token_ids(tokenizer, model), device=device)  # (E,)
    prompt_ids, prompt_attn = encode_prompts(tokenizer, prompts)  # (N, P), left-padded
    prompt_ids = prompt_ids.repeat_interleave(group_size, 0).to(device)  # (B, P)
    prompt_attn = prompt_attn.repeat_interleave(group_size, 0).to(device)  # (B, P)
    B = prompt_ids.shape[0]
    pos = _positions(prompt_attn)  # (B, P)
    cache_arg = _cache_argument(model)
    out = model(input_ids=prompt_ids, attention_mask=prompt_attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)  # (B, max_new_tokens)
    logps = torch.zeros(B, max_new_tokens, device=device)  # (B, max_new_tokens)
    resp_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)  # (B, max_new_tokens)
    alive = torch.ones(B, dtype=torch.bool, device=device)  # (B,): no end token yet
    # The decoding batch: `rows` are the batch indices of the rows it still carries, each with its attention mask
    # (rows, P + t) and next position (rows,). It shrinks as rows finish.
    rows = torch.arange(B, device=device)  # (rows,)
    attn = prompt_attn  # (rows, P + t)
    next_pos = pos[:, -1]  # (rows,)
    for t in range(max_new_tokens):
        token, token_logp = _next_token(out.logits[:, -1], temperature, V)  # (rows,), (rows,)
        live = alive[rows]  # (rows,)
        tokens[rows, t] = torch.where(live, token, pad)
        logps[rows, t] = torch.where(live, token_logp, 0.0)
        resp_mask[rows, t] = live  # includes the first end token
        alive[rows] = live & ~torch.isin(token, end_ids)
        n_alive = int(alive.sum())  # the one host sync per token: stop as soon as all are done
        if t + 1 == max_new_tokens or n_alive == 0:
            break
        if n_alive <= 0.9 * len(rows):
            keep = _drop_finished(_returned_cache(out), alive[rows])  # (rows',) indices into the decoding batch
            rows, attn, next_pos, token = rows[keep], attn[keep], next_pos[keep], token[keep]  # (rows', ...)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)  # (rows, P + t + 1)
        next_pos = next_pos + 1  # (rows,)
        step_inputs = dict(input_ids=token[:, None], attention_mask=attn, position_ids=next_pos[:, None])
        out = model(**step_inputs, use_cache=True, **{cache_arg: _returned_cache(out)})
    if not torch.isfinite(logps).all():
        raise KDRLError("non-finite log-probs while sampling: the model's weights or activations diverged")
    T = t + 1  # the longest response
    tokens, logps, resp_mask = tokens[:, :T], logps[:, :T], resp_mask[:, :T]  # (B, T) each
    input_ids = torch.cat([prompt_ids, tokens], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt_attn, resp_mask.long()], dim=1)  # (B, P + T)
    return Rollouts(input_ids, attention_mask, resp_mask, logps, truncated=alive)


# Config attributes of models whose logits are post-processed after the head: they take the full-logits path.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")


def _chunk_logprobs(head, temperature: float, vocab_size: int, hidden: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden) / τ)[target] for rows of hidden (N, H) → (N,) float32, via logsumexp."""
    logits = head(hidden)[:, :vocab_size].float() / temperature  # (N, V): the only (·, V) tensor alive
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)


def _chunk_logprobs_kl(head, temperature, vocab_size, teacher_head, hidden, targets, teacher_hidden) -> tuple:
    """_chunk_logprobs, and the exact KL(π ‖ π_T) per row from both models' rebuilt logits. → (N,), (N,) float32.
    teacher_hidden: (N, H_T), no gradient. _FullKL gives the KL and the student's log-normaliser in one pass."""
    logits = head(hidden)  # (N, ≥V), padded columns included (_FullKL reads the first V)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)  # (N, ≥V)
    kl, lse = _FullKL.apply(logits, teacher_logits, vocab_size, max(len(logits), 1), temperature)  # (N,), (N,)
    logp = logits.gather(1, targets[:, None]).squeeze(1).to(lse.dtype) / temperature - lse  # (N,)
    return logp, kl


def _by_chunks(fn, fixed: tuple, rows: tuple, chunk_size: int, checkpoint: bool, outputs: int = 1) -> list:
    """fn(*fixed, *chunk) over chunk_size rows of each tensor in `rows` at a time, its `outputs` (c,) outputs joined to
    (N,). With checkpoint a chunk's (c, V) logits are recomputed in the backward pass, not saved: O(chunk_size · V)."""
    outs = []
    for i in range(0, len(rows[0]), chunk_size):
        args = (*fixed, *(x[i : i + chunk_size] for x in rows))
        out = torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False) if checkpoint else fn(*args)
        outs.append(out if isinstance(out, tuple) else (out,))
    if not outs:  # no rows
        return [rows[0].new_zeros(0, dtype=torch.float32) for _ in range(outputs)]
    return [torch.cat(parts) for parts in zip(*outs, strict=True)]


def head_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, vocab_size: int,
                  chunk_size: int = 256, *, checkpoint: bool = True) -> torch.Tensor:
    """log softmax(head(hidden) / τ)[target] over the first vocab_size columns. (N, H), (N,) → (N,) float32. The head
    (any callable: an nn.Linear, nn.Identity when hidden holds logits) runs chunk_size rows at a time (_by_chunks)."""
    checkpoint = checkpoint and torch.is_grad_enabled() and hidden.requires_grad
    return _by_chunks(_chunk_logprobs, (head, temperature, vocab_size), (hidden, targets), chunk_size, checkpoint)[0]


def head_logprobs_and_kl(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, vocab_size: int,
                         teacher_head, teacher_hidden: torch.Tensor, chunk_size: int = 256) -> tuple:
    """head_logprobs, and each row's exact KL(π ‖ π_T) over the vocabulary. (N, H), (N,), (N, H_T) → (N,), (N,).
    kdrl-full's path: each chunk rebuilds both models' logits at τ from final hidden states and output heads, feeds
    them to _FullKL and frees them (checkpointed; the gradient reaches hidden and head only): no (N, V) tensor."""
    use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
    logp, kl = _by_chunks(_chunk_logprobs_kl, (head, temperature, vocab_size, teacher_head),
                          (hidden, targets, teacher_hidden), chunk_size, use_checkpoint, outputs=2)
    return logp, kl  # (N,), (N,)


def _logits_need_full_path(model) -> Optional[str]:
    """Why this model's logits are not head(final hidden state) (so they cannot be rebuilt per chunk), or None."""
    if model.get_output_embeddings() is None:
        return "it exposes no output head"
    for name in _LOGIT_POSTPROCESSING:
        if getattr(model.config, name, None) not in (None, 1, 1.0):
            return f"its config sets {name}={getattr(model.config, name)} (logits post-processed after the head)"
    return None


def check_logits_rebuildable(model) -> None:
    """kd_kind="full" rebuilds logits from final hidden states and the output head; refuse a model where it can't."""
    if reason := _logits_need_full_path(model):
        raise KDRLError(f"kd_kind='full' rebuilds each model's logits from its hidden states, but {reason}: use k2")


def _response_states(model, input_ids, attention_mask, response_mask, length_buckets: int):
    """One forward pass per length bucket, keeping the n response positions the mask keeps: (head, states (n, H),
    targets (n,), index (n,) into the flat (B·T,) grid), head(states) the logits predicting targets. Models whose
    logits are post-processed after the head (Gemma-2, Cohere) or with none give full logits (n, V), identity head."""
    B, T = response_mask.shape
    P = input_ids.shape[1] - T  # prompt length (left-padded)
    mask = response_mask.bool()  # (B, T)
    lengths = mask.sum(1)  # (B,)
    full_logits = _logits_need_full_path(model) is not None
    states, targets, index = [], [], []
    # rows sorted by response length in buckets, each run trimmed to its own longest response: short responses stop
    # paying for the padding behind the longest (exact: attention is causal, so the cut positions change nothing)
    for idx in lengths.argsort(descending=True, stable=True).chunk(length_buckets):  # idx: (b,) one bucket's rows
        longest = int(lengths[idx].max()) if len(idx) else 0  # this bucket's longest response
        if longest == 0:
            continue
        ids = input_ids[idx, : P + longest]  # (b, P + longest)
        attn = attention_mask[idx, : P + longest]  # (b, P + longest)
        kept = mask[idx, :longest]  # (b, longest)
        # use_cache=False: a scoring pass has no KV cache to build
        inputs = dict(input_ids=ids, attention_mask=attn, position_ids=_positions(attn), use_cache=False)
        if full_logits:
            out = model(**inputs).logits[:, P - 1 : -1]  # (b, longest, V), each position predicting the next token
        else:
            out = model.base_model(**inputs).last_hidden_state[:, P - 1 : -1]  # (b, longest, H)
        states.append(out[kept])  # (n_b, H) or (n_b, V)
        targets.append(ids[:, P:][kept])  # (n_b,)
        index.append((idx[:, None] * T + torch.arange(longest, device=idx.device))[kept])  # (n_b,) into B·T
    head = torch.nn.Identity() if full_logits else model.get_output_embeddings()
    if not states:  # no response token at all
        width = model.config.vocab_size if full_logits else model.config.hidden_size
        empty = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        return head, torch.zeros(0, width, device=input_ids.device), empty, empty
    return head, torch.cat(states), torch.cat(targets), torch.cat(index)


def _on_grid(values: torch.Tensor, index: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Scatter per-position values (n, ...) back onto the (B, T, ...) grid, zeros elsewhere (differentiable)."""
    grid = values.new_zeros(B * T, *values.shape[1:])  # (B·T, ...)
    return grid.index_put((index,), values).view(B, T, *values.shape[1:])  # (B, T, ...)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, *,
                   temperature: float = 1.0, vocab_size: Optional[int] = None, chunk_size: int = 256,
                   length_buckets: int = 4) -> torch.Tensor:
    """Float32 log π(y_t | y_<t) of the response tokens at temperature τ (0 where response_mask is 0).
    input_ids, attention_mask: (B, P+T); response_mask: (B, T), the last T columns. Returns (B, T). Rows run in
    length_buckets forward passes of similar response length ("one teacher pass" is up to that many calls); only
    the kept positions go through the output head, chunk_size at a time (head_logprobs): memory beyond the model's
    own activations is O(chunk_size · V), never (B, T, V)."""
    B, T = response_mask.shape
    head, states, targets, index = _response_states(model, input_ids, attention_mask, response_mask, length_buckets)
    V = vocab_size or model.config.vocab_size
    logp = head_logprobs(head, states, targets, temperature or 1.0, V, chunk_size,
                         checkpoint=not isinstance(head, torch.nn.Identity))  # (n,)
    return _on_grid(logp, index, B, T)  # (B, T)


def token_logprobs_and_hidden(model, input_ids, attention_mask, response_mask, *, temperature=1.0, vocab_size=None,
                              chunk_size=256, length_buckets=4) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs, and the final hidden states at the response positions, (B, T, H), zero where masked: the
    teacher's side of kdrl-full (with its output head, all it takes to rebuild its logits). No grad expected."""
    check_logits_rebuildable(model)
    B, T = response_mask.shape
    head, states, targets, index = _response_states(model, input_ids, attention_mask, response_mask, length_buckets)
    V = vocab_size or model.config.vocab_size
    logp = head_logprobs(head, states, targets, temperature or 1.0, V, chunk_size)  # (n,)
    return _on_grid(logp, index, B, T), _on_grid(states, index, B, T)  # (B, T), (B, T, H)


def token_logprobs_and_kl(model, input_ids, attention_mask, response_mask, teacher_head, teacher_hidden, *,
                          temperature=1.0, vocab_size=None, chunk_size=256, length_buckets=4) -> tuple:
    """token_logprobs, and the exact KL(π ‖ π_T) at each response position, (B, T), 0 where masked, with grad to the
    student: kdrl-full's update. teacher_hidden: (B, T, H_T) from token_logprobs_and_hidden (head_logprobs_and_kl)."""
    check_logits_rebuildable(model)
    B, T = response_mask.shape
    head, states, targets, index = _response_states(model, input_ids, attention_mask, response_mask, length_buckets)
    teacher_states = teacher_hidden.reshape(B * T, -1)[index]  # (n, H_T)
    logp, kl = head_logprobs_and_kl(head, states, targets, temperature or 1.0,
                                    vocab_size or model.config.vocab_size, teacher_head, teacher_states, chunk_size)
    return _on_grid(logp, index, B, T), _on_grid(kl, index, B, T)  # (B, T), (B, T)


# -----------------------------------------------------------------------------
# Rewards: fn(prompt, completion, example) -> float, 1.0 meaning correct.

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?$")


def extract_answer(text: str) -> Optional[str]:
    """The final answer: the *last* \\boxed{...} (nested braces), else the last '#### x', else 'Answer: x', or None."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{") : i - 1].strip()
        start = text.rfind("\\boxed{", 0, start)  # unclosed: try the one before
    for pattern in (r"####\s*([^\n]*)", r"[Aa]nswer:\s*([^\n]*)"):
        found = [match.strip() for match in re.findall(pattern, text) if match.strip()]
        if found:
            return found[-1]
    return None


def _as_number(s: str) -> Optional[Fraction]:
    """'1,234', '-3.50', '+7', '3/4', '\\frac{3}{4}', '$12.' → Fraction; None if not a plain number."""
    s = s.strip().strip("$").rstrip(".").replace(" ", "")
    s = re.sub(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$", r"\1/\2", s)
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", s):  # thousands separators
        s = s.replace(",", "")
    if not _NUMBER.match(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str, gold: str) -> bool:
    """Numerically when both parse as numbers, else as strings without whitespace, end '$' and '.', or case."""
    pred_number, gold_number = _as_number(pred), _as_number(str(gold))
    if pred_number is not None and gold_number is not None:
        return pred_number == gold_number
    pred, gold = (re.sub(r"\s+", "", str(answer)).strip("$.").lower() for answer in (pred, gold))
    return pred == gold


def math_reward(prompt: str, completion: str, example: dict) -> float:
    """1.0 if the completion's final answer (extract_answer) equals example["answer"], else 0.0."""
    pred = extract_answer(completion)
    return float(pred is not None and answers_match(pred, example["answer"]))


def decode(tokenizer, rollouts: Rollouts) -> list[str]:
    """Response texts, up to and including the first end token (special tokens dropped)."""
    ids = rollouts.response_ids.masked_fill(~rollouts.response_mask, pad_token_id(tokenizer))  # (B, T)
    return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)


def score_completions(reward_fn: Callable, examples: list[dict], completions: list[str], group_size: int,
                      format_bonus: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards and correctness for prompt-major completions. Returns rewards (B,) float32, correct (B,) bool.
    correct comes from reward_fn alone (score ≥ 1); the format bonus is added afterwards and never counts."""
    scores = []
    for i, completion in enumerate(completions):
        ex = examples[i // group_size]
        try:
            scores.append(float(reward_fn(ex["prompt"], completion, ex)))
        except Exception as e:
            where = f"line {ex['_line']} " if "_line" in ex else ""
            raise KDRLError(f"reward function failed on example {where}(prompt {ex['prompt'][:60]!r}): "
                            f"{type(e).__name__}: {e}") from e
    scores = torch.tensor(scores, dtype=torch.float32)
    has_answer = [extract_answer(completion) is not None for completion in completions]  # the format check
    bonus = torch.tensor([format_bonus * ok for ok in has_answer], dtype=torch.float32)
    return scores + bonus, scores >= 1.0


# -----------------------------------------------------------------------------
# Numerical engineering: the exact KL in float32 (full_kl's), timing, the compute dtype.


def _autocast_off(device: torch.device):
    """A context in which autocast does not touch ops on `device` (none where the device has no autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _FullKL(torch.autograd.Function):
    """full_kl's engine: for rows s, t (N, ≥V) of logits, u = s/τ and w = t/τ over the first V columns, returns
    KL(softmax(u) ‖ softmax(w)) and lse(u) = log Σ_v exp(u_v) (the student's log-probs: one gather). In float32
    (float64 stays float64), autocast off, from e = exp(u − max u), no log-softmax written out:
        Z = Σe, m = Σe(u−w)/Z, KL = m − lse(u) + lse(w); ∂KL/∂u = p⊙(u − w − m), ∂lse/∂u = p = e/Z.
    Dividing by the float32 Z makes each gradient row sum to 0 up to its terms' rounding. chunk_size rows at a time;
    only the inputs and three floats a row are saved (at most two (chunk, V) float32 temporaries in either pass)."""

    @staticmethod
    def forward(ctx, s, t, vocab_size, chunk_size, temperature):  # s, t: (N, ≥V)
        ctx.set_materialize_grads(False)
        dtype = torch.promote_types(s.dtype, torch.float32)
        kl, lse, mean_diff = (s.new_empty(s.shape[0], dtype=dtype) for _ in range(3))  # (N,) each
        with _autocast_off(s.device):
            for first in range(0, s.shape[0], chunk_size):
                rows = slice(first, first + chunk_size)
                x, y = s[rows, :vocab_size].to(dtype), t[rows, :vocab_size].to(dtype)  # (c, V) each
                lse_y = _logsumexp(y, temperature)[1]  # (c,)
                e, lse[rows], z = _logsumexp(x, temperature)  # (c, V), (c,), (c,)
                # m = Σ e (s − t) / (τ Z), summed pairwise (a BLAS dot product of e and s − t is 1e-5 off)
                mean_diff[rows] = torch.sub(x, y).mul_(e).sum(dim=-1) / z / temperature  # (c,)
                kl[rows] = mean_diff[rows] - lse[rows] + lse_y
        ctx.save_for_backward(s, t, lse, mean_diff)
        ctx.vocab_size, ctx.chunk_size, ctx.temperature = vocab_size, chunk_size, temperature
        return kl, lse

    @staticmethod
    def backward(ctx, grad_kl, grad_lse):  # (N,) each, or None for an output that was not used
        s, t, lse, mean_diff = ctx.saved_tensors
        V, tau = ctx.vocab_size, ctx.temperature
        grad_kl, grad_lse = (torch.zeros_like(lse) if g is None else g for g in (grad_kl, grad_lse))  # (N,) each
        grad = torch.zeros_like(s)  # padded columns ≥ V carry no probability and get no gradient
        with _autocast_off(s.device):
            for first in range(0, s.shape[0], ctx.chunk_size):
                rows = slice(first, first + ctx.chunk_size)
                x, y = s[rows, :V].to(lse.dtype), t[rows, :V].to(lse.dtype)  # (c, V) each
                shifted = torch.sub(x, lse[rows, None], alpha=tau)  # (c, V): s − τ·lse(u)
                p = (shifted.div_(tau) if tau != 1 else shifted).exp_()  # (c, V): softmax(u)
                # ∂/∂s = p⊙(a(s − t) + b), a = ∂KL·/τ², b = (∂lse − ∂KL·m)/τ: one number a row each
                a = grad_kl[rows, None] / tau**2  # (c, 1)
                b = (grad_lse[rows, None] - grad_kl[rows, None] * mean_diff[rows, None]) / tau  # (c, 1)
                g = torch.sub(x, y).mul_(a).add_(b).mul_(p)  # (c, V)
                grad[rows, :V] = g.to(s.dtype)
        return grad, None, None, None, None


def _logsumexp(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e = exp((x − max x)/τ), lse = log Σ_v exp(x_v/τ), Z = Σ e per row: (c, V) → (c, V), (c,), (c,). Sums
    are pairwise (torch.sum; torch.log_softmax's float32 CPU kernel sums serially: 2e-5 off at V = 151,936)."""
    row_max = x.amax(dim=-1, keepdim=True)  # (c, 1)
    e = torch.sub(x, row_max)  # (c, V)
    e = (e.div_(temperature) if temperature != 1 else e).exp_()
    z = e.sum(dim=-1)  # (c,)
    return e, row_max.squeeze(-1) / temperature + z.log(), z


@contextlib.contextmanager
def timed(times: dict, phase: str):
    """Add the wall time of the block to times[phase], CUDA synchronised on both sides so the figure is honest."""
    if torch.cuda.is_available():  # kernels run asynchronously: wait for those queued before the block
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield  # (an exception leaves times as they were: the step failed)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times[phase] = times.get(phase, 0.0) + time.perf_counter() - start


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """cfg.dtype → the dtype forward passes run in: "auto" is bfloat16 on CUDA, float32 elsewhere."""
    bfloat16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if bfloat16 else torch.float32


def autocast_for(dtype: str, device: torch.device) -> torch.autocast:
    """bfloat16 autocast for a forward pass when cfg.dtype resolves to bfloat16, else a context that does nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype(dtype, device) == torch.bfloat16)
