"""
kdrl.py: KDRL (GRPO + reverse-KL distillation from a teacher, in one loss) and RLAD/TRRD, in one file.

KDRL, Xu et al. 2025, arXiv 2506.02208, maximises

    J_KDRL(θ) = J_GRPO(θ) − β · KL(π_θ ‖ π_T)

on the student's own rollouts: the teacher π_T takes the place of GRPO's reference policy. RLAD/TRRD,
Zhang et al. 2026, arXiv 2602.22495, instead puts the teacher inside GRPO's clipped ratio,
ρ = (π/π_old)^α · (π/π_T)^(1−α), and keeps no separate KD term.

The file reads top to bottom like the papers:
    config (KDRLConfig, METHODS)  →  pure math (kl_estimate, full_kl, kl_reward_to_go, grpo_advantages,
    beta_schedule, and the loss's pieces clipped_surrogate, trrd_log_ratio, kd_token_loss, kd_reward_returns,
    composed by kdrl_loss)  →  models (sample_rollouts, token_logprobs)  →  rewards (math_reward)
    →  the training loop (train, with its plumbing below it)  →  the CLI (main).
The math functions take tensors and return tensors: copy any of them into your own trainer unchanged.

Where this differs from the papers, or pins down what they leave open:
- The KD term is a token-level masked mean, like the paper. We say plainly what each estimator's
  *gradient* is (see kl_estimate): k2, the paper's choice, follows the token-level reverse KL with the
  contexts held fixed; k3, the default in TRL and verl, follows the *forward* KL. kd_mode="reward" with
  γ = 1 follows the sequence-level reverse KL instead (kdrl-seq; exactly so with loss_agg="constant").
- Off-policy minibatches (μ > 1) weight the per-token KD estimate by the detached ratio π/π_old, so its
  expected gradient is again the token-level reverse KL's, over the contexts π_old visited. The paper is
  silent on this.
- Dropout is zeroed, so the update scores the same policy that sampled. Log-probs are taken at the
  sampling temperature (logits / τ), for student and teacher alike.
- One optimizer step per μ-epoch over the whole batch; minibatches only bound memory (gradients are
  accumulated with the full-batch normaliser, so the maths does not depend on the minibatch size).

Run:  python kdrl.py --student PATH --teacher PATH --train data.jsonl --method kdrl --steps 100
Demo: python train_tiny.py      Tests: python -m pytest -q
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import pickle
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
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
    """compute dtype: "auto" (bfloat16 autocast on cuda, float32 on cpu), "float32" or "bfloat16"; the student's
    weights and AdamW state stay float32 (a 1e-6 step would round away in bf16 weights), the teacher is stored in it"""
    gradient_checkpointing: bool = False
    """recompute the student's activations in the backward pass to save memory (the update then runs in train
    mode, dropout zeroed)"""
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
    """"loss": β × a per-token KL estimate is added to the loss; "reward": β × KL reward-to-go joins the
    advantage"""
    kd_kind: str = "k2"
    """loss-mode estimator: "k1", "k2" (paper), "k3", or "full" (exact KL over the vocabulary)"""
    kd_gamma: float = 1.0
    """reward-mode discount: 1 gives the sequence-level reverse KL, 0 the per-token one"""
    kd_baseline: str = "loo"
    """reward mode: subtract from each response's KD return the mean of the other G − 1 responses' returns at the
    same position ("loo", leave-one-out: unbiased, lower variance), or nothing ("none")"""
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
    """SFT: "correct" keeps the teacher samples that are correct and ended (not truncated); "all" keeps every one
    that ended (unfiltered SFT: it learns the teacher's mistakes too)"""
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
    """responses per forward/backward, rounded down to whole groups (at least one); gradients are accumulated, so
    this bounds memory only"""
    logprob_chunk: int = 256
    """positions per chunk when computing log-probs over the vocabulary"""

    @classmethod
    def from_method(cls, method: str = "kdrl", **overrides) -> "KDRLConfig":
        """The config of a named method: defaults ← METHODS[method] ← overrides (which may tune its knobs,
        not the fields that define it: validate_config refuses those). The CLI, the demo and the tests use it."""
        if method not in METHODS:
            raise KDRLError(f"config field method={method!r}: must be one of {tuple(METHODS)}")
        return cls(**{**METHODS[method], **overrides, "method": method})


# Each method is a set of overrides on KDRLConfig: the one place that defines it. Build a method's config with
# KDRLConfig.from_method(name, **overrides); train() refuses a config whose fields contradict its method.
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
    "sft-all": dict(sft=True, beta=0.0, sft_keep="all"),
}

# The fields that make each method what it is, beyond sft, use_reward and TRRD on/off, which every method
# fixes. Every other field is a knob a flag may tune (β, α, γ, ε, the estimator of the KDRL variants, the
# annealing schedule); changing one of these would silently turn the run into another method.
_DEFINING: dict[str, tuple[str, ...]] = {
    "grpo": ("beta", "beta_min"),
    "kd": ("kd_mode",),
    "kdrl": ("kd_mode", "kd_mask", "beta_min"),
    "kdrl-anneal": ("kd_mode", "kd_mask"),
    "kdrl-mask": ("kd_mode",),  # and kd_mask "response" or "group", not "none"
    "kdrl-seq": ("kd_mode",),
    "kdrl-full": ("kd_mode", "kd_kind"),
    "rlad": ("beta", "beta_min"),
    "sft": ("sft_keep",),
    "sft-all": ("sft_keep",),
}


class KDRLError(ValueError):
    """A user-facing problem (bad input, bad config, diverged run): main() prints it and exits 1."""


_CHOICES = dict(
    loss_agg=("token-mean", "seq-mean", "constant"),
    kd_mode=("loss", "reward"),
    kd_kind=("k1", "k2", "k3", "full"),
    kd_mask=("none", "response", "group"),
    sft_keep=("correct", "all"),
    kd_baseline=("none", "loo"),
    device=("auto", "cpu", "cuda"),
    dtype=("auto", "float32", "bfloat16"),
)


def validate_config(cfg: KDRLConfig) -> None:
    """Raise KDRLError (a ValueError) naming the first bad field."""
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise KDRLError(f"config field {name}={getattr(cfg, name)!r}: must be one of {choices}")
    if cfg.method not in METHODS:
        raise KDRLError(f"config field method={cfg.method!r}: must be one of {tuple(METHODS)}")
    # every float field (an Optional one when set), before the range checks below: inf passes `x >= 0`
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise KDRLError(f"config field {f.name}={value}: must be a finite number")
    counts = ("steps", "group_size", "prompts_per_step", "max_new_tokens", "mu", "minibatch_size", "logprob_chunk")
    for name in counts:
        if getattr(cfg, name) < 1:
            raise KDRLError(f"config field {name}={getattr(cfg, name)}: must be >= 1")
    ranges = [  # the floats are finite by now
        ("beta", cfg.beta >= 0, ">= 0"),
        ("lr", cfg.lr > 0, "> 0"),
        ("clip_eps_low", 0 <= cfg.clip_eps_low < 1, "in [0, 1)"),
        ("clip_eps_high", 0 <= cfg.clip_eps_high < 1, "in [0, 1)"),
        ("adv_eps", cfg.adv_eps >= 0, ">= 0"),
        ("trrd_clamp", cfg.trrd_clamp > 0, "> 0 (a clamp at 0 removes the teacher from the ratio)"),
        ("kd_gamma", 0 <= cfg.kd_gamma <= 1, "in [0, 1]"),
        ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("max_grad_norm", cfg.max_grad_norm >= 0, ">= 0 (0 disables clipping)"),
        ("beta_decay_steps", cfg.beta_decay_steps >= 0, ">= 0"),
        ("save_every", cfg.save_every >= 0, ">= 0"),
        ("eval_every", cfg.eval_every >= 0, ">= 0"),
        ("eval_limit", cfg.eval_limit >= 1, ">= 1"),
        ("log_every", cfg.log_every >= 0, ">= 0 (0: no metrics lines beside the progress bar)"),
    ]
    for name, ok, rule in ranges:
        if not ok:
            raise KDRLError(f"config field {name}={getattr(cfg, name)}: must be {rule}")
    if cfg.beta_min is not None and not 0 <= cfg.beta_min <= cfg.beta:
        raise KDRLError(
            f"config field beta_min={cfg.beta_min}: must be in [0, beta={cfg.beta}] (annealing decays β)"
        )
    if cfg.trrd_alpha is not None and not 0.0 <= cfg.trrd_alpha <= 1.0:
        raise KDRLError(f"config field trrd_alpha={cfg.trrd_alpha}: must be in [0, 1]")
    if cfg.temperature <= 0:  # greedy rollouts are identical within a group (A = 0) and are not samples of π
        raise KDRLError(
            f"config field temperature={cfg.temperature}: training samples at temperature > 0 "
            "(greedy decoding is for evaluation)"
        )
    if cfg.kd_kind == "full" and cfg.kd_mode == "reward":
        raise KDRLError("config field kd_kind='full' needs kd_mode='loss' (reward mode uses the sampled-token k1)")
    if cfg.kd_mode == "reward" and cfg.kd_baseline == "loo" and cfg.kd_mask == "group":  # see kd_reward_returns
        raise KDRLError(
            "config fields kd_baseline='loo', kd_mask='group' (kd_mode='reward'): the leave-one-out baseline would be "
            "biased, because whether the other responses keep their KD returns depends on whether this response is "
            "correct, so the baseline depends on this response. Pass kd_baseline='none', or kd_mask 'none' or "
            "'response'"
        )
    if cfg.kd_kind == "full" and max(cfg.beta, cfg.beta_min or 0.0) == 0 and not cfg.sft:
        raise KDRLError("config field kd_kind='full' with beta=0: there is no KD term to compute (use k2, or beta > 0)")
    conflicts = method_conflicts(cfg)
    if conflicts:
        raise KDRLError(
            "config field " + "; ".join(conflicts) + ". Pick the method that matches, or leave the field at the "
            f"preset's value (from Python: KDRLConfig.from_method({cfg.method!r}, ...))"
        )


