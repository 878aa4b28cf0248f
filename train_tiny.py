"""
train_tiny.py: the KDRL comparison on tiny models, from scratch, with no downloads.

    python train_tiny.py                   # cpu preset without a GPU (2 seeds, 7 arms, 2 worker processes), else gpu
    python train_tiny.py --start weak      # the regime where GRPO starves: a student stopped at 5%, not 20%
    python train_tiny.py --preset smoke    # about 30 s, tiny everything: checks the plumbing, not the methods

The benches, the tiny pair for the CLIs (--save-pair) and the first run on a GPU (--check-gpu) are in bench.py.

Task: 2-digit addition worked column by column with carries, e.g. `95+98=` → `5+8=13|9+9+1=19|#### 193`,
scored by kdrl.math_reward (the last `#### x`).

The regime (why this design). The papers' claims need a teacher that is strong but wrong somewhere, in a way
that imitation inherits and the reward can correct. Here the teacher is *confidently wrong* on one sub-pattern:
it is trained on solutions that drop the carry whenever both units digits are ≥ 5 ("region B", 25% of the
problems: `7+5=12|4+8=12|#### 122` for 47+85), so it is near-perfect on the rest ("region A", which still has
carries, e.g. `3+8=11|...+1`) and near 0% on B, where it answers a+b−10 with confidence. The student starts
from a brief supervised start on *correct* solutions, stopped early (--start): "mid", the default, at about 20%
(B included), or "weak" at about 5%, where a group of 8 samples rarely holds a success, so GRPO's advantages are
mostly 0 (zero_adv_frac in each metrics.jsonl). For a token of a correct response the net push of KDRL is
A − β·d (d = log π − log π_T); where the teacher confidently disagrees d is large and positive, so KD pulls
correct B responses toward the bug. kd-then-grpo distils first (KD, no reward) and switches to GRPO (β = 0) when
the validation split's greedy accuracy has not improved for 2 evaluations (every 15 steps), at step 100 at the
latest (SEQUENTIAL): sequential against joint.

Predictions, written before the reported runs (seeds 0-2). Each names the claim it tests; the README's Results say
for each whether it held, was not shown (within 2 paired standard errors), or reversed. One pilot seed (9, never
reported) was run first, to size the regime; what it showed is said where it shaped a prediction.
  1. Starving (weak start): GRPO's zero-adv over its first 30 steps is ≥ 0.85 with --start weak and ≤ 0.70 with
     the mid start (pilot: 0.90 and 0.64).
  2. KD's sample efficiency where the student rarely succeeds (the papers' headline): with --start weak, KD and
     KDRL reach region A ≥ 30% in fewer steps than GRPO. The pilot contradicted it (no arm learned from the weak
     start in 150 steps, at lr 1e-4, 3e-4 or 1e-3, even KD on the exact KL), so the expectation is: not shown.
  3. KD's sample efficiency at the mid start: KD and KDRL have a larger area under the region-A curve than GRPO
     (paired), and reach A ≥ 30% in fewer steps.
  4. Imitation inherits the bug: KD and sft-all end below the student's start on region B.
  5. Joint beats both: KDRL beats KD on B and beats GRPO on ID (the papers' claim; the last run's ID was a tie,
     +1.0 ± 1.1, so the expectation is a tie on ID).
  6. KDRL's region-B accuracy falls as β rises: grpo (β = 0) > kdrl (0.1) > kdrl-b0.5 on B.
  7. KDRL-Mask (no KD on correct responses) beats KDRL on B at β = 0.5, where KDRL stalls; at β = 0.1 they tie.
  8. kdrl-anneal (β 0.1 → 0.02) ends at least as high as kdrl on B, with the same area under A.
  9. Sequential against joint: kd-then-grpo has an area under A at least GRPO's (the KD phase), but ends below
     GRPO and KDRL on B: after KD has taught the bug, B's groups rarely hold a success, so GRPO relearns B slowly
     (sequential does not beat joint here).
 10. RLAD stays at or below GRPO on B; filtered SFT has the largest area under A, and ends below GRPO on B.

OOD holds every problem whose two tens digits are equal (`77+74=`, all 900 of them: the whole population, so
OOD accuracy has no sampling error from the choice of problems). No method trains on them. OOD problems
without a carry need only steps seen in training (`7+7=14` appears in the units column); those with a carry
need `7+7+1=15`, a step that never appears in training. The two kinds are reported separately.

Pipeline: (1) the teacher is trained on the carry-dropping solutions until it reproduces them, and cached under
<out>/cache/teacher-<hash of its settings>; (2) for each seed, a smaller student gets its brief supervised start;
(3) from that same student, every arm (a kdrl.METHODS preset, or one at another β) is post-trained with train.train
on the same rollout budget, in segments (train.train's bit-exact --resume) with an evaluation of region A and B
subsets after each and of the full test after the last; (4) results.md (tables), results.json (raw numbers),
curves.png (curves) and one metrics.jsonl per run. The (seed, arm) jobs run in `workers` processes of one thread
each, so their numbers do not depend on how many run side by side.

Sample efficiency: steps and seconds until region A reaches a_threshold (30%), interpolated between evaluations,
and the area under the region-A curve (accuracy averaged over the run), each paired with GRPO by seed.

The learning rate (one for every arm) was chosen for GRPO, the baseline, on the validation split: see
`--lr-grid`. The demo scales the paper's β and anneal length to tiny models once, in DEMO_SCALE.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import itertools
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import kdrl
import train

# -----------------------------------------------------------------------------
# Presets: one dataclass, one instance per preset.


@dataclass
class Preset:
    digits: int = 2
    """operand length; every split uses the same length (OOD is by composition, not by length)"""
    n_train: int = 4000
    """train prompts (also the worked solutions for supervised pre-training)"""
    n_val: int = 200
    """validation problems (ID), for choosing the learning rate (--lr-grid) and kd-then-grpo's switch; never in the
    results"""
    n_test: int = 1000
    """ID test problems"""
    n_ood: int = 900
    """OOD problems: every equal-tens problem, 900 at 2 digits (the whole population)"""
    teacher: dict = field(default_factory=lambda: dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4))
    """teacher architecture (LlamaConfig fields)"""
    teacher_steps: int = 1500
    """max supervised steps for the teacher; it stops early at teacher_target"""
    teacher_target: float = 0.95
    """stop teacher training once it reproduces its own (carry-dropping) solutions this often, greedily"""
    student: dict = field(default_factory=lambda: dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    """student architecture: smaller than the teacher"""
    student_steps: int = 400
    """max steps of the student's brief supervised start; it stops early at student_target"""
    student_target: float = 0.2
    """stop the student's supervised start once greedy accuracy on a peek at 100 train problems reaches this (see
    STARTS: "mid", the default, 20%; "weak", 5%, where a group of 8 rarely holds a success)"""
    check_every: int = 5
    """steps between those accuracy checks (the student's accuracy jumps within a few dozen steps: every 10 steps
    let one start overshoot to 39%)"""
    sft_lr: float = 3e-3
    """AdamW lr for the supervised pre-training of both models"""
    sft_batch: int = 64
    """sequences per supervised step"""
    rl: dict = field(default_factory=dict)
    """KDRLConfig fields shared by every arm (the demo's overrides)"""
    arms: tuple = ()
    """the arms run by default (see PREDICTION_ARMS; () runs every arm)"""
    seeds: int = 3
    """seeds per arm (student init, data order, sampling)"""
    workers: int = 1
    """processes running the (seed, arm) jobs side by side, one thread each (the numbers do not depend on it)"""
    eval_points: int = 10
    """evaluations during post-training, evenly spaced, for the curves and the sample-efficiency measures"""
    eval_subset: int = 200
    """problems per curve evaluation before the last: this many from ID region A, half as many from region B (the
    last evaluation, and the start's, use every ID and OOD problem)"""
    avg_k: int = 0
    """samples per problem for avg@k at the training temperature, in the final evaluation (0: none)"""
    a_threshold: float = 0.3
    """the region-A accuracy whose first crossing measures sample efficiency (steps and seconds to reach it)"""


