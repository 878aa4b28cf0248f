"""
train.py: the engine around kdrl.py's method: the loop, config checks, checkpoints and resume, evaluation,
metrics.jsonl and the progress line, loading models, tokenizers and data from local paths, and the CLI.

    python train.py --student PATH --teacher PATH --train data.jsonl --method kdrl --steps 100

The loop is `for step: row = kdrl.train_step(...); log(row); evaluate; save`: the algorithm is in kdrl.py, this is
what a real run needs around it. Every KDRLConfig field is a flag (--kd-kind for kd_kind), its docstring the help.
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
import numbers
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

import kdrl
from kdrl import METHODS, KDRLConfig, KDRLError

# -----------------------------------------------------------------------------
# Config checks: an invalid config never reaches a step, from Python or from the CLI.


_CHOICES = dict(loss_agg=("token-mean", "seq-mean", "constant"), kd_mode=("loss", "reward"),
                kd_kind=("k1", "k2", "k3", "full"), kd_mask=("none", "response", "group"), sft_keep=("correct", "all"),
                kd_baseline=("none", "loo"), device=("auto", "cpu", "cuda"), dtype=("auto", "float32", "bfloat16"))


def validate_config(cfg: KDRLConfig) -> None:
    """Raise KDRLError (a ValueError) naming the first bad field."""
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise KDRLError(f"config field {name}={getattr(cfg, name)!r}: must be one of {choices}")
    if cfg.method not in METHODS:
        raise KDRLError(f"config field method={cfg.method!r}: must be one of {tuple(METHODS)}")
    for f in dataclasses.fields(cfg):  # before the range checks below: inf passes `x >= 0`, NaN fails nothing
        _check_number(f.name, getattr(cfg, f.name), f.type)
    at_least_one = ("steps", "group_size", "prompts_per_step", "max_new_tokens", "mu", "minibatch_size",
                    "logprob_chunk", "eval_limit")
    at_least_zero = ("beta", "adv_eps", "weight_decay", "max_grad_norm", "beta_decay_steps", "switch_step",
                     "switch_patience", "save_every", "eval_every", "log_every")  # 0 turns the last seven off
    ranges = [(name, getattr(cfg, name) >= 1, ">= 1") for name in at_least_one]
    ranges += [(name, getattr(cfg, name) >= 0, ">= 0") for name in at_least_zero]
    ranges += [  # the numbers are finite by now
        ("lr", cfg.lr > 0, "> 0"),
        ("clip_eps_low", 0 <= cfg.clip_eps_low < 1, "in [0, 1)"),
        ("clip_eps_high", 0 <= cfg.clip_eps_high < 1, "in [0, 1)"),
        ("trrd_clamp", cfg.trrd_clamp > 0, "> 0 (a clamp at 0 removes the teacher from the ratio)"),
        ("kd_gamma", 0 <= cfg.kd_gamma <= 1, "in [0, 1]"),
        ("beta_min", cfg.beta_min is None or 0 <= cfg.beta_min <= cfg.beta, f"in [0, beta={cfg.beta}] (it decays β)"),
        ("trrd_alpha", cfg.trrd_alpha is None or 0 <= cfg.trrd_alpha <= 1, "in [0, 1]"),
        ("temperature", cfg.temperature > 0, "> 0: training samples (greedy decoding is for evaluation)"),
    ]
    for name, ok, rule in ranges:
        if not ok:
            raise KDRLError(f"config field {name}={getattr(cfg, name)}: must be {rule}")
    if cfg.kd_kind == "full" and cfg.kd_mode == "reward":
        raise KDRLError("config field kd_kind='full' needs kd_mode='loss' (reward mode uses the sampled-token k1)")
    if bias := kdrl.leave_one_out_bias(cfg):  # see kd_reward_returns
        raise KDRLError(f"config fields kd_baseline='loo' (kd_mode='reward') with {bias}. Pass kd_baseline='none', or "
                        "what the baseline needs: loss_agg='constant' (kdrl-seq's) and kd_mask 'none' or 'response'")
    if cfg.group_size < 2 and not cfg.sft and (cfg.use_reward or cfg.switch_step):
        raise KDRLError(f"config field group_size={cfg.group_size}: GRPO's advantage is each reward minus its group's "
                        "mean, so a group of one gives every advantage exactly 0 and the reward teaches nothing "
                        "(grpo, KDRL's reward half, rlad); use group_size >= 2, or a method without a reward (kd)")
    if cfg.kd_kind == "full" and max(cfg.beta, cfg.beta_min or 0.0) == 0 and not cfg.sft:
        raise KDRLError("config field kd_kind='full' with beta=0: there is no KD term to compute (use k2, or beta > 0)")
    if conflicts := method_conflicts(cfg):
        raise KDRLError("config field " + "; ".join(conflicts) + ". Pick the method that matches, or leave the field "
                        f"at the preset's value (from Python: KDRLConfig.from_method({cfg.method!r}, ...))")


def _check_number(name: str, value, kind: str) -> None:
    """A numeric field (kind "int", "float" or "Optional[float]") holds a finite Python number: a NaN or inf of any
    type (a numpy scalar, a 0-d tensor) is refused as such, and so is any other type (config.json must hold it)."""
    if kind not in ("int", "float", "Optional[float]") or value is None:
        return
    one_number = isinstance(value, numbers.Real) or (torch.is_tensor(value) and value.numel() == 1)
    real = float(value) if one_number else None
    if real is not None and not math.isfinite(real):
        raise KDRLError(f"config field {name}={value}: must be a finite number")
    wanted = int if kind == "int" else (int, float)
    if real is None or isinstance(value, bool) or not isinstance(value, wanted):
        what = "an int" if kind == "int" else "a number (int or float)"
        raise KDRLError(f"config field {name}={value!r}: must be {what}, not {type(value).__name__}")


def method_features(cfg: KDRLConfig) -> dict[str, str]:
    """What makes cfg's method what it is, in words, keyed by the field that decides it. A config contradicts its
    method when one of these differs from its preset's (KDRLConfig.from_method(cfg.method)), so METHODS alone defines
    each method. What is not here is a knob a flag may tune: the size of β, α, γ, ε, the annealing length,
    k2 or k3."""
    kd = max(cfg.beta, cfg.beta_min or 0.0) > 0
    mask = "a KD mask (kd_mask 'response' or 'group')" if cfg.kd_mask != "none" else "kd_mask='none'"
    kind = "kd_kind='full', the exact KL" if cfg.kd_kind == "full" else "a sampled-token estimator (k2 or k3)"
    annealed = cfg.beta_min is not None and cfg.beta_decay_steps >= 1
    return dict(
        sft=f"sft={cfg.sft}",
        sft_keep=f"sft_keep={cfg.sft_keep!r}" if cfg.sft else "",
        use_reward=f"use_reward={cfg.use_reward}",
        beta="beta > 0 (a KD term; beta = 0 is grpo)" if kd else "beta = 0 (no KD term)",
        kd_mode=f"kd_mode={cfg.kd_mode!r}" if kd else "",
        kd_mask=mask if kd and cfg.kd_mode == "loss" else "",  # reward mode: a knob (no masked twin of kdrl-seq)
        kd_kind=kind if kd and cfg.kd_mode == "loss" else "",
        beta_min="annealing (a beta_min and beta_decay_steps >= 1)" if annealed else "no annealing (beta_min=None)",
        trrd_alpha="trrd_alpha set (TRRD's ratio)" if cfg.trrd_alpha is not None else "trrd_alpha=None",
        switch_step="a switch to grpo (switch_step >= 1)" if cfg.switch_step else "no switch (switch_step=0)",
    )


def method_conflicts(cfg: KDRLConfig) -> list[str]:
    """The fields whose value contradicts cfg.method, each as "beta=0.01 contradicts method='grpo', which needs
    ...", or []: a feature (method_features) that differs from the preset's, or a knob set where it would silently
    make the run another method."""
    wanted = method_features(KDRLConfig.from_method(cfg.method))
    out = []
    for name, feature in method_features(cfg).items():
        if feature and wanted[name] and feature != wanted[name]:  # "": no such feature (its parent differs, if any)
            out.append(f"{name}={getattr(cfg, name)!r} contradicts method={cfg.method!r}, which needs {wanted[name]}")
    kd_loss = max(cfg.beta, cfg.beta_min or 0.0) > 0 and cfg.kd_mode == "loss" and not cfg.sft
    if kd_loss and cfg.kd_kind == "k1":  # E_{y~π}[∇ log π(y)] = 0 (kdrl-seq's reward mode uses k1 soundly)
        out.append(f"kd_kind='k1' contradicts method={cfg.method!r}: in the loss, k1 = log π − log π_T has zero "
                   "expected gradient (E[∇ log π] = 0), so the KD term adds only noise; use k2, k3 or full")
    if cfg.switch_patience and not cfg.switch_step:
        out.append(f"switch_patience={cfg.switch_patience} contradicts method={cfg.method!r}: only a method that "
                   "switches (kd-then-grpo) has a switch to bring forward")
    if cfg.trrd_alpha == 1.0:
        out.append(f"trrd_alpha=1.0 contradicts method={cfg.method!r}: (π/π_old)^1 · (π/π_T)^0 leaves the teacher "
                   "out of the ratio, which is exactly grpo; use trrd_alpha < 1")
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
# The loop: for step: kdrl.train_step(...); log; evaluate; save.


def train(cfg: KDRLConfig, student, teacher, tokenizer, train_set: list[dict], reward_fn: Callable,
          eval_set: Optional[list[dict]] = None) -> dict:
    """Post-train `student` with cfg.method, one kdrl.train_step per step. Returns a summary: final eval, timings,
    tokens/s. Validates cfg first (validate_config), so an invalid config never reaches a step.

    Writes <out>/config.json, <out>/metrics.jsonl (one line per step; eval lines carry "eval": true) and
    <out>/checkpoint (every save_every steps and at the end). Every forward pass, evaluation's included, runs under
    bfloat16 autocast when cfg.dtype resolves to bfloat16 ("auto" on CUDA), over float32 master weights.

    kd-then-grpo (cfg.switch_step ≥ 1) runs kdrl.phase_config's KD phase, then its GRPO phase from the first step
    `at`, with AdamW's moments reset there: `at` is switch_step, or earlier with switch_patience, the step after the
    first evaluation (every eval_every steps, on eval_set) at which stopped_improving holds. Its rows carry "phase".
    """
    from tqdm.auto import tqdm

    out_dir, optimizer, start, switch = _start_run(cfg, student, teacher, train_set, eval_set)  # validate, resume
    end_ids = kdrl.end_token_ids(tokenizer, student, teacher)
    timer, tokens_seen, evaluated = Timer(), 0, {}  # evaluated: {step: eval metrics}, the last one only
    if cfg.switch_step and switch["at"] is None and cfg.steps <= cfg.switch_step:
        print(f"note: {cfg.method} switches to GRPO at step {cfg.switch_step}, after these {cfg.steps} steps: all KD"
              + (", unless switch_patience fires first" if cfg.switch_patience else ""), file=sys.stderr)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=cfg.method, disable=not cfg.progress,
               dynamic_ncols=True)
    for step in bar:
        if cfg.switch_step and switch["at"] is None and step >= cfg.switch_step:
            switch["at"] = step  # the fixed switch, when the patience rule has not switched earlier
        if switch["at"] == step:
            optimizer.state.clear()  # GRPO starts from the distilled weights with fresh AdamW moments, as a new run
        switched = switch["at"] is not None and step >= switch["at"]
        batch = [train_set[i] for i in batch_for_step(len(train_set), step, cfg.prompts_per_step, cfg.seed)]
        with _name_step_in_errors(step, out_dir / "checkpoint"):
            row = kdrl.train_step(kdrl.phase_config(cfg, switched), step, student, teacher, tokenizer, optimizer,
                                  batch, reward_fn, end_ids=end_ids)
        if cfg.switch_step:
            row["phase"] = "grpo" if switched else "kd"
        for phase in ("sampling", "teacher", "update"):
            timer[phase] = timer.get(phase, 0.0) + row[f"time_{phase}"]
        tokens_seen += row["tokens"]
        _log_step(cfg, bar, out_dir / "metrics.jsonl", row)
        # the patience rule evaluates every eval_every steps, a run's last step included (unlike _due: the final
        # evaluation is not one of its), so that a run stopped and resumed anywhere switches where an unbroken one does
        watching = cfg.switch_patience and switch["at"] is None and (step + 1) % cfg.eval_every == 0
        if (_due(cfg.eval_every, step, cfg.steps) or watching) and eval_set:
            evaluated = {step: _evaluate_aside(student, tokenizer, eval_set, reward_fn, cfg, end_ids, step, timer)}
            _append_row(out_dir / "metrics.jsonl", dict(step=step, eval=True, **evaluated[step]))
            if watching:
                switch["scores"].append(evaluated[step]["acc_greedy"])
                if stopped_improving(switch["scores"], cfg.switch_patience):
                    switch["at"] = step + 1
        if _due(cfg.save_every, step, cfg.steps):
            save_checkpoint(out_dir, step + 1, student, tokenizer, optimizer, cfg, switch)
    bar.close()
    # the end: the final checkpoint and evaluation (the loop's own when it evaluated the last step: the same seed and
    # model give the same numbers), a note if kd-then-grpo has not switched, the time breakdown and tokens/s
    summary = dict(switched_at=switch["at"]) if cfg.switch_step else {}
    if start < cfg.steps:
        save_checkpoint(out_dir, cfg.steps, student, tokenizer, optimizer, cfg, switch)
    if cfg.switch_step and (switch["at"] is None or switch["at"] >= cfg.steps):  # said at the start too
        print(f"note: {cfg.method} has not switched to GRPO in its {cfg.steps} steps: every step was KD (switch_step="
              f"{cfg.switch_step}; --resume with more --steps to reach it)", file=sys.stderr)
    if eval_set:
        last = cfg.steps - 1
        summary["eval"] = evaluated.get(last) or _evaluate_aside(student, tokenizer, eval_set, reward_fn, cfg, end_ids,
                                                                 last, timer)
        _append_row(out_dir / "metrics.jsonl", dict(step=last, eval=True, final=True, **summary["eval"]))
    busy = sum(timer.get(phase, 0.0) for phase in ("sampling", "teacher", "update"))
    summary.update(time={phase: round(seconds, 3) for phase, seconds in timer.items()},
                   tokens_per_s=tokens_seen / busy if busy else 0.0)
    if start < cfg.steps:
        phases = " | ".join(f"{name} {timer.get(name, 0):.1f}s" for name in ("sampling", "teacher", "update", "eval"))
        rate = f"{summary['tokens_per_s']:.0f} tokens/s (non-pad prompt+response tokens per busy second)"
        print(f"time: {phases} | {rate}")
    return summary


def stopped_improving(scores: list[float], patience: int) -> bool:
    """Early stopping's rule, kd-then-grpo's switch_patience: True when none of the last `patience` scores beats the
    best one before them (a tie does not beat it). scores: every evaluation so far, oldest first; patience 0: never."""
    return patience > 0 and len(scores) > patience and max(scores[-patience:]) <= max(scores[:-patience])


def _start_run(cfg: KDRLConfig, student, teacher, train_set: list[dict], eval_set: Optional[list[dict]]) -> tuple:
    """Every check first (the config, and with cfg.resume the checkpoint's), then seed, prepare both models, build
    AdamW, restore the checkpoint, write config.json and start metrics.jsonl (keeping the steps already done).
    Returns (output directory, optimizer, first step, kd-then-grpo's switch state: see read_checkpoint)."""
    validate_config(cfg)
    if not train_set:
        raise KDRLError("the training set is empty")
    out_dir = Path(cfg.out)
    state = read_checkpoint(out_dir / "checkpoint", cfg) if cfg.resume else None  # refuses a config it cannot resume
    start = state["step"] if state else 0
    switch = state["switch"] if state else dict(at=None, scores=[])  # kd-then-grpo's switch state
    if cfg.switch_step and switch["at"] is None and start >= cfg.switch_step:
        switch["at"] = start  # a checkpoint written at the fixed switch: its first step is GRPO's
    if cfg.switch_patience and switch["at"] is None and not (eval_set and cfg.eval_every):
        raise KDRLError("switch_patience needs an eval set and eval_every >= 1 until it switches: it switches when "
                        "the eval accuracy stops improving")
    if kdrl.uses_exact_kl(cfg):  # before any step, not at the first teacher pass
        for model in (student, teacher):
            kdrl.check_logits_rebuildable(model)
    # every check passed: only now are the models, the RNG and the files touched
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    student.eval()  # the update must score the policy that sampled
    teacher.eval()
    disable_dropout(student)
    set_activation_checkpointing(student, cfg.gradient_checkpointing)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state:
        restore_checkpoint(state, student, optimizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    metrics_path = out_dir / "metrics.jsonl"
    kept = []
    if cfg.resume and metrics_path.exists():
        kept = [line for line in metrics_path.read_text().splitlines() if _keep_on_resume(json.loads(line), start)]
    metrics_path.write_text("".join(line + "\n" for line in kept))
    return out_dir, optimizer, start, switch


def set_activation_checkpointing(model, on: bool) -> None:
    """cfg.gradient_checkpointing on a Hugging Face model, the same from Python as from the CLI: switched on (or off)
    unless it already is (activation_checkpointing_* from transformers 5.2x, gradient_checkpointing_* before)."""
    if on == any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules()):
        return
    action = "enable" if on else "disable"
    names = (f"activation_checkpointing_{action}", f"gradient_checkpointing_{action}")
    switch = next((getattr(model, name) for name in names if hasattr(model, name)), None)
    if switch is None:
        raise KDRLError(f"gradient_checkpointing={on}: the student ({type(model).__name__}) has no "
                        f"gradient_checkpointing_{action}(); it needs a Hugging Face model")
    switch()


def disable_dropout(model) -> None:
    """Zero every dropout rate (modules and the float rates attention layers keep), so that train mode, which
    Hugging Face's gradient checkpointing needs, scores exactly the policy that eval mode sampled."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "hidden_dropout", "resid_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


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
    fields += [f"kl {row['kl_k1']:.4f}"] if "kl_k1" in row else []  # no KL when no teacher was scored
    fields += [f"{name} {row[name]:.4f}" for name in ("pg_loss", "kd_loss", "sft_loss") if name in row]
    fields += [f"len {row['length']:.0f}", f"grad {row['grad_norm']:.3f}", f"beta {row['beta']:.2g}"]
    fields += [f"{phase} {row['time_' + phase]:.2f}s" for phase in ("sampling", "teacher", "update")]
    return " | ".join(fields)


def _append_row(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _due(every: int, step: int, steps: int) -> bool:
    """A periodic eval or save after `step`: every N steps, but not after the last (the run's end does that)."""
    return bool(every) and (step + 1) % every == 0 and step + 1 < steps


class Timer(dict):
    """Accumulated wall time per phase: `with timer("eval"): ...` (kdrl.timed: CUDA synchronised)."""

    def __call__(self, name: str):
        return kdrl.timed(self, name)


# -----------------------------------------------------------------------------
# Evaluation: greedy and sampled accuracy, on an RNG stream of its own.


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[dict], reward_fn: Callable, cfg: KDRLConfig, batch_size: int = 64,
             end_ids: Optional[list[int]] = None) -> dict:
    """Greedy accuracy, sampled accuracy (one sample at cfg.temperature), mean response length, truncated fraction.
    end_ids: the ids that end a response (default end_token_ids(tokenizer, model))."""
    results = dict(greedy=[], sampled=[], length=[], truncated=[])
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [ex["prompt"] for ex in chunk]
        for name, temperature in (("greedy", 0.0), ("sampled", cfg.temperature)):
            rollouts = kdrl.sample_rollouts(model, tokenizer, prompts, 1, cfg.max_new_tokens, temperature,
                                            end_ids=end_ids)
            _, correct = kdrl.score_completions(reward_fn, chunk, kdrl.decode(tokenizer, rollouts), 1)
            results[name] += correct.tolist()
            if name == "greedy":
                results["length"] += rollouts.response_mask.sum(1).tolist()
                results["truncated"] += rollouts.truncated.tolist()
    means = {name: sum(map(float, values)) / max(len(values), 1) for name, values in results.items()}
    return dict(acc_greedy=means["greedy"], acc_sampled=means["sampled"], length=means["length"],
                truncated=means["truncated"])


def _evaluate_aside(model, tokenizer, eval_set, reward_fn, cfg: KDRLConfig, end_ids, step: int, timer) -> dict:
    """evaluate() on eval_set[:eval_limit] on its own seeded RNG stream (seed, step), restored afterwards: evaluating,
    or not, never changes what training samples next, so a run resumed with another eval_every continues exactly.
    It runs under the same autocast as training's sampling, so the accuracy is that of the policy as it samples."""
    device = next(model.parameters()).device
    with timer("eval"), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed * 100_003 + step + 1)
        with kdrl.autocast_for(cfg.dtype, device):
            return evaluate(model, tokenizer, eval_set[: cfg.eval_limit], reward_fn, cfg, end_ids=end_ids)


# -----------------------------------------------------------------------------
# Checkpoints and resume: written atomically, refused when the config would change the maths.


def _rng_state(device: torch.device) -> dict:
    """The RNG states a resumed run needs: CPU and Python always, CUDA's for a run on CUDA, and the device."""
    cuda = dict(cuda=torch.cuda.get_rng_state_all()) if device.type == "cuda" else {}
    return dict(torch=torch.get_rng_state(), python=random.getstate(), device=device.type, **cuda)


def _set_rng_state(state: dict, device: torch.device) -> Optional[str]:
    """Restore the RNG states saved by _rng_state, as far as this machine allows; returns what could not be, or
    None. The CPU and Python states always are. A run on CUDA restores one state per device saved, the first ones
    when fewer are visible (a single-GPU run draws on device 0 alone). A run that trained on another device (older
    checkpoints do not say) is named: it continues, but not bit for bit."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    trained_on = state.get("device", device.type)
    moved = f"the run trained on {trained_on} resumes on {device.type}" if trained_on != device.type else None
    if device.type != "cuda":
        return moved  # a CPU run draws on the CPU generator alone
    saved = state.get("cuda", [])
    visible = torch.cuda.device_count()
    for index, device_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(device_state, index)
    if visible < len(saved):
        return f"the checkpoint's CUDA RNG state ({len(saved)} devices) was restored for the first {visible} only"
    if not saved:
        return f"{moved or 'the checkpoint holds no CUDA RNG state'}: CUDA draws restart from the seed"
    return moved


def save_checkpoint(out_dir: Path, step: int, student, tokenizer, optimizer, cfg: KDRLConfig,
                    switch: Optional[dict] = None) -> Path:
    """Write <out_dir>/checkpoint atomically: build it in a temporary directory, then rename it into place,
    so an interrupted save never leaves a half-written checkpoint and the last good one survives.
    switch: kd-then-grpo's switch state (train), so that a resumed run switches where an unbroken one does."""
    final, tmp, old = out_dir / "checkpoint", out_dir / ".checkpoint.tmp", out_dir / ".checkpoint.old"
    if not final.exists() and old.exists():  # a save was interrupted between its renames: put the good one back
        old.rename(final)
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "kdrl_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    rng = _rng_state(next(student.parameters()).device)
    torch.save(dict(step=step, optimizer=optimizer.state_dict(), rng=rng, switch=switch or dict(at=None, scores=[])),
               tmp / "trainer_state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# Fields that may change on --resume, which never change the maths of a step. The first kind decides how long, where
# and how visibly the run goes: the resumed run equals the unbroken one bit for bit (same machine and device). The
# second computes the same maths in another floating-point order (another summation order, kernel or precision):
# the run continues, a note says it is not bit for bit. Any other difference (method, β, G, lr, seed...) is refused.
RESUME_BIT_EXACT = ("steps", "resume", "progress", "log_every", "out", "eval", "eval_every", "eval_limit", "save_every")
RESUME_OTHER_ROUNDING = ("device", "dtype", "gradient_checkpointing", "minibatch_size", "logprob_chunk")


def check_resume_config(saved: dict, cfg: KDRLConfig, path: Path, step: int) -> list[str]:
    """Refuse to resume a checkpoint (config `saved`, at `step`) under a config that changes the run's math; returns
    the RESUME_OTHER_ROUNDING fields that changed, as "name (old → new)"."""
    diffs = []
    for f in dataclasses.fields(KDRLConfig):
        if f.name in RESUME_BIT_EXACT + RESUME_OTHER_ROUNDING:
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
    return [f"{name} ({saved.get(name)!r} → {getattr(cfg, name)!r})" for name in RESUME_OTHER_ROUNDING
            if saved.get(name) != getattr(cfg, name)]


def read_checkpoint(path: Path, cfg: Optional[KDRLConfig] = None) -> dict:
    """A checkpoint's trainer state {"step", "switch", "optimizer", "rng", "path", "rounding"}, read without touching
    any model; with cfg, first refusing a config that differs from the checkpoint's in anything but the RESUME_*
    fields ("rounding": the RESUME_OTHER_ROUNDING ones that changed). Falls back to the previous checkpoint if a save
    was interrupted between its two renames. Nothing is unpickled as code: weights_only=True. "switch": kd-then-grpo's
    {"at": the first GRPO step, or None before the switch, "scores": the eval accuracies the patience rule read}."""
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
    state = dict(state, path=path, rounding=[], switch=state.get("switch", dict(at=None, scores=[])))
    if cfg is not None:
        state["rounding"] = check_resume_config(saved_cfg, cfg, path, state["step"])
        steering = [f"{name} (checkpoint {saved_cfg.get(name)!r}, now {getattr(cfg, name)!r})"
                    for name in ("eval", "eval_every", "eval_limit") if saved_cfg.get(name) != getattr(cfg, name)]
        if steering and cfg.switch_patience and state["switch"]["at"] is None and state["step"] < cfg.switch_step:
            raise KDRLError(f"--resume: {path} has not switched yet and switch_patience decides when from its "
                            "evaluations, so they must not change: " + "; ".join(steering))
    return state


def restore_checkpoint(state: dict, student, optimizer) -> None:
    """Load read_checkpoint's state into the student, the optimizer and the RNG. A resume that cannot be bit for bit
    (another device, a RESUME_OTHER_ROUNDING field changed) says so in a note on stderr."""
    saved = type(student).from_pretrained(state["path"], dtype=next(student.parameters()).dtype)
    student.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    if lost := _set_rng_state(state["rng"], next(student.parameters()).device):
        print(f"note: --resume: {lost}; resuming across devices is not bit-exact", file=sys.stderr)
    if state["rounding"]:
        print(f"note: --resume with another {', '.join(state['rounding'])}: the same maths in another floating-point "
              "order, so the run continues but not bit for bit", file=sys.stderr)


# -----------------------------------------------------------------------------
# Loading data, models and tokenizers from local paths; the CLI.


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
        prompt_tokens = kdrl.encode_prompts(tokenizer, [ex["prompt"]])[0].shape[1]
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


def _from_local(auto_class, path: str, role: str, what: str, **kwargs):
    """auto_class.from_pretrained(path) from a local directory only; errors name the flag (--role) and the path."""
    if not Path(path).is_dir():
        raise KDRLError(f"--{role} {path}: no such directory (models load from local paths only)")
    try:
        return auto_class.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise KDRLError(f"--{role} {path}: cannot load {what} ({e})") from None


def load_model(path: str, device: torch.device, dtype: torch.dtype, role: str):
    from transformers import AutoModelForCausalLM

    return _from_local(AutoModelForCausalLM, path, role, "a causal LM", dtype=dtype).to(device)


def load_tokenizer(path: str, role: str):
    from transformers import AutoTokenizer

    tok = _from_local(AutoTokenizer, path, role, "a tokenizer")
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
        teacher_dtype = kdrl.compute_dtype(cfg.dtype, device)  # the teacher is stored in the compute dtype
        teacher = load_model(cfg.teacher, device, teacher_dtype, "teacher").requires_grad_(False)
        for ex_set, src in ((train_set, cfg.train), (eval_set or [], cfg.eval)):
            check_prompt_lengths(tokenizer, student, ex_set, cfg.max_new_tokens, src)
        summary = train(cfg, student, teacher, tokenizer, train_set, kdrl.math_reward, eval_set)
    except KDRLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "eval" in summary:
        print("eval: " + " | ".join(f"{k} {v:.3f}" for k, v in summary["eval"].items()))
    print(f"saved {Path(cfg.out) / 'checkpoint'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