def method_conflicts(cfg: KDRLConfig) -> list[str]:
    """The fields whose value contradicts cfg.method, each as "beta=0.01 contradicts method='grpo', ...", or []."""
    method = cfg.method
    preset = KDRLConfig(**METHODS[method])
    out = []
    for name in ("sft", "use_reward", *_DEFINING[method]):
        if getattr(cfg, name) != getattr(preset, name):
            value, wanted = getattr(cfg, name), getattr(preset, name)
            out.append(f"{name}={value!r} contradicts method={method!r}, which sets {name}={wanted!r}")
    if (cfg.trrd_alpha is None) != (preset.trrd_alpha is None):
        wanted = preset.trrd_alpha
        out.append(f"trrd_alpha={cfg.trrd_alpha!r} contradicts method={method!r}, which sets trrd_alpha={wanted!r}")
    if method in ("kd", "kdrl", "kdrl-anneal", "kdrl-mask", "kdrl-seq", "kdrl-full") and not cfg.beta > 0:
        out.append(f"beta={cfg.beta!r} contradicts method={method!r}, which needs beta > 0 (beta = 0 is grpo)")
    if method == "kdrl-mask" and cfg.kd_mask == "none":
        out.append(f"kd_mask='none' contradicts method={method!r}, which needs kd_mask 'response' (or 'group')")
    if method == "kdrl-anneal" and (cfg.beta_min is None or cfg.beta_decay_steps < 1):
        out.append(f"beta_min={cfg.beta_min!r}, beta_decay_steps={cfg.beta_decay_steps} contradict "
                   f"method={method!r}, which needs a beta_min and beta_decay_steps >= 1")
    # Knobs that would silently turn the method into another one.
    if method in ("kd", "kdrl", "kdrl-anneal", "kdrl-mask") and cfg.kd_mode == "loss" and cfg.kd_kind == "k1":
        # E_{y~π}[∇ log π(y)] = 0: k1's loss-mode gradient is pure noise (kdrl-seq's reward mode uses k1 soundly)
        out.append(f"kd_kind='k1' contradicts method={method!r}: in the loss, k1 = log π − log π_T has zero "
                   "expected gradient (E[∇ log π] = 0), so the KD term adds only noise; use k2, k3 or full")
    if method == "rlad" and cfg.trrd_alpha == 1.0:
        out.append(f"trrd_alpha=1.0 contradicts method={method!r}: (π/π_old)^1 · (π/π_T)^0 leaves the teacher out "
                   "of the ratio, which is exactly grpo; use trrd_alpha < 1")
    if method in ("sft", "sft-all"):  # the NLL loss never reads β: a --beta would be ignored, not applied
        for name in ("beta", "beta_min"):
            if getattr(cfg, name) != getattr(preset, name):
                out.append(f"{name}={getattr(cfg, name)!r} contradicts method={method!r}, which has no KD term "
                           f"(SFT trains by NLL on the teacher's samples and ignores β); leave {name} unset")
    return out


def field_docs(cls) -> dict[str, str]:
    """The one-line docstring under each dataclass field, read from the source (used for --help)."""
    docs = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body  # the class's statements
    for node, following in itertools.pairwise(body):
        is_docstring = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and is_docstring:
            docs[node.target.id] = following.value.value.strip()
    return docs


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
    """log-softmax over the first vocab_size columns, in float32 (float64 stays float64). (..., ≥V) → (..., V).

    Written as (x − m) − log Σ exp(x − m), not torch.log_softmax: the latter's float32 CPU kernel accumulates its
    sum serially and is off by 2e-5 at V = 151,936, where torch.sum's pairwise sum is off by 1e-6. One (..., V)
    buffer besides the result, which is a fresh tensor (never the caller's logits)."""
    x = logits[..., :vocab_size]  # (..., V)
    row_max = x.amax(dim=-1, keepdim=True).to(torch.promote_types(logits.dtype, torch.float32))  # (..., 1)
    out = x - row_max  # (..., V), float32 (or float64) by type promotion
    return out.sub_(out.exp().sum(dim=-1, keepdim=True).log_())


def _autocast_off(device: torch.device):
    """A context in which autocast does not touch ops on `device` (none where the device has no autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _FullKL(torch.autograd.Function):
    """KL(softmax(s) ‖ softmax(t)) per row, chunked, with the analytic gradient
    ∇_s = p ⊙ (log p − log q − KL).
    Saves only its inputs; each chunk's log-softmaxes are rebuilt in the backward pass and updated in place, so
    at most three (chunk, V) float32 tensors are alive at once.
    Both passes run with autocast off, so every reduction is float32 even inside the bfloat16 autocast of the
    update (where a matmul, e.g. a bmm for Σ_v, would run in bfloat16: errors up to 5e-3 in value and gradient).
    The KL is Σ_v p (log p − log q) / Σ_v p over the float32 p: dividing by the float32 Σ_v p (1 to rounding)
    cancels the rounding that log p shares across the row, and makes Σ_v ∇_s = 0 up to the rounding of its terms."""

    @staticmethod
    def forward(ctx, s, t, vocab_size, chunk_size):  # s, t: (N, ≥vocab_size)
        out = s.new_empty(s.shape[0], dtype=torch.promote_types(s.dtype, torch.float32))
        with _autocast_off(s.device):
            for i in range(0, s.shape[0], chunk_size):
                logp = _vocab_log_softmax(s[i : i + chunk_size], vocab_size)  # (chunk, V) float32
                logq = _vocab_log_softmax(t[i : i + chunk_size], vocab_size)  # (chunk, V)
                diff = torch.sub(logp, logq, out=logq)  # log p − log q, in place
                p = logp.exp_()  # (chunk, V), in place
                out[i : i + chunk_size] = diff.mul_(p).sum(-1).div_(p.sum(-1))  # Σ_v p (log p − log q) / Σ_v p
        ctx.save_for_backward(s, t, out)
        ctx.vocab_size, ctx.chunk_size = vocab_size, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (N,)
        s, t, kl = ctx.saved_tensors
        V, C = ctx.vocab_size, ctx.chunk_size
        grad = torch.zeros_like(s)  # padded columns ≥ vocab_size carry no probability and get no gradient
        with _autocast_off(s.device):
            for i in range(0, s.shape[0], C):
                logp = _vocab_log_softmax(s[i : i + C], V)  # (chunk, V)
                logq = _vocab_log_softmax(t[i : i + C], V)  # (chunk, V)
                g = torch.sub(logp, logq, out=logq).sub_(kl[i : i + C, None])  # log p − log q − KL, in place
                g.mul_(logp.exp_()).mul_(grad_out[i : i + C, None])  # p ⊙ (log p − log q − KL) · grad_out
                grad[i : i + C, :V] = g.to(s.dtype)
        return grad, None, None, None


def full_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    vocab_size: Optional[int] = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Exact per-position KL(π ‖ π_T) = Σ_v p_v (log p_v − log q_v) over the vocabulary. (..., V) → (...).

    Computed in float32 whatever the logits' dtype (bf16 logits included) and under any autocast (the update's bf16
    autocast included), or float64 for float64 logits: value and gradient are within float32 rounding of the
    float64 definition, also at V = 151,936 (relative errors about 2e-7 and 6e-7).

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
        raise ValueError(
            f"full_kl: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ before the vocab dim"
        )
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


def kl_reward_to_go(
    logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Per-token KD return G_t = Σ_{t'≥t} γ^(t'−t) (teacher_logp − logp)_{t'} within each response.
    (B, T) → (B, T).

    The reward −d_t = log π_T − log π is on-policy distillation's per-token reward (used with γ = 0); MiniLLM's
    sequence-level objective is γ = 1. Masked positions add nothing and get G = 0; the result is detached (it is
    a reward, not a loss).
    γ = 1: −Σ_t G_t ∇log π_t is, on-policy, an unbiased gradient of the **sequence-level** reverse KL
           KL(π(y|x) ‖ π_T(y|x)), provided the per-token terms are summed or divided by a constant (the
           "constant" loss_agg). A per-sample length normaliser ("seq-mean") reweights samples by their
           length and biases it; "token-mean" divides by the batch's token count, shared by all samples
           but random, which leaves a ratio-estimator bias that shrinks as the batch grows.
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
    groups contiguous; 0 for G = 1. It depends only on the other samples of the group, which are independent of
    this one, so subtracting it from this response's return leaves the expected policy gradient unchanged while
    removing the part of the return that every response shares (its scale grows with the response length),
    provided the others' returns do not depend on this response (a KD mask may break that: see kd_reward_returns)."""
    if group_size == 1:
        return torch.zeros_like(returns)
    grouped = returns.view(-1, group_size, returns.shape[-1])  # (num_groups, G, T)
    others = grouped.sum(dim=1, keepdim=True) - grouped  # (num_groups, G, T)
    return (others / (group_size - 1)).view_as(returns)


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO's sequence advantage A_i = (R_i − mean_g) / (std_g + eps). (B,) → (B,), groups contiguous.

    std is the sample std (Bessel-corrected, like torch.std, TRL and verl); eps = 1e-6 is added to it, so
    a positive affine map of the rewards changes A by at most a relative eps/std. scale_by_std=False gives
    Dr.GRPO's mean-only advantage. A group whose rewards are all equal, and any group of size 1, gets
    exactly 0: centring [0.1, 0.1, 0.1] leaves float residue that the std division would turn into advantages
    of order 1 without eps (±0.8) and still nonzero with it (about 0.007 for G = 8 in float32).
    """
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"grpo_advantages: rewards {tuple(rewards.shape)} is not a flat batch of groups of {group_size}"
        )
    r = rewards.view(-1, group_size)  # (num_groups, G)
    # Rewards above ~1e154 (float64) or ~1e19 (float32) would overflow the variance, and tiny ones underflow it.
    # Each group is first divided by the power of two 2^k with 2^k <= max |r| < 2^(k+1): exact in floating point,
    # so the result is bit for bit the unscaled formula wherever that one is finite, and finite for any reward.
    # (ldexp, not division: torch divides a scalar by a tensor through its reciprocal, which overflows for 2^-1032.)
    _, exponent = torch.frexp(r.abs().amax(dim=1, keepdim=True))  # (num_groups, 1): max |r| = m·2^e, m in [0.5, 1)
    r = torch.ldexp(r, 1 - exponent)  # (num_groups, G), max |r| in [1, 2)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        centred = centred / (r.std(dim=1, keepdim=True) + torch.ldexp(torch.full_like(r[:, :1], eps), 1 - exponent))
    else:
        # Dr.GRPO: back in reward units (overflows only if r − mean does)
        centred = torch.ldexp(centred, exponent - 1)
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(constant, 0.0, centred).view(-1)


def beta_schedule(step: int, beta: float, beta_min: Optional[float] = None, decay_steps: int = 0) -> float:
    """KDRL-Annealing: β linear from `beta` at step 0 to `beta_min` at `decay_steps`, then held.
    Constant when beta_min is None or decay_steps is 0. Paper: 5e-3 → 1e-3."""
    if beta_min is None or decay_steps <= 0:
        return beta
    return beta + (beta_min - beta) * min(step / decay_steps, 1.0)


def _aggregate(
    x: torch.Tensor, mask: torch.Tensor, loss_agg: str, num_tokens: float, num_seqs: int, max_new_tokens: int
) -> torch.Tensor:
    """Sum of x (B, T) over response tokens, normalised by the *full batch's* count (so minibatch grads add up).
    → a scalar."""
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


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_eps_low: float, clip_eps_high: float
) -> torch.Tensor:
    """GRPO's (PPO's) clipped surrogate per token, min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A): the objective
    J_GRPO maximises, token by token (KDRL keeps it as is; RLAD changes only ρ). (B, T), (B, T) → (B, T)."""
    clipped_ratio = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)  # (B, T)
    return torch.minimum(ratio * advantages, clipped_ratio * advantages)


def trrd_log_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float, clamp: float = 1.0
) -> torch.Tensor:
    """log ρ of RLAD's Trust-Region Ratio Distillation (Zhang et al. 2026, https://arxiv.org/abs/2602.22495):
    ρ_TRRD = (π/π_old)^α · (π/π_T)^(1−α), with log(π/π_T) clamped to [−c, c] (paper: α = 0.5, c = 1).
    (B, T) each → (B, T); old_logp and teacher_logp are constants.

    α = 1 is exactly GRPO's log(π/π_old). The ratio is not 1 even at μ = 1, so the clip is active from the first
    step. The hard clamp passes no gradient outside [−c, c]: there the token's gradient falls to α ∇log π."""
    log_ratio_old = logp - old_logp.detach()  # (B, T)
    log_ratio_teacher = (logp - teacher_logp.detach()).clamp(-clamp, clamp)  # (B, T)
    return alpha * log_ratio_old + (1 - alpha) * log_ratio_teacher