RL_CPU = dict(steps=150, prompts_per_step=8, group_size=8, lr=1e-4, max_new_tokens=28, temperature=1.0,
              minibatch_size=64)
# The arms that test the predictions (the docstring's); `--methods all` adds kdrl-b0.02, kdrl-seq and kdrl-full. The
# cpu preset leaves out kdrl-mask (β = 0.1), rlad, sft-all and kdrl-anneal (predictions 4's second half, 7's second,
# 8 and 10's first) to fit 10 minutes on 2 cores: with them, 2 seeds took 610 s on a fresh clone, teacher cached.
PREDICTION_ARMS = ("grpo", "kd", "sft", "sft-all", "kdrl", "kdrl-b0.5", "kdrl-mask", "kdrl-mask-b0.5", "kdrl-anneal",
                   "rlad", "kd-then-grpo")
CPU_ARMS = tuple(arm for arm in PREDICTION_ARMS if arm not in ("kdrl-mask", "rlad", "sft-all", "kdrl-anneal"))
PRESETS = {
    "smoke": Preset(n_train=300, n_val=16, n_test=16, n_ood=16, teacher_steps=20, student_steps=5, sft_batch=16,
                    teacher=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2),
                    student=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
                    rl={**RL_CPU, "steps": 2, "prompts_per_step": 2, "group_size": 2}, arms=(), seeds=1,
                    eval_points=2, eval_subset=8, avg_k=2),
    "cpu": Preset(rl=RL_CPU, arms=CPU_ARMS, seeds=2, workers=2),  # 2 cores: one single-threaded job on each
    # sized for about 15 min on one H100-class GPU, from STEP_COST's assumed figures (no GPU has run it yet)
    "gpu": Preset(rl={**RL_CPU, "steps": 200, "prompts_per_step": 32}, arms=PREDICTION_ARMS, seeds=5, workers=4,
                  avg_k=4),
}
# --start: the student's supervised start, stopped at this greedy accuracy on 100 train problems. "weak" is the
# regime the papers' sample-efficiency claim is about (with G = 8 about 9 groups in 10 hold no success, so GRPO's
# advantages are 0 and it learns nothing from them); "mid", the default, is the earlier demo's start (about 6 in 10).
STARTS = dict(weak=dict(student_target=0.05), mid=dict(student_target=0.2))
# The paper's β (5e-3 → 1e-3) is sized for 1.5B-parameter models whose per-token KL is small and whose GRPO
# term is tiny per token; on these models KD would vanish at that size. So every β given in the paper's
# units (the KDRL variants; not kd's β = 1, which has no RL term to balance) is multiplied by beta, once,
# and kdrl-anneal's decay (our choice of 80 steps: the paper gives no length) is scaled from a ~280-step
# run to ours. kdrl-anneal still anneals β → β/5. kdrl-seq's β multiplies a return summed over the response,
# added to a ±1-scale advantage, so it keeps the paper's β unscaled (its own units).
DEMO_SCALE = dict(beta=20.0, paper_steps=280)
# Arms beyond the presets: "<preset>-b<β>", the preset at another β (in the demo's units, after DEMO_SCALE): the β
# grid of the predictions, and KDRL-Mask at the β where KDRL stalls on region B.
BETA_ARMS = {"kdrl-b0.02": 0.02, "kdrl-b0.5": 0.5, "kdrl-mask-b0.5": 0.5}
# kd-then-grpo in the demo: KD until the validation split's greedy accuracy (100 problems, evaluated at every curve
# point) has not beaten its best for `patience` evaluations in a row, or until `latest` × steps, then GRPO.
SEQUENTIAL = dict(patience=2, latest=2 / 3, eval_limit=100)
VOCAB = "0123456789+=|# "

# -----------------------------------------------------------------------------
# Task: procedurally generated additions with worked solutions, and the teacher's systematic error.


def in_region_b(a: int, b: int) -> bool:
    """Region B: both units digits ≥ 5, where the teacher's training data drops the carry."""
    return a % 10 >= 5 and b % 10 >= 5


def solution(a: int, b: int, digits: int, drop_carry_in_b: bool = False) -> str:
    """Column-by-column working, units first: `7+5=12|4+8+1=13|#### 132`. drop_carry_in_b: the teacher's version,
    which forgets the units carry in region B (`7+5=12|4+8=12|#### 122`), self-consistently."""
    steps, carry, total = [], 0, 0
    for i in range(digits):  # column i, units first: place value 10**i
        digit_a, digit_b = a // 10**i % 10, b // 10**i % 10
        column_sum = digit_a + digit_b + carry
        steps.append(f"{digit_a}+{digit_b}" + ("+1" if carry else "") + f"={column_sum}")
        total += column_sum % 10 * 10**i
        carry = 0 if (i == 0 and drop_carry_in_b and in_region_b(a, b)) else column_sum // 10
    return "|".join(steps) + f"|#### {total + carry * 10**digits}"


def example(a: int, b: int, digits: int) -> dict:
    buggy = solution(a, b, digits, drop_carry_in_b=True)
    return dict(
        prompt=f"{a}+{b}=",
        answer=str(a + b),
        solution=solution(a, b, digits),
        teacher_solution=buggy,
        teacher_answer=buggy.split("#### ")[1],
        region="B" if in_region_b(a, b) else "A",
        carry=(a % 10 + b % 10) >= 10,
    )