def kd_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """KDRL's per-token KD term (kd_mode="loss"): w_t · k_t, the KL estimate k_t = kl_estimate(kind) of the sampled
    token weighted by w_t = π/π_old (detached). (B, T) each → (B, T). Aggregated and times β, it is the
    β · KL(π ‖ π_T) of J_KDRL (Xu et al. 2025, https://arxiv.org/abs/2506.02208).

    The weight makes a minibatch that π_old sampled give the on-policy expected gradient (w = 1 exactly at μ = 1),
    for k2 the token-level reverse KL's (see kl_estimate). The paper is silent on μ > 1."""
    weight = torch.exp(logp.detach() - old_logp.detach())  # (B, T), π/π_old of the sampled token
    return weight * kl_estimate(logp, teacher_logp, kind)


def kd_reward_returns(
    logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    keep: torch.Tensor,
    gamma: float,
    group_size: int,
    leave_one_out: bool = True,
) -> torch.Tensor:
    """KD as a reward (kd_mode="reward", kdrl-seq): the per-token KD return that, times β, joins the token advantage
    inside the clipped surrogate. (B, T) each, keep (B, T) bool → (B, T), 0 where masked; detached.

    kl_reward_to_go(γ) on the positions `keep` selects (0 elsewhere: the KD mask), minus, with leave_one_out, the
    mean of the other G − 1 responses' returns at the same position (leave_one_out_baseline; groups contiguous and
    whole). The baseline is subtracted from every response, the ones the mask drops included. Its expected gradient
    is 0 (exactly so with loss_agg="constant") when whether a response is kept depends on that response alone
    (kd_mask "none" or "response"): the others' kept returns are then independent of this one. Not under "group":
    whether the others keep their returns depends on whether this response is correct, so the baseline depends on
    it and biases the gradient; validate_config and kdrl_loss refuse that combination. Nor is there a fix that
    applies a baseline to kept responses only: when keeping depends on the response, such a baseline is unbiased
    only if its mean is 0, and then it removes no variance."""
    returns = torch.where(keep, kl_reward_to_go(logp, teacher_logp, mask, gamma), 0.0)  # (B, T)
    if leave_one_out:
        returns = returns - leave_one_out_baseline(returns, group_size)  # (B, T)
    return torch.where(mask.bool(), returns, 0.0)


def kdrl_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    correct: torch.Tensor,
    cfg: KDRLConfig,
    beta: float,
    *,
    exact_kl: Optional[torch.Tensor] = None,
    num_tokens: Optional[float] = None,
    num_seqs: Optional[int] = None,
    token_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict]:
    """The KDRL loss −J_KDRL = −J_GRPO + β · KL(π ‖ π_T), for one (mini)batch. Returns (loss, metrics).

    A composition of the pure functions above, each aggregated over response tokens as cfg.loss_agg says:
      policy term  −clipped_surrogate(ρ, A), with ρ = π/π_old, or RLAD's trrd_log_ratio when cfg.trrd_alpha
                   is set;
      KD term      β · kd_token_loss (cfg.kd_mode="loss"; exact_kl for kd_kind="full"), or β · kd_reward_returns
                   added to A ("reward");
    with the KD term only on the responses cfg.kd_mask keeps (kd_response_mask). With beta = 0 this is exactly the
    GRPO loss; with zero advantages in "loss" mode, exactly β · KD.

    logp, old_logp, teacher_logp, mask: (B, T) over response tokens; advantages: (B,); correct: (B,) bool
    (the KD masks use correctness, not the reward, since a format bonus makes them differ).
    exact_kl: (B, T), needed only for kd_kind="full": the exact KL(π ‖ π_T) over the vocabulary at each position,
    with grad to the student, i.e. full_kl of both models' tempered logits. token_logprobs(..., kl_teacher=...)
    computes it chunk by chunk without ever holding (B, T, V) logits.
    num_tokens / num_seqs: the response-token / response count of the *whole* batch when this is one
    minibatch of it, so that accumulated gradients equal the full-batch gradient (default: this batch's).
    cfg.loss_agg: "token-mean" divides by num_tokens; "seq-mean" averages each response over its tokens,
    then divides by num_seqs; "constant" (Dr.GRPO) divides by max_new_tokens × num_seqs.
    token_weight: (B, T) or (B, 1), detached, multiplies every per-token term, policy and KD alike (default 1).
    Use it when the rollouts came from another sampler q than the π_old you score them with (vLLM): with
    token_weight = π_old/q the expected gradient is the one sampling from π_old would give, for both terms.
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
    weight = torch.ones_like(logp) if token_weight is None else torch.where(mask, token_weight.detach(), 0.0)  # (B, T)
    kd_keep = kd_response_mask(correct, cfg.kd_mask, cfg.group_size)[:, None] & mask  # (B, T)

    # Policy term: GRPO's clipped surrogate, with GRPO's ratio π/π_old or TRRD's teacher-anchored one.
    if cfg.trrd_alpha is None:
        log_ratio = logp - old_logp  # (B, T)
    else:
        log_ratio = trrd_log_ratio(logp, old_logp, teacher_logp, cfg.trrd_alpha, cfg.trrd_clamp)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.detach()[:, None].to(logp.dtype).expand_as(logp)  # (B, T): each response's A on its tokens
    if cfg.kd_mode == "reward":  # KD as a reward: β × the KD return joins the advantage
        leave_one_out = cfg.kd_baseline == "loo"
        if leave_one_out and cfg.kd_mask == "group":  # validate_config refuses it too; this loss is copied without it
            raise ValueError("kdrl_loss: kd_baseline='loo' with kd_mask='group' is biased (see kd_reward_returns)")
        kd_returns = kd_reward_returns(logp, teacher_logp, mask, kd_keep, cfg.kd_gamma, cfg.group_size, leave_one_out)
        adv = adv + beta * kd_returns  # (B, T)
    surrogate = clipped_surrogate(ratio, adv, cfg.clip_eps_low, cfg.clip_eps_high)  # (B, T)
    pg_loss = _aggregate(weight * -surrogate, mask, cfg.loss_agg, **counts)  # scalar

    # KD term, in loss mode. (In reward mode it is only a metric: the k1 estimate, whose negative is the KD reward.)
    kind = cfg.kd_kind if cfg.kd_mode == "loss" else "k1"
    if kind == "full":  # a sum over the vocabulary: no π/π_old weight needed (the caller computed it, see exact_kl)
        if exact_kl is None:
            raise ValueError("kdrl_loss: kd_kind='full' needs exact_kl, the per-token KL over the vocabulary (full_kl)")
        kd_per_token = torch.where(mask, exact_kl, 0.0)  # (B, T)
    else:
        kd_per_token = kd_token_loss(logp, old_logp, teacher_logp, kind)  # (B, T)
    kd_loss = _aggregate(weight * torch.where(kd_keep, kd_per_token, 0.0), mask, cfg.loss_agg, **counts)  # scalar
    loss = pg_loss + beta * kd_loss if cfg.kd_mode == "loss" else pg_loss  # scalar

    with torch.no_grad():
        below = (ratio < 1 - cfg.clip_eps_low) & (adv < 0)  # (B, T): clipped tokens, whose gradient is 0
        above = (ratio > 1 + cfg.clip_eps_high) & (adv > 0)  # (B, T)
        metrics = dict(
            pg_loss=pg_loss.item(),
            kd_loss=kd_loss.item(),
            kl_k1=_masked_mean(kl_estimate(logp, teacher_logp, "k1"), mask),
            kl_k3=_masked_mean(kl_estimate(logp, teacher_logp, "k3"), mask),
            entropy=-_masked_mean(logp, mask),
            clip_frac=_masked_mean((below | above).to(logp.dtype), mask),
            ratio=_masked_mean(ratio, mask),
            kd_frac=kd_keep.sum().item() / max(mask.sum().item(), 1) if beta != 0 else 0.0,  # β = 0: no token gets KD
        )
    return loss, metrics


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x (B, T) over the positions mask (B, T) keeps, as a Python float (0 if none)."""
    return (torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)).item()


def sft_loss(
    logp: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, num_tokens: float
) -> tuple[torch.Tensor, dict]:
    """The SFT baseline: NLL of the kept responses (teacher samples that were correct), token mean.
    logp, mask: (B, T); keep: (B,) bool; num_tokens: kept tokens in the whole batch."""
    kept_tokens = mask.bool() & keep.bool()[:, None]  # (B, T)
    loss = -torch.where(kept_tokens, logp, 0.0).sum() / max(num_tokens, 1)
    return loss, dict(sft_loss=loss.item())


# -----------------------------------------------------------------------------
# Models: sampling and log-probs. The two hot paths are here: sampling (the bulk of every step) and the
# no-grad teacher forward (KD's extra cost).


@dataclass
class Rollouts:
    """G sampled responses per prompt, prompt-major (the G responses of a prompt are contiguous)."""

    input_ids: torch.Tensor  # (B, P+T) left-padded prompt, then the response, pad after its first end token
    attention_mask: torch.Tensor  # (B, P+T) 1 on prompt tokens and on response tokens up to the first end token
    response_mask: torch.Tensor  # (B, T) bool, response tokens up to and *including* the first end token
    logprobs: torch.Tensor  # (B, T) float32 log π(y_t | y_<t) at the sampling temperature (1 if greedy), 0 where
    # masked: a by-product of sampling, for diagnostics; the loss never reads it (μ > 1 rescores: teacher_pass)
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


def _scoring_temperature(temperature: float) -> float:
    """The temperature log-probs are taken at: the sampling one, or 1 for greedy decoding (τ = 0), which has no
    distribution of its own; its tokens are then reported under the model's plain softmax."""
    return temperature or 1.0


def _next_token(logits: torch.Tensor, temperature: float, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (or argmax at τ = 0) from logits (B, ≥V), padded columns ≥ vocab_size excluded.
    Returns token (B,) and its log-prob (B,) float32 under softmax(logits / τ) (τ = 1 when greedy)."""
    scaled = logits[:, :vocab_size].float() / _scoring_temperature(temperature)  # (B, V)
    logp = torch.log_softmax(scaled, dim=-1)  # (B, V)
    if temperature == 0:
        token = logp.argmax(-1)
    else:  # exponential race: argmax(log p − log E), E ~ Exp(1), is an exact sample, and never raises on NaN
        token = (logp - torch.empty_like(logp).exponential_().log()).argmax(-1)
    return token, logp.gather(1, token[:, None]).squeeze(1)


def _cache_argument(model) -> str:
    """The forward() argument that takes the KV cache: "cache" from transformers 5.2x (where "past_key_values" is
    deprecated, to be removed in 5.40), "past_key_values" before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    """The KV cache a forward() returned, under either name (see _cache_argument)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _drop_finished(cache, alive: torch.Tensor) -> torch.Tensor:
    """Shrink the KV cache to the rows still alive (alive: (rows,) bool); returns their indices.
    Called once a tenth of the decoding batch has finished, so the copies stay rare."""
    if not hasattr(cache, "reorder_cache"):  # a cache we cannot shrink: keep decoding every row
        return torch.arange(len(alive), device=alive.device)
    keep = alive.nonzero().squeeze(1)
    cache.reorder_cache(keep)  # index_select on every layer's keys and values (the beam-search hook)
    return keep


@torch.no_grad()
def sample_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    *,
    vocab_size: Optional[int] = None,
    end_ids: Optional[list[int]] = None,
) -> Rollouts:
    """Sample group_size responses to each prompt with a KV cache; temperature 0 is greedy.
    N prompts in, B = N · group_size responses out, each group contiguous; T ≤ max_new_tokens is the longest one.

    A response ends at its first token in end_ids (default end_token_ids(tokenizer, model)), which it keeps.

    The reported log-probs are of softmax(logits / τ), τ the temperature: the distribution actually sampled, so
    that "on-policy" claims hold at any τ (score the teacher at the same τ). Logit columns ≥ vocab_size (default
    len(tokenizer)) are excluded: checkpoints pad their vocabularies, and padding must carry no probability.
    Runs under no_grad (not inference_mode), so the ids can enter a graph that needs backward.
    Finished rows are dropped from the decoding batch as they accumulate (see _drop_finished): a decode
    step costs in proportion to the rows it carries, and most responses end long before the longest.
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


# Config attributes of models whose logits are post-processed after the output head (soft-capping,
# scaling). The chunked path applies the head alone, so such models take the full-logits fallback.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")


def _chunk_logprobs(
    head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, vocab_size: int
) -> torch.Tensor:
    """log softmax(head(hidden) / τ)[target] for rows of hidden (N, H) → (N,) float32, via logsumexp."""
    logits = head(hidden)[:, :vocab_size].float() / temperature  # (N, V): the only (·, V) tensor alive
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)


def _chunk_logprobs_kl(head, hidden, targets, temperature, vocab_size, teacher_head, teacher_hidden):
    """_chunk_logprobs, and the exact KL(π ‖ π_T) per row from both models' rebuilt logits. → (N,), (N,) float32.
    teacher_hidden: (N, H_T), the teacher's final hidden states at the same positions; no gradient reaches it."""
    logits = head(hidden)[:, :vocab_size].float() / temperature  # (N, V)
    logp = logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)  # (N,)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)[:, :vocab_size].float() / temperature  # (N, V)
    return logp, full_kl(logits, teacher_logits, vocab_size, chunk_size=max(len(logits), 1))


def head_logprobs(
    head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    vocab_size: int,
    chunk_size: int = 256,
    *,
    checkpoint: bool = True,
    teacher: Optional[tuple] = None,
):
    """log softmax(head(hidden) / τ)[target] over the first vocab_size columns. (N, H), (N,) → (N,) float32.

    The output head runs on chunk_size rows at a time, so the only (·, V) tensors alive are one chunk's logits.
    With a gradient and checkpoint=True each chunk runs under activation checkpointing: its logits are
    recomputed in the backward pass instead of saved, so memory stays O(chunk_size · V) whatever N is.
    head is any callable (an nn.Linear, or nn.Identity when hidden already holds logits).
    teacher=(teacher_head, teacher_hidden (N, H_T)): also return the exact KL(π ‖ π_T) of each row over the
    vocabulary, (N,) with grad to hidden and head: each chunk rebuilds both models' logits at temperature τ,
    feeds them to full_kl and frees them. Returns (logp, kl) then."""
    use_checkpoint = checkpoint and torch.is_grad_enabled() and hidden.requires_grad
    logps, kls = [], []
    for i in range(0, hidden.shape[0], chunk_size):
        chunk = slice(i, i + chunk_size)
        chunk_fn, args = _chunk_logprobs, (head, hidden[chunk], targets[chunk], temperature, vocab_size)
        if teacher is not None:
            chunk_fn, args = _chunk_logprobs_kl, (*args, teacher[0], teacher[1][chunk])
        if use_checkpoint:
            out = torch.utils.checkpoint.checkpoint(chunk_fn, *args, use_reentrant=False)
        else:
            out = chunk_fn(*args)
        logps.append(out[0] if teacher is not None else out)  # (chunk,)
        if teacher is not None:
            kls.append(out[1])
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logp = torch.cat(logps) if logps else empty  # (N,)
    if teacher is not None:
        return logp, torch.cat(kls) if kls else empty
    return logp