def make_splits(p: Preset, seed: int = 1234) -> dict[str, list[dict]]:
    """Disjoint splits, a fixed seed so every run sees the same data. ood: every problem whose leading digits are
    equal (77+74=; all 900 at 2 digits); train / val / test: the others, shuffled."""
    lo, hi = 10 ** (p.digits - 1), 10**p.digits - 1  # the smallest and largest operand
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    random.Random(seed).shuffle(pairs)
    ood = [example(a, b, p.digits) for a, b in pairs if a // lo == b // lo][: p.n_ood]  # a // lo: leading digit
    rest = [(a, b) for a, b in pairs if a // lo != b // lo]
    cuts = [p.n_train, p.n_train + p.n_val, p.n_train + p.n_val + p.n_test]
    rows = [example(a, b, p.digits) for a, b in rest[: cuts[2]]]
    return dict(train=rows[: cuts[0]], val=rows[cuts[0] : cuts[1]], test=rows[cuts[1] : cuts[2]], ood=ood)


def subsets(data: dict, limit: int | None = None) -> dict[str, list[dict]]:
    """The reported populations: ID (test) by region, OOD by whether it needs a step never seen in training.
    limit: the curves' cheaper evaluation instead: the first `limit` problems of region A and limit // 2 of region B
    (no OOD: the curves and the sample-efficiency measures are about the ID regions)."""
    test, ood = data["test"], data["ood"]
    id_A, id_B = [ex for ex in test if ex["region"] == "A"], [ex for ex in test if ex["region"] == "B"]
    if limit:
        return dict(id_A=id_A[:limit], id_B=id_B[: max(1, limit // 2)])
    return dict(id_A=id_A, id_B=id_B, ood_seen=[ex for ex in ood if not ex["carry"]],
                ood_unseen=[ex for ex in ood if ex["carry"]])


def char_tokenizer(chars: str = VOCAB) -> PreTrainedTokenizerFast:
    """A character-level transformers tokenizer built in code: one id per character, plus pad/unk/eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(["<pad>", "<unk>", "<eos>", *dict.fromkeys(chars)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character is a token
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    # pad != eos, so the model is taught to stop (kdrl masks by position anyway)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


# -----------------------------------------------------------------------------
# Models: random-init Llamas, and the supervised pre-training (demo plumbing, not part of KDRL).


def new_model(tok, arch: dict, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        intermediate_size=4 * arch["hidden_size"],
        num_key_value_heads=arch["num_attention_heads"],  # plain multi-head attention
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **arch,
    )
    return LlamaForCausalLM(cfg)


def supervised(model, tok, examples: list[dict], steps: int, lr: float, batch: int, seed: int, desc: str, check=None,
               check_every: int = 100, target: str = "solution"):
    """Next-token NLL on prompt → ex[target] (a worked solution) + EOS, loss on the response only. `check()` every
    check_every steps may return True to stop early (the teacher trains "until strong", the student "until not
    hopeless")."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    device = next(model.parameters()).device
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc, dynamic_ncols=True, leave=False)):
        batch_examples = rng.sample(examples, batch)
        # (prompt ids, response ids + EOS) per example
        seqs = [
            (tok(ex["prompt"])["input_ids"], tok(ex[target])["input_ids"] + [tok.eos_token_id])
            for ex in batch_examples
        ]
        L = max(len(prompt) + len(response) for prompt, response in seqs)  # the longest sequence in the batch
        ids = torch.tensor(
            [prompt + response + [tok.pad_token_id] * (L - len(prompt) - len(response)) for prompt, response in seqs],
            device=device,
        )  # (B, L) right-padded
        labels = torch.tensor(
            [[-100] * len(prompt) + response + [-100] * (L - len(prompt) - len(response)) for prompt, response in seqs],
            device=device,
        )  # (B, L): -100 (ignored by the loss) on the prompt and the padding
        prompt_lengths = torch.tensor([len(prompt) for prompt, _ in seqs], device=device)  # (B,)
        attention = (labels != -100) | (torch.arange(L, device=device) < prompt_lengths[:, None])  # (B, L)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if check and (step + 1) % check_every == 0:
            model.eval()
            stop = check()
            model.train()
            if stop:
                break
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, tok, examples: list[dict], p: Preset, temperature: float = 0.0, k: int = 1,
             answer: str = "answer") -> float:
    """Mean over problems of the fraction of k responses whose answer equals ex[answer] (greedy: k = 1). Sampling
    runs on its own seeded RNG stream, restored afterwards, so evaluating never changes what training samples."""
    if not examples:
        return float("nan")
    device = next(model.parameters()).device
    scores = []  # one per problem: the fraction of its k responses that are correct
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for start in range(0, len(examples), 512):
            chunk = examples[start : start + 512]
            prompts = [ex["prompt"] for ex in chunk]
            rollouts = kdrl.sample_rollouts(model, tok, prompts, k, p.rl["max_new_tokens"], temperature)
            texts = kdrl.decode(tok, rollouts)  # k consecutive responses per prompt
            for problem, ex in enumerate(chunk):
                gold = dict(ex, answer=ex[answer])
                hits = sum(kdrl.math_reward(ex["prompt"], texts[problem * k + sample], gold) for sample in range(k))
                scores.append(hits / k)
    return sum(scores) / len(scores)


def evaluate(
    model, tok, populations: dict[str, list[dict]], p: Preset, k: int = 0, sizes: dict | None = None
) -> dict:
    """Greedy accuracy on each population (id_A, id_B, and ood_seen, ood_unseen when given) and the pooled id and ood,
    weighted by `sizes` (default: the populations' own sizes; pass the full test's when evaluating on subsets); with
    k > 0 also avg@k at the training temperature on id and ood."""
    results = {name: accuracy(model, tok, exs, p) for name, exs in populations.items()}
    sizes = sizes or {name: len(exs) for name, exs in populations.items()}
    for pool, parts in (("id", ("id_A", "id_B")), ("ood", ("ood_seen", "ood_unseen"))):
        if not all(part in populations for part in parts):
            continue
        pool_size = sum(sizes[part] for part in parts)
        pooled = sum(results[part] * sizes[part] for part in parts)
        results[pool] = pooled / pool_size if pool_size else float("nan")
        if k:
            exs = [ex for part in parts for ex in populations[part]]
            results[f"{pool}_avg@{k}"] = accuracy(model, tok, exs, p, p.rl["temperature"], k)
    return results


def reached(model, tok, examples: list[dict], p: Preset, target: float, answer: str):
    """A stopping check: greedy accuracy against ex[answer] on a peek at 100 *train* problems ≥ target."""

    def check() -> bool:
        return accuracy(model, tok, examples[:100], p, answer=answer) >= target

    return check


def teacher_settings(p: Preset) -> dict:
    return dict(arch=p.teacher, steps=p.teacher_steps, target=p.teacher_target, lr=p.sft_lr, batch=p.sft_batch,
                digits=p.digits, n_train=p.n_train, vocab=VOCAB, check="train100", bug="drop-carry-in-region-B")


def teacher_path(p: Preset, cache_dir: Path) -> Path:
    """cache_dir/teacher-<hash of the teacher's settings>."""
    key = json.dumps(teacher_settings(p), sort_keys=True).encode()
    return cache_dir / ("teacher-" + hashlib.sha256(key).hexdigest()[:12])


def get_teacher(p: Preset, tok, data, cache_dir: Path, device):
    """Train the teacher on the carry-dropping solutions, or load it from cache/teacher-<hash of its settings>."""
    path = teacher_path(p, cache_dir)
    if (path / "meta.json").exists():
        print(f"teacher: cached at {path}")
        model = LlamaForCausalLM.from_pretrained(path).to(device).eval().requires_grad_(False)
        return model, json.loads((path / "meta.json").read_text())
    t0 = time.time()
    model = new_model(tok, p.teacher, seed=0).to(device)
    check = reached(model, tok, data["train"], p, p.teacher_target, answer="teacher_answer")
    desc = "teacher (supervised, carry-dropping)"
    supervised(model, tok, data["train"], p.teacher_steps, p.sft_lr, p.sft_batch, 0, desc, check,
               target="teacher_solution")
    meta = dict(train_s=time.time() - t0, settings=teacher_settings(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return model.requires_grad_(False), meta


def get_student(p: Preset, tok, data, seed: int, device):
    """A fresh small student with its brief supervised start on *correct* solutions; (model, seconds)."""
    t0 = time.time()
    model = new_model(tok, p.student, seed=100 + seed).to(device)
    check = reached(model, tok, data["train"], p, p.student_target, answer="answer")
    desc = f"student seed {seed} (supervised)"
    supervised(model, tok, data["train"], p.student_steps, p.sft_lr, p.sft_batch, seed, desc, check, p.check_every)
    return model, time.time() - t0


# -----------------------------------------------------------------------------
# Post-training: every arm from the same student, via train.train, in segments with an evaluation after each.


def arm_config(arm: str, p: Preset, seed: int, out: Path) -> kdrl.KDRLConfig:
    """KDRLConfig.from_method(preset, **demo overrides), then DEMO_SCALE applied once (see its comment); the β-grid
    arms are their preset with β set directly in the demo's units; kd-then-grpo gets SEQUENTIAL's switch."""
    method = arm.rsplit("-b", 1)[0] if arm in BETA_ARMS else arm  # "kdrl-mask-b0.5" → "kdrl-mask"
    cfg = kdrl.KDRLConfig.from_method(method, **p.rl, seed=seed, out=str(out), progress=False)
    if arm in BETA_ARMS:
        return replace(cfg, beta=BETA_ARMS[arm])
    if method == "kd-then-grpo":  # kd's β = 1 is not scaled (no RL term to balance), like kd's
        return replace(cfg, switch_step=max(1, round(cfg.steps * SEQUENTIAL["latest"])),
                       switch_patience=SEQUENTIAL["patience"], eval_every=max(1, cfg.steps // p.eval_points),
                       eval_limit=SEQUENTIAL["eval_limit"])
    if cfg.beta and cfg.use_reward and cfg.kd_mode == "loss":  # β in the paper's units
        cfg.beta *= DEMO_SCALE["beta"]
        cfg.beta_min = cfg.beta_min * DEMO_SCALE["beta"] if cfg.beta_min is not None else None
    if cfg.beta_decay_steps:
        cfg.beta_decay_steps = max(1, round(cfg.beta_decay_steps * cfg.steps / DEMO_SCALE["paper_steps"]))
    return cfg


def run_arm(arm, p, seed, student0, teacher, tok, data, start: dict, out: Path) -> dict:
    """Post-train a copy of student0 with `arm` in eval_points segments (train.train runs resumed from the last one,
    bit-exact), evaluating on the curves' subsets after each but the last, and on the full test after the last.
    `start`: the student's evaluation before post-training (on the curves' subsets), the curve's first point.
    kd-then-grpo gets the validation split as train.train's eval set until it has switched."""
    cfg = arm_config(arm, p, seed, out / f"{arm}-seed{seed}")
    student = copy.deepcopy(student0)
    wall = eval_s = 0.0  # seconds of post-training, and of the demo's evaluations
    cpu0 = time.process_time()  # this process's CPU seconds: the job's, since each runs on one thread
    few = subsets(data, p.eval_subset)
    full = subsets(data)
    full_sizes = {name: len(exs) for name, exs in full.items()}
    curve = [dict(step=0, wall_s=0.0, **start)]
    ends = sorted({max(1, round(cfg.steps * (i + 1) / p.eval_points)) for i in range(p.eval_points)})
    for segment, end in enumerate(ends):
        switched = segment > 0 and train.read_checkpoint(Path(cfg.out) / "checkpoint")["switch"]["at"] is not None
        eval_set = data["val"] if cfg.switch_patience and not switched else None
        t0 = time.time()
        segment_cfg = replace(cfg, steps=end, resume=segment > 0)
        quiet = io.StringIO()  # train.train's own time line and notes (kd-then-grpo not switched yet), per segment
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            summary = train.train(segment_cfg, student, teacher, tok, data["train"], kdrl.math_reward, eval_set)
        validation = summary["time"].get("eval", 0.0)  # kd-then-grpo's evaluations for its switch
        wall += time.time() - t0 - validation
        eval_s += validation
        t0 = time.time()
        last = segment + 1 == len(ends)
        point = evaluate(student, tok, full, p, k=p.avg_k) if last else evaluate(student, tok, few, p, sizes=full_sizes)
        curve.append(dict(step=end, wall_s=wall, **point))
        eval_s += time.time() - t0
    logged = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in logged if not row.get("eval")]
    rewarded = [row["zero_adv_frac"] for row in steps if "zero_adv_frac" in row and row.get("phase") != "kd"]
    if not (cfg.use_reward or cfg.switch_step):
        rewarded = []  # kd: no reward, so every advantage is 0 by construction
    length = statistics.mean(row["length"] for row in steps[-10:])  # the last 10 steps
    switch = next((row["step"] for row in steps if row.get("phase") == "grpo"), None)
    return dict(method=arm, seed=seed, wall_s=wall, eval_s=eval_s, cpu_s=time.process_time() - cpu0, beta=cfg.beta,
                length=length, curve=curve, zero_adv=rewarded, switch_step=switch, **point)


# -----------------------------------------------------------------------------
# Reporting: table (mean ± standard error over seeds), JSON, curves.

COLUMNS = [("id", "ID"), ("id_A", "ID A"), ("id_B", "ID B"), ("ood", "OOD"), ("ood_seen", "OOD seen"),
           ("ood_unseen", "OOD unseen")]


def mean_se(xs: list[float], fmt: str) -> str:
    """`mean ± standard error of the mean` (sample std, n − 1), or the mean alone for one value."""
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return fmt.format(mean)
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
    return f"{fmt.format(mean)} ± {fmt.replace('+', '').format(se)}"


def paired(rows: list[dict], name: str, key: str, baseline: str = "grpo", scale: float = 100) -> list[float]:
    """scale × (name − baseline) on `key`, one difference per seed that both ran (same student, same data order)."""
    base = {row["seed"]: row[key] for row in rows if row["method"] == baseline}
    return [scale * (row[key] - base[row["seed"]]) for row in rows if row["method"] == name and row["seed"] in base]


def crossing(curve: list[dict], key: str, threshold: float, x: str = "step") -> float | None:
    """The x ("step" or "wall_s") at which curve[key] first reaches threshold, linear between the two evaluations
    around the crossing (0 if the start is already there); None if it never does."""
    for before, after in itertools.pairwise(curve):
        if before[key] >= threshold:
            return before[x]
        if after[key] >= threshold:
            fraction = (threshold - before[key]) / (after[key] - before[key])
            return before[x] + fraction * (after[x] - before[x])
    return curve[0][x] if curve[0][key] >= threshold else None


def area(curve: list[dict], key: str) -> float:
    """The area under curve[key] against step, divided by the run's steps (trapezoids between evaluations): the
    accuracy averaged over the run, which rewards getting there early."""
    total = sum((b["step"] - a["step"]) * (a[key] + b[key]) / 2 for a, b in itertools.pairwise(curve))
    return total / (curve[-1]["step"] - curve[0]["step"])


def add_efficiency(row: dict, threshold: float) -> dict:
    """The sample-efficiency measures of one run, from its region-A curve: steps and seconds to `threshold` (None if
    never reached), the same capped at the run's budget (a run that never reached it counts as reaching it at the
    end, which understates its gap: conservative for paired differences), and the area under the curve."""
    curve = row["curve"]
    steps, wall = crossing(curve, "id_A", threshold), crossing(curve, "id_A", threshold, x="wall_s")
    return dict(row, a_steps=steps, a_wall=wall, a_steps_capped=curve[-1]["step"] if steps is None else steps,
                a_wall_capped=curve[-1]["wall_s"] if wall is None else wall, a_area=area(curve, "id_A"))


def efficiency_table(rows: list[dict], names: list[str], threshold: float, baseline: str = "grpo") -> str:
    """One row per arm: GRPO's starvation (the fraction of groups whose advantages are all 0, over the first 30
    rewarded steps and over all of them), then steps and seconds to region A ≥ threshold among the seeds that got
    there, and the area under the region-A curve, with paired differences from the baseline."""
    pct = f"{100 * threshold:.0f}%"
    headers = ["zero-adv, first 30", "zero-adv, all", f"reached A ≥ {pct}", "steps to it", "seconds to it",
               "area under A", f"area − {baseline}", f"steps − {baseline} (capped)"]
    lines = ["| arm | n | " + " | ".join(headers) + " |", "|---|---|" + "---|" * len(headers)]
    for name in names:
        runs = [row for row in rows if row["method"] == name and "a_area" in row]  # one per seed
        if not runs:
            continue
        cells = []
        for first in (30, None):
            fractions = [statistics.mean(run["zero_adv"][:first]) for run in runs if run["zero_adv"]]
            cells.append(mean_se(fractions, "{:.2f}") if fractions else "—")
        got = [run for run in runs if run["a_steps"] is not None]
        cells.append(f"{len(got)}/{len(runs)}")
        cells.append(mean_se([run["a_steps"] for run in got], "{:.0f}") if got else "—")
        cells.append(mean_se([run["a_wall"] for run in got], "{:.1f}") if got else "—")
        cells.append(mean_se([100 * run["a_area"] for run in runs], "{:.1f}"))
        for key, scale, fmt in (("a_area", 100, "{:+.1f}"), ("a_steps_capped", 1, "{:+.0f}")):
            diffs = paired(rows, name, key, baseline, scale)
            show = name != baseline and len(diffs) == len(runs)
            cells.append(mean_se(diffs, fmt) if show else "—")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict], names: list[str], baseline: str = "grpo", k: int = 4) -> str:
    """One row per model: greedy accuracy (%) per population, avg@k, length, wall time, and the differences
    from the baseline *paired by seed* (both start from the same student), which removes the spread between
    students that the per-column errors include."""
    avg_keys = (f"id_avg@{k}", f"ood_avg@{k}") if k else ()  # k = 0: no avg@k columns
    headers = [label for _, label in COLUMNS]
    headers += [f"ID avg@{k}", f"OOD avg@{k}"] if k else []
    headers += ["length", "wall (s)", f"ID − {baseline}", f"ID B − {baseline}"]
    lines = ["| model | n | " + " | ".join(headers) + " |", "|---|---|" + "---|" * len(headers)]
    for name in names:
        runs = [row for row in rows if row["method"] == name]  # one per seed
        if not runs:
            continue
        cells = [mean_se([100 * run[key] for run in runs], "{:.1f}") for key, _ in COLUMNS]
        for key in avg_keys:
            cells.append(mean_se([100 * run[key] for run in runs], "{:.1f}") if key in runs[0] else "—")
        cells.append(mean_se([run["length"] for run in runs], "{:.1f}") if "length" in runs[0] else "—")
        cells.append(mean_se([run["wall_s"] for run in runs], "{:.0f}"))
        for key in ("id", "id_B"):
            diffs = paired(rows, name, key, baseline)
            show = name not in (baseline, "teacher", "student (start)") and len(diffs) == len(runs)
            cells.append(mean_se(diffs, "{:+.1f}") if show else "—")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


EFFICIENCY = [("a_area", "area under A", 100), ("a_steps_capped", "steps to the A threshold (capped)", 1)]


def significant(rows: list[dict], names: list[str], baseline: str = "grpo") -> list[str]:
    """The paired differences from the baseline whose mean exceeds two standard errors (needs ≥ 2 seeds): on each
    population, and on the sample-efficiency measures where the rows have them."""
    found = []
    measures = [(key, label, 100) for key, label in COLUMNS]
    measures += [measure for measure in EFFICIENCY if any(measure[0] in row for row in rows)]
    for name in names:
        for key, label, scale in measures:
            diffs = paired(rows, name, key, baseline, scale)
            if name == baseline or len(diffs) < 2:
                continue
            mean = sum(diffs) / len(diffs)
            se = math.sqrt(sum((diff - mean) ** 2 for diff in diffs) / (len(diffs) - 1) / len(diffs))
            if abs(mean) > 2 * se:
                found.append(f"{name} {label}: {mean:+.1f} ± {se:.1f}")
    return found


def plot(out: Path, rows: list[dict], arms: list[str], threshold: float) -> None:
    """curves.png: accuracy vs step (ID, region A with the threshold, region B), the fraction of groups with all-zero
    advantages vs step (rewarded steps only), the per-token KL to the teacher on the training samples vs step (arms
    that score the teacher), region-A accuracy vs wall time. Mean over seeds, band ± 1 s.e."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [("id", "ID accuracy (%)"), ("id_A", "ID region A accuracy (%)"),
              ("id_B", "ID region B accuracy (%) (teacher: bug)")]
    for arm_index, arm in enumerate(arms):
        runs = [row for row in rows if row["method"] == arm]  # one per seed
        if not runs:
            continue
        color = f"C{arm_index % 10}"  # one color per arm in every panel
        style = "--" if arm_index >= 10 else "-"  # the 11th arm on reuses the colors, dashed
        steps = [point["step"] for point in runs[0]["curve"]]
        for ax, (key, label) in zip(axes.flat[:3], panels, strict=True):
            _band(ax, steps, [[100 * point[key] for point in run["curve"]] for run in runs], arm, color, style)
            ax.set(xlabel="step", ylabel=label)
        zero_adv = [_running_mean(run["zero_adv"]) for run in runs]  # the rewarded steps: the last ones of each run
        if all(zero_adv):  # kd-then-grpo: each seed from its own switch on, so None before it
            first = steps[-1] - max(map(len, zero_adv))
            padded = [[None] * (steps[-1] - first - len(curve)) + curve for curve in zero_adv]
            _band(axes.flat[3], list(range(first, steps[-1])), padded, arm, color, style)
        kl_curves = [_kl_curve(out / f"{arm}-seed{run['seed']}") for run in runs]  # the steps that scored the teacher
        if all(kl_curves):  # kd-then-grpo: each seed until its own switch, so None after it
            longest = max(map(len, kl_curves))
            padded = [curve + [None] * (longest - len(curve)) for curve in kl_curves]
            _band(axes.flat[4], list(range(longest)), padded, arm, color, style)
        # the wall time at each curve point, averaged over seeds
        walls = [statistics.mean(run["curve"][i]["wall_s"] for run in runs) for i in range(len(steps))]
        _band(axes.flat[5], walls, [[100 * point["id_A"] for point in run["curve"]] for run in runs], arm, color,
              style)
    for ax in (axes.flat[1], axes.flat[5]):
        ax.axhline(100 * threshold, color="gray", lw=0.8, ls=":")
    axes.flat[3].set(xlabel="step", ylabel="groups with all advantages 0",
                     title="steps with a reward; 10-step running mean")
    axes.flat[4].set(xlabel="step", ylabel="KL(π ‖ π_T) per token (k1, training samples)",
                     title="steps that score the teacher; 10-step running mean")
    axes.flat[5].set(xlabel="wall time (s)", ylabel="ID region A accuracy (%)")
    axes.flat[0].legend(fontsize=7, ncol=2)
    n_seeds = len({row["seed"] for row in rows if row["method"] in arms})
    fig.suptitle(f"post-training from the same students (mean ± s.e. over {n_seeds} seed(s))")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def _band(ax, xs: list[float], ys: list[list], label: str, color: str, style: str = "-") -> None:
    """The mean of the curves ys over seeds at each x, and a band of ± 1 standard error, over the seeds that have a
    value there (None where a seed has none)."""
    mean, se = [], []
    for i in range(len(xs)):
        values = [curve[i] for curve in ys if curve[i] is not None]
        mean.append(statistics.mean(values))
        se.append(statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)
    ax.plot(xs, mean, marker="o", ms=2, lw=1.2, label=label, color=color, ls=style)
    if len(ys) > 1:
        low = [center - error for center, error in zip(mean, se, strict=True)]
        high = [center + error for center, error in zip(mean, se, strict=True)]
        ax.fill_between(xs, low, high, color=color, alpha=0.12)


def _kl_curve(run: Path) -> list[float]:
    """The logged kl_k1 per step, as a running mean; [] when the run scored no teacher."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return _running_mean([row["kl_k1"] for row in rows if not row.get("eval") and "kl_k1" in row])


def _running_mean(xs: list[float], window: int = 10) -> list[float]:
    """The mean of xs over steps i − window + 1 .. i, for each i (fewer at the start)."""
    return [statistics.mean(xs[max(0, i - window + 1) : i + 1]) for i in range(len(xs))]


def lr_grid(p: Preset, lrs: list[float], out: Path, device, cache: Path) -> dict[float, float]:
    """GRPO (the baseline) at each lr from seed 0's student; greedy accuracy on the *validation* split."""
    tok = char_tokenizer()
    data = make_splits(p)
    teacher, _ = get_teacher(p, tok, data, cache, device)
    student, _ = get_student(p, tok, data, 0, device)
    val_accuracy = {}
    for lr in lrs:
        model = copy.deepcopy(student)
        cfg = replace(arm_config("grpo", p, 0, out / f"lr-{lr:g}"), lr=lr)
        with contextlib.redirect_stdout(io.StringIO()):
            train.train(cfg, model, teacher, tok, data["train"], kdrl.math_reward)
        val_accuracy[lr] = accuracy(model, tok, data["val"], p)
        print(f"lr {lr:g}: grpo validation accuracy {val_accuracy[lr]:.1%}")
    return val_accuracy


# The demo's jobs. Each worker process builds the data and loads the (cached) teacher once; every job then runs on
# one thread, so that its numbers do not depend on how many jobs share the machine, or on which worker runs it.
_WORKER: dict = {}


def _init_worker(p: Preset, out: Path, cache: Path, device, teacher=None) -> None:
    torch.set_num_threads(1)
    tok, data = char_tokenizer(), make_splits(p)
    if teacher is None:
        with contextlib.redirect_stdout(io.StringIO()):  # "teacher: cached at ..." once is enough
            teacher, _ = get_teacher(p, tok, data, cache, device)
    _WORKER.update(p=p, out=out, device=device, tok=tok, data=data, teacher=teacher)


def _jobs(fn, items: list, p: Preset, out: Path, cache: Path, device, workers: int, teacher):
    """fn over items, in this process (workers = 1) or in a pool of `workers` processes; results as they finish."""
    if workers <= 1:
        _init_worker(p, out, cache, device, teacher)
        yield from map(fn, items)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (p, out, cache, device)) as pool:
        yield from pool.imap_unordered(fn, items)
        pool.close()  # let the workers exit by themselves (the with-block's terminate() leaks their semaphores)
        pool.join()


def _start_job(seed: int) -> tuple:
    """A seed's student start: (seed, its weights, its row on the full test, its evaluation on the curves' subsets)."""
    p, tok, data, device = (_WORKER[key] for key in ("p", "tok", "data", "device"))
    student, wall = get_student(p, tok, data, seed, device)
    start_row = dict(method="student (start)", seed=seed, wall_s=wall, **evaluate(student, tok, subsets(data), p,
                                                                                 k=p.avg_k))
    full_sizes = {name: len(exs) for name, exs in subsets(data).items()}
    start_few = evaluate(student, tok, subsets(data, p.eval_subset), p, sizes=full_sizes)
    return seed, {name: tensor.cpu() for name, tensor in student.state_dict().items()}, start_row, start_few


def _arm_job(job: tuple) -> dict:
    """One arm from one seed's student start: run_arm's row, with the sample-efficiency measures."""
    seed, arm, state, start_few = job
    p, tok, data, device, teacher, out = (_WORKER[key] for key in ("p", "tok", "data", "device", "teacher", "out"))
    student = new_model(tok, p.student, seed=100 + seed).to(device)
    student.load_state_dict(state)
    student.eval()
    row = run_arm(arm, p, seed, student, teacher, tok, data, start_few, out)
    return add_efficiency(row, p.a_threshold)


def teacher_evaluation(teacher, tok, full: dict, p: Preset, cache_dir: Path) -> dict:
    """evaluate() of the teacher on the full populations, cached beside it (it never changes for one teacher)."""
    key = dict(sizes={name: len(exs) for name, exs in full.items()}, k=p.avg_k, max_new_tokens=p.rl["max_new_tokens"],
               temperature=p.rl["temperature"])
    path = cache_dir / ("eval-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12] + ".json")
    if path.exists():
        return json.loads(path.read_text())
    results = evaluate(teacher, tok, full, p, k=p.avg_k)
    path.write_text(json.dumps(results))
    return results


def run_demo(p: Preset, preset: str, arms: list[str], out: Path, device, start: str = "mid",
             first_seed: int = 0, workers: int = 1, cache: Path | None = None) -> dict:
    """The whole comparison on one thread per process (the teacher too), restoring the caller's thread count: tiny
    models gain little from a second thread, and on a busy machine waiting threads spin and slow everything down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(p, preset, arms, out, device, start, first_seed, workers, cache)
    finally:
        torch.set_num_threads(threads)


def _run_demo(p: Preset, preset: str, arms: list[str], out: Path, device, start: str, first_seed: int, workers: int,
              cache: Path | None) -> dict:
    t_start = time.time()
    cache = cache or out / "cache"
    tok = char_tokenizer()
    data = make_splits(p)
    full = subsets(data)  # the reported populations, whole
    few = subsets(data, p.eval_subset)  # the curves' cheaper subsets
    full_sizes = {name: len(exs) for name, exs in full.items()}
    seeds = range(first_seed, first_seed + p.seeds)
    names = ["teacher", "student (start)", *arms]
    sizes = ", ".join(f"{name} {n}" for name, n in full_sizes.items())
    first = data["train"][0]
    print(f"preset {preset} | start {start} (student stopped at {p.student_target:.0%}) | {len(data['train'])} train, "
          f"{len(data['val'])} val | test: {sizes} | arms: {', '.join(arms)} | {p.seeds} seed(s) | "
          f"e.g. {first['prompt']}{first['solution']}")
    teacher_dir = teacher_path(p, cache)
    print(expected_duration(p, arms, device, cached=(teacher_dir / "meta.json").exists()), flush=True)
    teacher, meta = get_teacher(p, tok, data, cache, device)
    teacher_row = dict(method="teacher", seed=0, wall_s=meta["train_s"],
                       **teacher_evaluation(teacher, tok, full, p, teacher_dir))
    rows = [teacher_row]
    print(f"teacher: ID A {teacher_row['id_A']:.1%} | ID B {teacher_row['id_B']:.1%} (carry-dropping by design) | "
          f"OOD {teacher_row['ood']:.1%}")
    if preset != "smoke" and not (teacher_row["id_A"] >= 0.8 and teacher_row["id_B"] <= 0.2):
        print("warning: the teacher is not 'strong on A, wrong on B' as designed; the comparison below tests nothing")
    # The work runs as independent jobs, in `workers` processes of one thread each (the same numbers for any number
    # of workers): first each seed's student start, then every (seed, arm) from that seed's student.
    starts = {}
    for seed, state, start_row, start_few in _jobs(_start_job, list(seeds), p, out, cache, device, workers, teacher):
        starts[seed] = (state, start_few)
        rows.append(start_row)
        print(f"seed {seed} student start: ID {start_row['id']:.1%} (A {start_row['id_A']:.1%}, "
              f"B {start_row['id_B']:.1%}) | OOD {start_row['ood']:.1%} | {start_row['wall_s']:.0f}s", flush=True)
    jobs = [(seed, arm, *starts[seed]) for seed in seeds for arm in arms]
    for row in _jobs(_arm_job, jobs, p, out, cache, device, workers, teacher):
        rows.append(row)
        zero_adv = f"{statistics.mean(row['zero_adv'][:30]):.2f}" if row["zero_adv"] else "—"
        reached = f"{row['a_steps']:.0f}" if row["a_steps"] is not None else "never"
        print(f"seed {row['seed']} {row['method']}: ID {row['id']:.1%} (A {row['id_A']:.1%}, B {row['id_B']:.1%}) | "
              f"OOD {row['ood']:.1%} (seen {row['ood_seen']:.1%}, unseen {row['ood_unseen']:.1%}) | "
              f"zero-adv (first 30) {zero_adv} | A ≥ {p.a_threshold:.0%} at step {reached} | "
              f"area A {100 * row['a_area']:.1f} | {row['wall_s']:.0f}s + eval {row['eval_s']:.0f}s", flush=True)
    order = {(seed, name): i for i, (seed, name) in enumerate((seed, name) for seed in seeds for name in names)}
    rows = [rows[0], *sorted(rows[1:], key=lambda row: order[row["seed"], row["method"]])]
    total = time.time() - t_start
    significant_diffs = significant(rows, arms)
    listed = "; ".join(significant_diffs) if significant_diffs else "none"
    runs = [row for row in rows if row["method"] in arms]
    train_s, eval_s = sum(row["wall_s"] for row in runs), sum(row["eval_s"] for row in runs)
    starts_s = sum(row["wall_s"] for row in rows if row["method"] == "student (start)")
    avg = (f"avg@{p.avg_k} is the mean accuracy of {p.avg_k} samples per problem at T = {p.rl['temperature']}. "
           if p.avg_k else "")
    switches = [row["switch_step"] for row in runs if row["method"] == "kd-then-grpo"]
    report = (
        f"# Results: preset `{preset}`, start `{start}`, device {device}, {p.seeds} seed(s), total {total:.0f}s "
        f"(post-training {train_s:.0f}s, its evaluations {eval_s:.0f}s, student starts {starts_s:.0f}s)\n\n"
        f"Greedy accuracy (%) on {len(data['test'])} ID test problems "
        f"(region A: {len(full['id_A'])}, region B: {len(full['id_B'])}) "
        f"and {len(data['ood'])} OOD problems "
        f"(seen steps: {len(full['ood_seen'])}, an unseen step: {len(full['ood_unseen'])}). {avg}"
        f"Mean ± standard error over seeds; the last two columns are differences from grpo paired by seed. "
        f"Length: mean response length of the last 10 training steps (sft, sft-all: the teacher's samples). "
        f"Wall: post-training, evaluations excluded (teacher: its supervised training; student: its start).\n\n"
        + table(rows, names, k=p.avg_k) + "\n\n"
        f"Sample efficiency on region A. zero-adv: the fraction of groups whose rewards are all equal, so that GRPO's "
        f"advantages are 0 (steps with a reward only: none for kd, sft, sft-all; kd-then-grpo from its switch). The "
        f"curve is evaluated every {max(1, p.rl['steps'] // p.eval_points)} steps on {len(few['id_A'])} region-A "
        f"problems "
        f"(the last point on all {len(full['id_A'])}); steps and seconds to A ≥ {p.a_threshold:.0%} are interpolated "
        f"between evaluations, averaged over the seeds that got there; a seed that never did counts as its budget in "
        f"the paired `steps − grpo`. Area: region-A accuracy averaged over the run (%)."
        + (f" kd-then-grpo switched to GRPO at steps {switches}." if switches else "") + "\n\n"
        + efficiency_table(rows, arms, p.a_threshold) + "\n\n"
        + "Paired differences from grpo beyond two standard errors: " + listed + ".\n"
    )
    print("\n" + report)
    (out / "results.md").write_text(report)
    raw = dict(preset=preset, start=start, device=str(device), settings=asdict(p), demo_scale=DEMO_SCALE,
               beta_arms=BETA_ARMS, sequential=SEQUENTIAL, total_s=total, rows=rows)
    (out / "results.json").write_text(json.dumps(raw, indent=2))
    plot(out, rows, arms, p.a_threshold)
    return dict(rows=rows, out=str(out), significant=significant_diffs)


# What the duration printed before a run rests on, per device: seconds of one job (one thread) per post-training step
# of 8 prompts × 8 samples ("step"; the arms that score with the teacher take teacher_scored times as long, those that
# sample it teacher_sampled times), per 1,000 greedy evaluations, per student start, per supervised teacher step.
# cpu: measured on this project's 2-core machine, quiet, with two jobs side by side as the cpu preset runs them (each
# is slower than alone: 0.25 s a grpo step, against 0.17 s for one job alone), from the 3-seed run in docs/results.md
# (985 s; this table predicts 956 s) and a fresh clone's teacher (271 s, 800 steps); cuda: assumed, not measured (no
# GPU was lent): tiny models leave a GPU waiting on Python, ~5 ms per sampled token whatever the batch, so a step
# costs about the same at 32 prompts as at 8.
STEP_COST = dict(
    cpu=dict(step=0.25, per_prompt=1.0, teacher_scored=1.4, teacher_sampled=1.43, eval_1000=1.1, start=20.0,
             teacher_step=0.34, source="measured on this project's 2-core CPU machine, two jobs side by side"),
    cuda=dict(step=0.25, per_prompt=0.0, teacher_scored=1.15, teacher_sampled=1.3, eval_1000=0.3, start=5.0,
              teacher_step=0.03, source="assumed for an H100-class GPU, not measured"),
)


def expected_duration(p: Preset, arms: list[str], device, cached: bool) -> str:
    """One line: the run's expected duration from STEP_COST, and what the estimate rests on."""
    cost = STEP_COST["cuda" if device.type == "cuda" else "cpu"]
    step = cost["step"] * (1 + cost["per_prompt"] * (p.rl["prompts_per_step"] / 8 - 1))  # at this batch
    per_seed = cost["start"]
    for arm in arms:
        cfg = arm_config(arm, p, 0, Path("unused"))
        factor = cost["teacher_sampled"] if cfg.sft else cost["teacher_scored"] if kdrl.needs_teacher(cfg) else 1.0
        problems = (p.eval_points - 1) * 1.5 * p.eval_subset + (p.n_test + p.n_ood) * (1 + p.avg_k)
        per_seed += cfg.steps * step * factor + problems / 1000 * cost["eval_1000"]
    seconds = p.seeds * per_seed / max(1, min(p.workers, p.seeds * len(arms)))  # jobs side by side
    teacher = "" if cached else f", plus up to {p.teacher_steps * cost['teacher_step'] / 60:.0f} min for the teacher"
    return (f"expected duration: about {seconds / 60:.0f} min{teacher} ({p.seeds} seeds × {len(arms)} arms over "
            f"{p.workers} worker(s); an estimate from {step:.2f} s per training step and {cost['eval_1000']:.1f} s "
            f"per 1,000 evaluated problems, {cost['source']})")


# -----------------------------------------------------------------------------
# Main.


def main(argv=None) -> dict:
    arm_names = [*kdrl.METHODS, *BETA_ARMS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="default: gpu on CUDA (see --device), else cpu")
    parser.add_argument("--out", default="runs/tiny", help="output directory")
    parser.add_argument("--cache", default=None, help="where the teacher is cached (default: <out>/cache)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="post-training steps of every arm (default: the preset's, 150 on cpu)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes running the jobs side by side, one thread each (default: the preset's)")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds − 1")
    parser.add_argument("--start", choices=list(STARTS), default="mid",
                        help="the student's supervised start: mid (20%%) or weak (5%%, GRPO starves); see STARTS")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated arms, 'predictions' (the arms that test the predictions) or 'all' "
                             f"(default: the preset's); choose from {arm_names}")
    parser.add_argument("--lr-grid", default=None, metavar="LRS",
                        help="comma-separated lrs: run GRPO at each, print its validation accuracy, exit")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device of the demo and --lr-grid (default: auto, cuda when available)")
    args = parser.parse_args(argv)
    try:
        device = train.resolve_device(args.device)
    except kdrl.KDRLError as e:
        parser.error(str(e))
    if args.preset is None:
        args.preset = "gpu" if device.type == "cuda" else "cpu"
        if args.preset == "gpu":
            print("GPU found: using the gpu preset")
        elif torch.cuda.is_available():
            print("--device cpu: using the cpu preset (--preset gpu/smoke to override)")
        else:
            print("no GPU found: using the cpu preset (--preset gpu/smoke to override)")
    p = PRESETS[args.preset]
    for name in ("seeds", "steps", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be >= 1")
    rl = {**p.rl, "steps": args.steps or p.rl["steps"]}
    p = replace(p, seeds=args.seeds or p.seeds, workers=args.workers or p.workers, rl=rl,
                **(STARTS[args.start] if args.preset != "smoke" else {}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "cache"
    if args.lr_grid:
        return dict(lr_grid=lr_grid(p, [float(lr) for lr in args.lr_grid.split(",")], out, device, cache))
    arms = [arm for arm in args.methods.split(",") if arm] if args.methods else list(p.arms or arm_names)
    arms = arm_names if arms == ["all"] else list(PREDICTION_ARMS) if arms == ["predictions"] else arms
    if bad := [arm for arm in arms if arm not in arm_names]:
        parser.error(f"unknown arms {bad}; choose from {arm_names}")
    return run_demo(p, args.preset, arms, out, device, args.start, args.first_seed, p.workers, cache)


if __name__ == "__main__":
    main()