def _length_buckets(lengths: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Row indices sorted by response length, split into n buckets. Each bucket is run trimmed to its own
    longest response, so short responses stop paying for the padding behind the longest one (exact:
    attention is causal, so the positions cut away cannot change the ones kept)."""
    return list(lengths.argsort(descending=True, stable=True).chunk(n))


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


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: int = 256,
    length_buckets: int = 4,
    return_hidden: bool = False,
    kl_teacher: Optional[tuple] = None,
):
    """Float32 log π(y_t | y_<t) of the response tokens at temperature τ (0 where response_mask is 0).

    input_ids, attention_mask: (B, P+T); response_mask: (B, T), the last T columns. Returns (B, T).
    Rows run in length_buckets forward passes of similar response length (see _length_buckets). Only the
    response positions that the mask keeps go through the output head, chunk_size at a time, with the
    columns ≥ vocab_size dropped (head_logprobs). Memory beyond the model's own activations: O(chunk_size · V)
    float32. Without grad that is all; with grad each chunk runs under activation checkpointing, so its
    logits are recomputed in the backward pass instead of saved, and no (B, T, V) tensor is ever alive.
    Models whose logits are post-processed after the head (Gemma-2 soft-capping, Cohere's logit scale; see
    _LOGIT_POSTPROCESSING), or that expose no output head, fall back to the full logits (B, T, V) in the
    model dtype, still gathered chunk by chunk in float32.

    For kd_kind="full", with nothing of size V kept between the teacher's pass and the student's:
    return_hidden=True (the teacher, no grad): also return its final hidden states at the response positions,
      (B, T, H), zero where masked. With the model's output head that is all it takes to rebuild its logits.
    kl_teacher=(teacher_head, teacher_hidden (B, T, H_T)) (the student, with grad): also return the exact
      KL(π ‖ π_T) over the vocabulary at each response position, (B, T), 0 where masked, from both models'
      logits rebuilt chunk by chunk (see head_logprobs).
    Both need the plain head path and raise KDRLError for a model that would fall back.
    """
    B, T = response_mask.shape
    P = input_ids.shape[1] - T  # prompt length (left-padded)
    V = vocab_size or model.config.vocab_size
    mask = response_mask.bool()  # (B, T)
    lengths = mask.sum(1)  # (B,)
    full_logits = _logits_need_full_path(model) is not None
    if return_hidden or kl_teacher is not None:
        check_logits_rebuildable(model)
    # The output head's inputs at the kept positions, n of them in all: the final hidden states (n, H), or, on the
    # full-logits path, the logits themselves (n, V), sent through an identity head.
    head_inputs, targets, flat_index = [], [], []
    for idx in _length_buckets(lengths, length_buckets):  # idx: (b,) the rows of one bucket
        longest = int(lengths[idx].max()) if len(idx) else 0  # this bucket's longest response
        if longest == 0:
            continue
        ids = input_ids[idx, : P + longest]  # (b, P + longest)
        attn = attention_mask[idx, : P + longest]  # (b, P + longest)
        kept = mask[idx, :longest]  # (b, longest)
        # use_cache=False: a scoring pass has no KV cache to build
        inputs = dict(input_ids=ids, attention_mask=attn, position_ids=_positions(attn), use_cache=False)
        if full_logits:
            logits = model(**inputs).logits[:, P - 1 : -1]  # (b, longest, V), each predicting the next token
            head_inputs.append(logits[kept])  # (n_b, V)
        else:
            hidden = model.base_model(**inputs).last_hidden_state[:, P - 1 : -1]  # (b, longest, H)
            head_inputs.append(hidden[kept])  # (n_b, H)
        targets.append(ids[:, P:][kept])  # (n_b,)
        flat_index.append((idx[:, None] * T + torch.arange(longest, device=idx.device))[kept])  # (n_b,) into B·T
    device = input_ids.device
    logp = torch.zeros(B * T, dtype=torch.float32, device=device)  # (B·T,)
    kl = torch.zeros(B * T, dtype=torch.float32, device=device) if kl_teacher is not None else None  # (B·T,)
    states = None  # (B·T, H) for return_hidden
    if head_inputs:
        head_inputs = torch.cat(head_inputs)  # (n, H) or (n, V)
        targets = torch.cat(targets)  # (n,)
        flat_index = torch.cat(flat_index)  # (n,)
        teacher = None
        if kl_teacher is not None:
            teacher_head, teacher_hidden = kl_teacher
            teacher = (teacher_head, teacher_hidden.reshape(B * T, -1)[flat_index])  # (n, H_T)
        head = torch.nn.Identity() if full_logits else model.get_output_embeddings()
        out = head_logprobs(head, head_inputs, targets, _scoring_temperature(temperature), V, chunk_size,
                            checkpoint=not full_logits, teacher=teacher)  # (n,), or ((n,), (n,)) with the teacher
        logp = logp.index_put((flat_index,), out[0] if teacher else out)  # (B·T,)
        if teacher:
            kl = kl.index_put((flat_index,), out[1])  # (B·T,)
        if return_hidden:
            states = head_inputs.new_zeros(B * T, head_inputs.shape[-1])  # (B·T, H)
            states.index_put_((flat_index,), head_inputs)
    if return_hidden:
        if states is None:  # no response token at all
            states = torch.zeros(B * T, model.config.hidden_size, device=device)
        return logp.view(B, T), states.view(B, T, -1)  # (B, T), (B, T, H)
    if kl_teacher is not None:
        return logp.view(B, T), kl.view(B, T)  # (B, T), (B, T)
    return logp.view(B, T)


# -----------------------------------------------------------------------------
# Rewards: fn(prompt, completion, example) -> float, 1.0 meaning correct.

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?$")


def extract_answer(text: str) -> Optional[str]:
    """The final answer: the *last* \\boxed{...} (nested braces allowed), else the last '#### x', else the
    last 'Answer: x'. None if there is none."""
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
    """Numerically when both parse as numbers, else as whitespace- and case-normalised strings."""
    pred_number, gold_number = _as_number(pred), _as_number(str(gold))
    if pred_number is not None and gold_number is not None:
        return pred_number == gold_number
    return _normalise_answer(pred) == _normalise_answer(gold)


def _normalise_answer(answer) -> str:
    """Whitespace removed, '$' and '.' stripped from the ends, lower case: '$ X . ' and 'x' match."""
    return re.sub(r"\s+", "", str(answer)).strip("$.").lower()


def math_reward(prompt: str, completion: str, example: dict) -> float:
    """1.0 if the completion's final answer (extract_answer) equals example["answer"], else 0.0."""
    pred = extract_answer(completion)
    return float(pred is not None and answers_match(pred, example["answer"]))


def format_ok(completion: str) -> bool:
    """The format check: the completion states a final answer that extract_answer can find."""
    return extract_answer(completion) is not None


def score_completions(
    reward_fn: Callable, examples: list[dict], completions: list[str], group_size: int, format_bonus: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards and correctness for prompt-major completions. Returns rewards (B,) float32, correct (B,) bool.
    correct comes from reward_fn alone (score ≥ 1); the format bonus is added afterwards and never counts."""
    scores = []
    for i, completion in enumerate(completions):
        ex = examples[i // group_size]
        try:
            scores.append(float(reward_fn(ex["prompt"], completion, ex)))
        except Exception as e:
            where = f"line {ex['_line']} " if "_line" in ex else ""
            raise KDRLError(
                f"reward function failed on example {where}(prompt {ex['prompt'][:60]!r}): {type(e).__name__}: {e}"
            ) from e
    scores = torch.tensor(scores, dtype=torch.float32)
    bonus = torch.tensor([format_bonus * format_ok(c) for c in completions], dtype=torch.float32)
    return scores + bonus, scores >= 1.0


# -----------------------------------------------------------------------------
# The training loop: sample → reward → advantage → teacher log-probs → loss → step → log.


def train(
    cfg: KDRLConfig,
    student,
    teacher,
    tokenizer,
    train_set: list[dict],
    reward_fn: Callable,
    eval_set: Optional[list[dict]] = None,
) -> dict:
    """Post-train `student` with cfg.method's loss. Returns a summary: final eval, timings, tokens/s.

    Writes <out>/config.json, <out>/metrics.jsonl (one line per step; eval lines carry "eval": true) and
    <out>/checkpoint (every save_every steps and at the end). Each step, with β = beta_schedule(step):
      1. sample G responses per prompt (SFT: from the teacher; its rows' reward/acc/length are then the teacher's)
      2. rewards and correctness   3. group advantages   4. teacher (and, for μ > 1, old-policy) log-probs, no grad
      5. μ epochs, each one optimizer step with gradients accumulated over minibatches   6. log
    Every forward pass, evaluation's included, runs under bfloat16 autocast when cfg.dtype resolves to bfloat16
    ("auto" on CUDA, or "bfloat16"), over float32 master weights; otherwise in float32.
    """
    from tqdm.auto import tqdm

    out_dir, optimizer, start = _start_run(cfg, student, teacher, train_set)  # validate, seed, resume
    device = next(student.parameters()).device
    G, V = cfg.group_size, len(tokenizer)  # V: the tokenizer's columns (checkpoints pad their logits beyond it)
    end_ids = end_token_ids(tokenizer, student, teacher)
    timer, tokens_seen = Timer(), 0
    steps_left = range(start, cfg.steps)
    bar = tqdm(steps_left, initial=start, total=cfg.steps, desc=cfg.method, disable=not cfg.progress,
               dynamic_ncols=True)
    for step in bar:
        batch = [train_set[i] for i in batch_for_step(len(train_set), step, cfg.prompts_per_step, cfg.seed)]
        beta = beta_schedule(step, cfg.beta, cfg.beta_min, cfg.beta_decay_steps)
        timer.start_step()
        with _name_step_in_errors(step, out_dir / "checkpoint"):
            with timer("sampling"), _autocast(cfg.dtype, device):  # 1. G responses per prompt (SFT: the teacher's)
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
            with timer("teacher"), _autocast(cfg.dtype, device):  # 4. teacher (and old-policy) log-probs, no grad
                scores = teacher_pass(cfg, student, teacher, rollouts, V)
            trained_on = _sft_samples(cfg, correct, rollouts) if cfg.sft else correct  # (B,) bool
            with timer("update"), _autocast(cfg.dtype, device):  # 5. μ epochs, each one optimizer step
                grad_norm, parts = policy_update(cfg, student, teacher, optimizer, rollouts, advantages, trained_on,
                                                 beta, scores, V, step)
        row = dict(step=step, beta=beta, grad_norm=grad_norm, **_loss_metrics(cfg, parts))  # 6. log
        row.update(_batch_metrics(cfg, rollouts, rewards, correct, advantages, trained_on), **timer.step_times())
        tokens_seen += row["tokens"]
        _log_step(cfg, bar, out_dir / "metrics.jsonl", row)
        if _due(cfg.eval_every, step, cfg.steps) and eval_set:
            with timer("eval"):
                examples = eval_set[: cfg.eval_limit]
                eval_metrics = _evaluate_aside(student, tokenizer, examples, reward_fn, cfg, end_ids, step)
            _append_row(out_dir / "metrics.jsonl", dict(step=step, eval=True, **eval_metrics))
        if _due(cfg.save_every, step, cfg.steps):
            save_checkpoint(out_dir, step + 1, student, tokenizer, optimizer, cfg)
    bar.close()
    return _finish_run(cfg, out_dir, student, tokenizer, optimizer, start, eval_set, reward_fn, end_ids, timer,
                       tokens_seen)


@torch.no_grad()
def teacher_pass(cfg: KDRLConfig, student, teacher, rollouts: Rollouts, vocab_size: int) -> dict:
    """Step 4, no grad: everything the update needs besides the student, in a size that does not grow with V.
    teacher_logp (B, T); for kd_kind="full" teacher_hidden (B, T, H_T), the teacher's final hidden states, from
    which the update rebuilds its logits chunk by chunk (the teacher runs once per step); for μ > 1, old_logp."""
    scores = dict(teacher_logp=torch.zeros_like(rollouts.logprobs), teacher_hidden=None, old_logp=None)
    if _full_kd(cfg):
        teacher_logp, teacher_hidden = _logprobs(cfg, teacher, rollouts, vocab_size, return_hidden=True)
        scores.update(teacher_logp=teacher_logp, teacher_hidden=teacher_hidden)  # (B, T), (B, T, H_T)
    elif _needs_teacher(cfg):
        scores["teacher_logp"] = _logprobs(cfg, teacher, rollouts, vocab_size)  # (B, T)
    if cfg.mu > 1 and not cfg.sft:  # SFT's NLL needs no old policy
        scores["old_logp"] = _logprobs(cfg, student, rollouts, vocab_size)  # (B, T)
    return scores


def policy_update(
    cfg: KDRLConfig,
    student,
    teacher,
    optimizer,
    rollouts: Rollouts,
    advantages: torch.Tensor,
    correct: torch.Tensor,
    beta: float,
    scores: dict,
    vocab_size: int,
    step: int,
) -> tuple[float, list]:
    """Step 5: μ epochs over the batch, each one optimizer step, gradients accumulated over minibatches of whole
    groups with the full batch's normaliser. Returns the last epoch's grad norm and its (tokens, metrics) parts.
    For SFT, `correct` is the mask of teacher samples to train on.
    The student runs in train mode only when it checkpoints activations (Hugging Face needs it) and is back in
    eval mode afterwards; its dropout must already be zeroed (train() does it, see _disable_dropout), so that
    both modes score the policy that sampled."""
    checkpointing = any(getattr(module, "gradient_checkpointing", False) is True for module in student.modules())
    student.train(checkpointing)  # Hugging Face checkpoints activations only in train mode
    mask = rollouts.response_mask  # (B, T)
    batch_size = mask.shape[0]
    G = cfg.group_size
    minibatch_size = max(G, cfg.minibatch_size // G * G)  # whole groups (the "group" KD mask needs them)
    num_tokens = (mask & correct[:, None]).sum().item() if cfg.sft else mask.sum().item()
    for _ in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        parts = []
        for first in range(0, batch_size, minibatch_size):
            mb = slice(first, first + minibatch_size)  # mb: the rows of one minibatch
            minibatch = rollouts[mb]
            if cfg.sft:  # the SFT baseline: NLL on the kept teacher samples (`correct` holds the keep mask)
                logp = _logprobs(cfg, student, minibatch, vocab_size)  # (b, T)
                loss, metrics = sft_loss(logp, mask[mb], correct[mb], num_tokens)
            else:
                exact_kl = None
                if scores["teacher_hidden"] is not None:  # kd_kind="full": KL over the vocabulary, chunk by chunk
                    teacher_side = (teacher.get_output_embeddings(), scores["teacher_hidden"][mb])
                    logp, exact_kl = _logprobs(cfg, student, minibatch, vocab_size, kl_teacher=teacher_side)
                else:
                    logp = _logprobs(cfg, student, minibatch, vocab_size)  # (b, T)
                old_logp = logp.detach() if scores["old_logp"] is None else scores["old_logp"][mb]  # μ = 1: ρ = 1
                loss, metrics = kdrl_loss(
                    logp, old_logp, scores["teacher_logp"][mb], advantages[mb], mask[mb], correct[mb], cfg, beta,
                    exact_kl=exact_kl, num_tokens=num_tokens, num_seqs=batch_size,
                )
            if not torch.isfinite(loss):
                bad = {name: value for name, value in metrics.items() if not math.isfinite(value)}
                found = bad or "none"
                raise KDRLError(f"non-finite loss at step {step} (loss={loss.item()}, non-finite metrics: {found})")
            loss.backward()
            parts.append((mask[mb].sum().item(), metrics))
        max_norm = cfg.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm).item()
        if not math.isfinite(grad_norm):
            raise KDRLError(f"non-finite gradient at step {step} (grad_norm={grad_norm})")
        if cfg.sft and num_tokens == 0:  # SFT kept no sample: no step (AdamW's momentum would still move the weights)
            continue
        optimizer.step()
    student.eval()
    return grad_norm, parts


# --- the plumbing train() calls: setup and resume, logging, evaluation, checkpoints, timing ---


def _start_run(cfg: KDRLConfig, student, teacher, train_set: list[dict]) -> tuple[Path, torch.optim.Optimizer, int]:
    """Validate, seed, prepare both models, build AdamW and, with cfg.resume, restore the checkpoint; write
    config.json and start metrics.jsonl (on resume, keeping the rows of the steps already done).
    Returns (output directory, optimizer, first step)."""
    validate_config(cfg)
    if not train_set:
        raise KDRLError("the training set is empty")
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    student.eval()  # the update must score the policy that sampled
    teacher.eval()
    _disable_dropout(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = load_checkpoint(out_dir / "checkpoint", student, optimizer, cfg) if cfg.resume else 0
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    metrics_path = out_dir / "metrics.jsonl"
    kept = []
    if cfg.resume and metrics_path.exists():
        kept = [line for line in metrics_path.read_text().splitlines() if _keep_on_resume(json.loads(line), start)]
    metrics_path.write_text("".join(line + "\n" for line in kept))
    if _full_kd(cfg):  # before any step, not at the first teacher pass
        for model in (student, teacher):
            check_logits_rebuildable(model)
    return out_dir, optimizer, start


def _keep_on_resume(row: dict, start: int) -> bool:
    """metrics.jsonl rows a run resumed at `start` keeps: the steps before it, not the shorter run's final eval."""
    return row["step"] < start and not row.get("final")


def batch_for_step(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Example indices for a step: a fresh seeded permutation each epoch, so the data order is a pure
    function of (seed, step) and a resumed run sees exactly the batches an uninterrupted one would."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        out.append(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))[i].item())
    return out


@contextlib.contextmanager
def _name_step_in_errors(step: int, checkpoint: Path):
    """Re-raise a KDRLError from inside a step (a diverged run) naming the step and the checkpoint kept."""
    try:
        yield
    except KDRLError as e:
        where = "" if "at step" in str(e) else f", at step {step}"
        raise KDRLError(f"{e}{where}; last good checkpoint kept in {checkpoint}") from None


def _sft_samples(cfg: KDRLConfig, correct: torch.Tensor, rollouts: Rollouts) -> torch.Tensor:
    """The teacher samples SFT trains on, (B,) bool: those that ended, and are correct unless sft_keep="all"."""
    keep = correct if cfg.sft_keep == "correct" else torch.ones_like(correct)
    return keep & ~rollouts.truncated


def _loss_metrics(cfg: KDRLConfig, parts: list) -> dict:
    """The last epoch's loss metrics over its minibatches' (tokens, metrics) parts. Each *_loss is already its
    minibatch's share of the batch (full-batch normaliser), so those add up; the other metrics are per-minibatch
    means, weighted by tokens. No KL metrics when no teacher was scored."""
    total = sum(tokens for tokens, _ in parts) or 1
    names = parts[0][1]
    row = {}
    for name in names:
        if name.endswith("_loss"):
            row[name] = sum(metrics[name] for _, metrics in parts)
        else:
            row[name] = sum(tokens * metrics[name] / total for tokens, metrics in parts)
    if not _needs_teacher(cfg):
        for name in ("kl_k1", "kl_k3", "kd_loss"):
            row.pop(name, None)
    return row


def _batch_metrics(cfg: KDRLConfig, rollouts: Rollouts, rewards, correct, advantages, trained_on) -> dict:
    """What the step's batch was: reward, accuracy, length, truncation, tokens; for SFT the fraction of teacher
    samples trained on, otherwise the fraction of groups whose advantages are all 0 (no policy gradient)."""
    row = {}
    if cfg.sft:
        row["sft_kept"] = trained_on.float().mean().item()
    else:
        row["zero_adv_frac"] = (advantages.view(-1, cfg.group_size) == 0).all(dim=1).float().mean().item()
    row.update(
        reward=rewards.mean().item(),
        acc=correct.float().mean().item(),
        length=rollouts.response_mask.sum(1).float().mean().item(),
        truncated=rollouts.truncated.float().mean().item(),
        tokens=rollouts.attention_mask.sum().item(),  # non-pad prompt and response tokens
    )
    return row


def _log_step(cfg: KDRLConfig, bar, metrics_path: Path, row: dict) -> None:
    """One row in metrics.jsonl, the progress bar's numbers, and a `|`-separated line: every step without a
    progress bar, every log_every steps with one."""
    _append_row(metrics_path, row)
    kl = {"kl": f"{row['kl_k1']:.3f}"} if "kl_k1" in row else {}  # no KL when no teacher was scored
    bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['acc']:.2f}", **kl, len=f"{row['length']:.0f}")
    if not cfg.progress:
        print(_step_line(cfg, row), flush=True)
    elif cfg.log_every and (row["step"] + 1) % cfg.log_every == 0:
        bar.write(_step_line(cfg, row))


def _step_line(cfg: KDRLConfig, row: dict) -> str:
    """One step as `step 3/100 | reward 0.412 | acc 0.375 | kl 0.0123 | ... | update 0.30s`, nanochat's style."""
    fields = [f"step {row['step'] + 1}/{cfg.steps}", f"reward {row['reward']:.3f}", f"acc {row['acc']:.3f}"]
    if "kl_k1" in row:
        fields.append(f"kl {row['kl_k1']:.4f}")
    for name in ("pg_loss", "kd_loss", "sft_loss"):
        if name in row:
            fields.append(f"{name} {row[name]:.4f}")
    fields += [f"len {row['length']:.0f}", f"grad {row['grad_norm']:.3f}", f"beta {row['beta']:.2g}"]
    fields += [f"{phase} {row['time_' + phase]:.2f}s" for phase in ("sampling", "teacher", "update")]
    return " | ".join(fields)


def _append_row(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _due(every: int, step: int, steps: int) -> bool:
    """A periodic eval or save after `step`: every N steps, but not after the last (the run's end does that)."""
    return bool(every) and (step + 1) % every == 0 and step + 1 < steps


def _finish_run(cfg: KDRLConfig, out_dir: Path, student, tokenizer, optimizer, start: int, eval_set, reward_fn,
                end_ids, timer: "Timer", tokens_seen: int) -> dict:
    """The final checkpoint and evaluation, then the time breakdown and tokens/s, printed and returned."""
    summary = {}
    if start < cfg.steps:
        save_checkpoint(out_dir, cfg.steps, student, tokenizer, optimizer, cfg)
    if eval_set:
        with timer("eval"):
            examples = eval_set[: cfg.eval_limit]
            summary["eval"] = _evaluate_aside(student, tokenizer, examples, reward_fn, cfg, end_ids, cfg.steps - 1)
        _append_row(out_dir / "metrics.jsonl", dict(step=cfg.steps - 1, eval=True, final=True, **summary["eval"]))
    busy = sum(timer.get(phase, 0.0) for phase in ("sampling", "teacher", "update"))
    times = {phase: round(seconds, 3) for phase, seconds in timer.items()}
    summary.update(time=times, tokens_per_s=tokens_seen / busy if busy else 0.0)
    if start < cfg.steps:
        phases = " | ".join(f"{name} {timer.get(name, 0):.1f}s" for name in ("sampling", "teacher", "update", "eval"))
        rate = f"{summary['tokens_per_s']:.0f} tokens/s (non-pad prompt+response tokens per busy second)"
        print(f"time: {phases} | {rate}")
    return summary


class Timer(dict):
    """Accumulated wall time per phase: `with timer("sampling"): ...` (synchronises CUDA for honest figures).
    start_step() and step_times() give one step's share of each training phase."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        _sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0

    def __init__(self):
        super().__init__()
        self._at_step_start = {}  # the totals when the current step began

    def start_step(self) -> None:
        self._at_step_start = dict(self)

    def step_times(self) -> dict:
        """{"time_sampling": s, "time_teacher": s, "time_update": s} since start_step() (0 for a phase not run)."""
        phases = ("sampling", "teacher", "update")
        return {f"time_{name}": self.get(name, 0.0) - self._at_step_start.get(name, 0.0) for name in phases}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    examples: list[dict],
    reward_fn: Callable,
    cfg: KDRLConfig,
    batch_size: int = 64,
    end_ids: Optional[list[int]] = None,
) -> dict:
    """Greedy accuracy, sampled accuracy (one sample at cfg.temperature), mean response length, truncated fraction.
    end_ids: the ids that end a response (default end_token_ids(tokenizer, model))."""
    results = dict(greedy=[], sampled=[], length=[], truncated=[])
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [ex["prompt"] for ex in chunk]
        for name, temperature in (("greedy", 0.0), ("sampled", cfg.temperature)):
            rollouts = sample_rollouts(model, tokenizer, prompts, 1, cfg.max_new_tokens, temperature, end_ids=end_ids)
            _, correct = score_completions(reward_fn, chunk, decode(tokenizer, rollouts), 1)
            results[name] += correct.tolist()
            if name == "greedy":
                results["length"] += rollouts.response_mask.sum(1).tolist()
                results["truncated"] += rollouts.truncated.tolist()
    return dict(
        acc_greedy=_mean(results["greedy"]),
        acc_sampled=_mean(results["sampled"]),
        length=_mean(results["length"]),
        truncated=_mean(results["truncated"]),
    )


def _mean(values: list) -> float:
    return sum(map(float, values)) / max(len(values), 1)


def _evaluate_aside(model, tokenizer, examples, reward_fn, cfg: KDRLConfig, end_ids, step: int) -> dict:
    """evaluate() on its own seeded RNG stream (seed, step), restored afterwards: evaluating, or not, never
    changes what training samples next, so a run resumed with another eval_every continues exactly.
    It runs under the same autocast as training's sampling, so the accuracy is that of the policy as it samples."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _autocast(cfg.dtype, device):
        torch.manual_seed(cfg.seed * 100_003 + step + 1)
        return evaluate(model, tokenizer, examples, reward_fn, cfg, end_ids=end_ids)


def decode(tokenizer, rollouts: Rollouts) -> list[str]:
    """Response texts, up to and including the first end token (special tokens dropped)."""
    ids = rollouts.response_ids.masked_fill(~rollouts.response_mask, pad_token_id(tokenizer))  # (B, T)
    return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)


def _rng_state() -> dict:
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> Optional[str]:
    """Restore the RNG states saved by _rng_state, as far as this machine allows; returns what could not be
    restored (None if nothing). The CPU and Python states always are. CUDA: one state per device at save time;
    with fewer visible now, the first ones are restored (a single-GPU run draws on device 0 alone)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    saved = state.get("cuda", [])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, device_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(device_state, index)
    what = f"the checkpoint's CUDA RNG state ({len(saved)} device{'s' if len(saved) != 1 else ''})"
    if visible == 0 and saved:
        return f"{what} was not restored: no CUDA device is visible"
    if visible < len(saved):
        return f"{what} was restored for the first {visible} only: {visible} visible now"
    if device.type == "cuda" and not saved:
        return "the checkpoint holds no CUDA RNG state (written without CUDA): CUDA draws restart from the seed"
    return None


def save_checkpoint(out_dir: Path, step: int, student, tokenizer, optimizer, cfg: KDRLConfig) -> Path:
    """Write <out_dir>/checkpoint atomically: build it in a temporary directory, then rename it into place,
    so an interrupted save never leaves a half-written checkpoint and the last good one survives."""
    final, tmp, old = out_dir / "checkpoint", out_dir / ".checkpoint.tmp", out_dir / ".checkpoint.old"
    if not final.exists() and old.exists():  # a save was interrupted between its renames: put the good one back
        old.rename(final)
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "kdrl_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.save(dict(step=step, optimizer=optimizer.state_dict(), rng=_rng_state()), tmp / "trainer_state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# Fields that may change on --resume: they decide how long, where and how visibly the run goes, or only bound
# memory, never the math of a step. Any other difference (method, β, estimator, G, lr, seed, data...) is refused.
# (device and dtype change the floating-point arithmetic: a resume is bit-exact only on the same ones.)
RESUME_MAY_CHANGE = (
    "steps", "resume", "progress", "log_every", "out", "eval", "eval_every", "eval_limit", "save_every", "device",
    "dtype", "gradient_checkpointing", "minibatch_size", "logprob_chunk",
)


def check_resume_config(saved: dict, cfg: KDRLConfig, path: Path, step: int) -> None:
    """Refuse to resume a checkpoint (config `saved`, at `step`) under a config that changes the run's math."""
    diffs = []
    for f in dataclasses.fields(KDRLConfig):
        if f.name in RESUME_MAY_CHANGE:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name not in saved:  # written by an older kdrl, before this field (and its default) existed
            now = getattr(cfg, f.name)
            diffs.append(f"{f.name} (absent from the checkpoint, which an older kdrl wrote; now {now!r}: {flag})")
        elif saved[f.name] != getattr(cfg, f.name):
            diffs.append(f"{f.name} (checkpoint {saved[f.name]!r}, now {getattr(cfg, f.name)!r}: {flag})")
    if diffs:
        raise KDRLError(
            f"--resume: {path} was trained with a different config: " + "; ".join(diffs)
            + ". These change the run's math: resume with the checkpoint's values or start a new --out"
        )
    if cfg.steps < step:
        raise KDRLError(f"--resume: steps={cfg.steps} is below the checkpoint's step {step} ({path}); it may only grow")


def load_checkpoint(path: Path, student, optimizer, cfg: Optional[KDRLConfig] = None) -> int:
    """Restore the student's weights, the optimizer and the RNG from a checkpoint; returns its step.
    Falls back to the previous one if a save was interrupted between its two renames. With cfg, first refuses
    a config that differs from the checkpoint's in anything but RESUME_MAY_CHANGE. Nothing in the folder is
    unpickled as code: trainer_state.pt loads with weights_only=True, the weights from safetensors.
    A checkpoint resumes on another device (GPU to CPU and back, fewer GPUs): what cannot be restored (part of the
    RNG state) is named in a note on stderr, and such a resume continues the run but not bit for bit."""
    if not (path / "trainer_state.pt").exists() and (path.parent / ".checkpoint.old" / "trainer_state.pt").exists():
        path = path.parent / ".checkpoint.old"
    if not (path / "trainer_state.pt").exists():
        raise KDRLError(f"--resume: no checkpoint at {path} (missing trainer_state.pt)")
    try:
        # to the CPU whatever device wrote it: optimizer.load_state_dict moves its state to the parameters' device
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        saved_cfg = json.loads((path / "kdrl_config.json").read_text())
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise KDRLError(f"--resume: cannot read the checkpoint in {path} ({type(e).__name__}: {e})") from None
    if cfg is not None:
        check_resume_config(saved_cfg, cfg, path, state["step"])
    saved = type(student).from_pretrained(path, dtype=next(student.parameters()).dtype)
    student.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    lost = _set_rng_state(state["rng"], next(student.parameters()).device)
    if lost:
        print(f"note: --resume: {lost}; resuming across devices is not bit-exact", file=sys.stderr)
    return state["step"]


def _disable_dropout(model) -> None:
    """Zero every dropout rate (modules and the float rates attention layers keep), so that train mode, which
    Hugging Face's gradient checkpointing needs, scores exactly the policy that eval mode sampled."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "hidden_dropout", "resid_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def _compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """cfg.dtype → the dtype forward passes run in: "auto" is bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # "auto"


def _autocast(dtype: str, device: torch.device) -> torch.autocast:
    """bfloat16 autocast for a forward pass when cfg.dtype resolves to bfloat16, else a context that does nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_compute_dtype(dtype, device) == torch.bfloat16)


def _logprobs(cfg: KDRLConfig, model, rollouts: Rollouts, vocab_size: int, **kwargs):
    """token_logprobs of the rollouts under model at the sampling temperature (SFT: τ = 1, it is plain NLL)."""
    temperature = 1.0 if cfg.sft else cfg.temperature
    return token_logprobs(model, rollouts.input_ids, rollouts.attention_mask, rollouts.response_mask,
                          temperature=temperature, vocab_size=vocab_size, chunk_size=cfg.logprob_chunk, **kwargs)


def _needs_teacher(cfg: KDRLConfig) -> bool:
    return not cfg.sft and (max(cfg.beta, cfg.beta_min or 0.0) > 0 or cfg.trrd_alpha is not None)


def _full_kd(cfg: KDRLConfig) -> bool:
    return cfg.kd_kind == "full" and cfg.kd_mode == "loss" and _needs_teacher(cfg)


# -----------------------------------------------------------------------------
# Plumbing: data, models, tokenizer checks, CLI.


def load_jsonl(path: str) -> list[dict]:
    """Rows {"prompt": str, "answer": ...}; errors name the file and line. Each row gets "_line"."""
    p = Path(path)
    if not p.is_file():
        raise KDRLError(f"{path}: no such file")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise KDRLError(f"{path}, line {n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
            raise KDRLError(f'{path}, line {n}: expected an object with a string "prompt" and an "answer"')
        rows.append(dict(row, _line=n))
    if not rows:
        raise KDRLError(f"{path}: empty dataset")
    return rows


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """KD compares log-probs token by token, so both models must mean the same thing by every id.
    Raises KDRLError naming the first difference: vocabulary, special-token ids, or chat template."""
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()  # {token: id}
    every_token = set(student_vocab) | set(teacher_vocab)
    for tok in sorted(every_token, key=lambda k: (student_vocab.get(k, teacher_vocab.get(k)), k)):
        student_id, teacher_id = student_vocab.get(tok), teacher_vocab.get(tok)
        if student_id != teacher_id:
            raise KDRLError(f"student and teacher tokenizers differ: token {tok!r} has id {student_id} in the student, "
                            f"{teacher_id} in the teacher")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        student_id, teacher_id = getattr(student_tok, attr), getattr(teacher_tok, attr)
        if student_id != teacher_id:
            raise KDRLError(f"student and teacher tokenizers differ: {attr} is {student_id} in the student, "
                            f"{teacher_id} in the teacher")
    if getattr(student_tok, "chat_template", None) != getattr(teacher_tok, "chat_template", None):
        raise KDRLError("student and teacher tokenizers differ: chat templates are not identical")


def check_prompt_lengths(tokenizer, model, examples: list[dict], max_new_tokens: int, source: str) -> None:
    """Refuse prompts that cannot fit with max_new_tokens into the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return
    for ex in examples:
        prompt_tokens = encode_prompts(tokenizer, [ex["prompt"]])[0].shape[1]
        if prompt_tokens + max_new_tokens > context:
            raise KDRLError(f"{source}, line {ex.get('_line', '?')}: prompt of {prompt_tokens} tokens + max_new_tokens "
                            f"{max_new_tokens} exceeds the context of {context}")


def resolve_device(name: str) -> torch.device:
    """"auto" is cuda when available, else cpu; "cuda" without CUDA is refused."""
    if name == "cuda" and not torch.cuda.is_available():
        raise KDRLError("--device cuda was requested but CUDA is not available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _check_dir(path: str, role: str) -> None:
    if not Path(path).is_dir():
        raise KDRLError(f"--{role} {path}: no such directory (models load from local paths only)")


def load_model(path: str, device: torch.device, dtype: torch.dtype, role: str):
    from transformers import AutoModelForCausalLM

    _check_dir(path, role)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    except (OSError, ValueError) as e:
        raise KDRLError(f"--{role} {path}: cannot load a causal LM ({e})") from None


def load_tokenizer(path: str, role: str):
    from transformers import AutoTokenizer

    _check_dir(path, role)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise KDRLError(f"--{role} {path}: cannot load a tokenizer ({e})") from None
    if tok.eos_token_id is None:
        raise KDRLError(f"--{role} {path}: the tokenizer has no EOS token, so responses could never end")
    tok.padding_side = "left"
    return tok


def _optional_float(text: str) -> Optional[float]:
    """--beta-min none / --trrd-alpha none set the field back to None (off)."""
    return None if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    """One flag per KDRLConfig field (--kd-kind for kd_kind), help from the field's docstring."""
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs(KDRLConfig)
    types = {"int": int, "float": float, "str": str, "Optional[float]": _optional_float}
    for f in dataclasses.fields(KDRLConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {f.default}; a --method preset may change it)"
        if f.type == "Optional[float]":
            help_text += "; 'none' turns it off"
        if f.name in _CHOICES or f.name == "method":
            kind = dict(type=str, choices=_CHOICES.get(f.name, tuple(METHODS)))
        elif f.type == "bool":
            kind = dict(action=argparse.BooleanOptionalAction)
        else:
            kind = dict(type=types[f.type])
        # SUPPRESS: only the flags given explicitly override the preset
        parser.add_argument(flag, default=argparse.SUPPRESS, help=help_text, **kind)
    return parser


def config_from_args(argv=None) -> KDRLConfig:
    """Defaults ← the --method preset ← explicit flags (see config_from_flags)."""
    return config_from_flags(vars(build_parser().parse_args(argv)))


def config_from_flags(flags: dict) -> KDRLConfig:
    """KDRLConfig from the explicitly given flags {field: value}. A flag that changes one of the preset's own values
    says so on stderr (the flag wins); one that contradicts the method itself is refused by validate_config."""
    args = dict(flags)
    method = args.pop("method", KDRLConfig.method)
    cfg = KDRLConfig.from_method(method, **args)
    if method_conflicts(cfg):  # refused by validate_config: no note saying a flag won
        return cfg
    for name, value in args.items():
        if name in METHODS[method] and METHODS[method][name] != value:
            flag = "--" + name.replace("_", "-")
            print(f"note: {flag} {value} overrides --method {method}'s {name}={METHODS[method][name]}", file=sys.stderr)
    return cfg


def main(argv=None) -> int:
    cfg = config_from_args(argv)
    try:
        validate_config(cfg)
        for name in ("student", "teacher", "train"):
            if not getattr(cfg, name):
                raise KDRLError(f"--{name} is required")
        device = resolve_device(cfg.device)
        train_set = load_jsonl(cfg.train)
        eval_set = load_jsonl(cfg.eval) if cfg.eval else None
        tokenizer = load_tokenizer(cfg.student, "student")
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.teacher, "teacher"))
        student = load_model(cfg.student, device, torch.float32, "student")  # float32 master weights
        teacher = load_model(cfg.teacher, device, _compute_dtype(cfg.dtype, device), "teacher").requires_grad_(False)
        for ex_set, src in ((train_set, cfg.train), (eval_set or [], cfg.eval)):
            check_prompt_lengths(tokenizer, student, ex_set, cfg.max_new_tokens, src)
        if cfg.gradient_checkpointing:  # renamed in transformers 5.2x; the old name still works on older 5.x
            enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
            enable()
        summary = train(cfg, student, teacher, tokenizer, train_set, math_reward, eval_set)
    except KDRLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "eval" in summary:
        print("eval: " + " | ".join(f"{k} {v:.3f}" for k, v in summary["eval"].items()))
    print(f"saved {Path(cfg.out) / 'checkpoint'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
