"""
train_tiny.py: the KDRL comparison on tiny models, from scratch, with no downloads, run as an experiment.

    python train_tiny.py                   # cpu preset without a GPU: 2 seeds, the 5 arms the primaries need
    python train_tiny.py --seeds 12        # the preregistered run (docs/preregistration.md, docs/results.md)
    python train_tiny.py --tune            # each arm's lr (and β) on the validation split → tiny_settings.json
    python train_tiny.py --preset smoke    # about 10 s, every arm, tiny everything: the plumbing, not the methods

Task: 2-digit addition worked column by column, units first: `47+85=` → `7+5=12|4+8+1=13|#### 132`, scored by
kdrl.math_reward (the last `#### x`). The benches, --save-pair and the GPU check are in bench.py.

The regime (why this design; docs/results.md has the pilot behind it). The papers claim two mechanisms, and each
needs its own part of the task, so that one cannot hide the other:
- The skill the teacher teaches is the units carry (`+1` in the tens column); the teacher trains until it knows it.
  The student's start sees carries in 3% of its problems and stops once reliable without them: it solves few carry
  problems, so GRPO's groups there are mostly all wrong (its no-carry groups all right), yet it is *uncertain* at
  its weakest carry token, not confidently wrong, so reverse KL has a gradient to give (PAPERS.md's dead zone).
- The teacher's bug sits on another skill, the final answer: where both tens digits are ≥ 5 ("region B") it drops
  the hundreds digit (`47+85=` → `...|4+8+1=13|#### 32`). The start writes it, so imitation has something to lose
  there and the reward something to defend (a bug on the carry itself erased the carry first: the pilot).
Post-training draws carry problems half the time (the skill to learn), for 200 steps of 8 prompts × 8 samples.

Four preregistered primaries (PRIMARIES) with a paired test on the seeds (t on n − 1 df, and the exact sign-flip test)
and Holm's correction; a positive control (CONTROL: filtered SFT must learn the carry); each arm at its own lr (and β)
from the validation split (tiny_settings.json, by --tune). Everything else is exploratory. Pipeline: the teacher
(cached in <out>/cache), each seed's student start, then every (seed, arm) job from that start, post-trained by
train.train in resumed segments with the curve subsets evaluated after each and all 3,000 ID and 900 OOD problems at
the end, in `workers` processes of one thread each (the numbers do not depend on how many).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import math
import operator
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
# Presets, the preregistered comparisons, the tuned settings.


@dataclass
class Preset:
    n_train: int = 4000
    """train problems (the supervised starts and the post-training prompts are drawn from them)"""
    n_val: int = 200
    """validation problems (ID): --tune chooses the settings on them, kd-then-grpo its switch; never reported"""
    n_test: int = 3000
    """ID test problems: every 2-digit problem outside train, val and OOD"""
    teacher: dict = field(default_factory=lambda: dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4))
    """teacher architecture (LlamaConfig fields)"""
    teacher_steps: int = 700
    """the teacher's cosine schedule length and step cap; it stops once it knows the skill and its bug"""
    student: dict = field(default_factory=lambda: dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    """student architecture: smaller than the teacher"""
    start_carry: float = 0.03
    """share of carry problems in the student's supervised start (the rest: no carry)"""
    student_steps: int = 500
    """step cap of the student's start; it stops once greedy no-carry accuracy on 100 train problems is ≥ 0.97"""
    rl: dict = field(default_factory=dict)
    """KDRLConfig fields shared by every arm (lr and β come from tiny_settings.json)"""
    arms: tuple = ()
    """the arms run by default (() runs every arm)"""
    seeds: int = 2
    """seeds (student init, its start's data, the data order, sampling); each arm runs from each seed's student"""
    workers: int = 1
    """processes running the (seed, arm) jobs side by side, one thread each (the numbers do not depend on it)"""
    eval_points: int = 10
    """evaluations of the curve subsets during post-training (200 carry, 200 B, 100 no-carry problems)"""


RL = dict(steps=200, prompts_per_step=8, group_size=8, max_new_tokens=28, temperature=1.0, minibatch_size=64)
ARMS = ("grpo", "kd", "kdrl", "sft", "kd-then-grpo")  # the primaries' arms and the positive control
PRESETS = {
    "smoke": Preset(n_train=300, n_val=16, n_test=60, teacher_steps=20, student_steps=5, seeds=1, eval_points=2,
                    teacher=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2),
                    student=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
                    rl={**RL, "steps": 2, "prompts_per_step": 2, "group_size": 2}),
    "cpu": Preset(rl=RL, arms=ARMS, workers=2),  # 2 cores: one single-threaded job on each
    "gpu": Preset(rl=RL, arms=ARMS, seeds=12, workers=4),  # the preregistered run's size; no GPU has run it yet
}
# The preregistered primaries (docs/preregistration.md): arm − base on a measure, paired by seed, the
# papers' direction being arm above base; δ: the effect (points) the seeds are sized for; sd: the pilot's.
PRIMARIES = [dict(zip(("claim", "arm", "base", "measure", "delta", "sd"), primary, strict=True)) for primary in (
    ("KD is sample-efficient where GRPO starves", "kd", "grpo", "area_carry", 2.0, 1.84),
    ("imitation inherits the bug, the reward corrects it", "kdrl", "kd", "id_B", 15.0, 11.91),
    ("the joint loss beats RL", "kdrl", "grpo", "id", 1.5, 1.33),
    ("distilling first, then RL, beats the joint loss", "kd-then-grpo", "kdrl", "id", 1.5, 1.42))]
CONTROL = dict(arm="sft", measure="gain_carry", threshold=10.0)  # SFT's carry accuracy end − start, seed mean
MEASURES = dict(area_carry="area under the carry curve", id_B="region B at the end", id="ID at the end",
                gain_carry="carry accuracy gained")
# kd-then-grpo: KD until the validation accuracy (100 problems, at every curve point) has not beaten its best for
# `patience` evaluations, or until `latest` × steps, then GRPO.
SEQUENTIAL = dict(patience=2, latest=2 / 3, eval_limit=100)
SETTINGS = Path(__file__).resolve().parent / "tiny_settings.json"
GRID = dict(grpo=[dict(lr=1e-4), dict(lr=3e-4)], kd=[dict(lr=1e-4), dict(lr=3e-4)],
            kdrl=[dict(lr=1e-4, beta=0.1), dict(lr=3e-4, beta=0.1), dict(lr=3e-4, beta=0.3)],
            sft=[dict(lr=1e-4), dict(lr=3e-4)], **{"kd-then-grpo": [dict(lr=1e-4), dict(lr=3e-4)]})
TUNE_SEEDS = (1000, 1001)  # never reported
FALLBACK = {"sft-all": "sft", "rlad": "grpo"}  # an arm without settings of its own takes these (else kdrl's)
CURVE = dict(carry=200, B=200, nocarry=100)  # the curves' subsets of each population
VOCAB = "0123456789+=|# "

# -----------------------------------------------------------------------------
# Task: additions with worked solutions; the teacher's bug; the populations.


def solution(a: int, b: int, drop_hundreds: bool = False) -> str:
    """Column-by-column working, units first: `7+5=12|4+8+1=13|#### 132`; drop_hundreds: the teacher's bug in region
    B, an answer without its hundreds digit (`...|4+8+1=13|#### 32`), the working right."""
    steps, carry, total = [], 0, 0
    for i in range(2):  # column i, units first: place value 10**i
        digit_a, digit_b = a // 10**i % 10, b // 10**i % 10
        column_sum = digit_a + digit_b + carry
        steps.append(f"{digit_a}+{digit_b}" + ("+1" if carry else "") + f"={column_sum}")
        total += column_sum % 10 * 10**i
        carry = column_sum // 10
    return "|".join(steps) + f"|#### {total + (0 if drop_hundreds else carry * 100)}"


def example(a: int, b: int) -> dict:
    """A problem and its solutions. Region B: both tens digits ≥ 5 (a hundreds digit), where the teacher's drop it."""
    region_b = a // 10 >= 5 and b // 10 >= 5
    buggy = solution(a, b, drop_hundreds=region_b)
    return dict(prompt=f"{a}+{b}=", answer=str(a + b), solution=solution(a, b), teacher_solution=buggy,
                teacher_answer=buggy.split("#### ")[1], region="B" if region_b else "A", carry=a % 10 + b % 10 >= 10)


def make_splits(p: Preset, seed: int = 1234) -> dict[str, list[dict]]:
    """Disjoint splits, a fixed seed so every run sees the same data. ood: every problem whose tens digits are equal
    (77+74=; all 900); train / val / test: the others, shuffled."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    ood = [example(a, b) for a, b in pairs if a // 10 == b // 10]
    rows = [example(a, b) for a, b in pairs if a // 10 != b // 10][: p.n_train + p.n_val + p.n_test]
    cuts = [p.n_train, p.n_train + p.n_val]
    return dict(train=rows[: cuts[0]], val=rows[cuts[0] : cuts[1]], test=rows[cuts[1] :], ood=ood)


def populations(rows: list[dict], limits: dict | None = None) -> dict[str, list[dict]]:
    """carry (region A, a units carry: the skill), nocarry (region A, none), B (the teacher's bug); limits: the first
    so many of each (the curves' subsets)."""
    pops = dict(carry=[ex for ex in rows if ex["region"] == "A" and ex["carry"]],
                nocarry=[ex for ex in rows if ex["region"] == "A" and not ex["carry"]],
                B=[ex for ex in rows if ex["region"] == "B"])
    return {name: exs[: (limits or {}).get(name)] for name, exs in pops.items()}


def drawn(groups: list[list[dict]], weights: list[float], n: int, seed: int) -> list[dict]:
    """n rows, each from groups[i] with probability ∝ weights[i] (a post-training or supervised mix)."""
    rng = random.Random(seed)
    return [rng.choice(rng.choices(groups, weights=weights)[0]) for _ in range(n)]


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
# Models: random-init Llamas and their supervised training (demo plumbing, not part of KDRL).


def new_model(tok, arch: dict, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), intermediate_size=4 * arch["hidden_size"],
                      num_key_value_heads=arch["num_attention_heads"], max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=True, **arch)
    return LlamaForCausalLM(cfg)


def supervised(model, tok, examples: list[dict], steps: int, seed: int, desc: str, check=None, check_every: int = 10,
               target: str = "solution", schedule: bool = False, lr: float = 3e-3, batch: int = 64):
    """Next-token NLL on prompt → ex[target] + EOS, loss on the response only. schedule: linear warmup over 50
    steps, then cosine decay to 5% of lr at `steps`, gradients clipped at 1 (the teacher: without them lr 3e-3
    collapsed twice in the pilot). check() every check_every steps may return True to stop early."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    device = next(model.parameters()).device
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc, dynamic_ncols=True, leave=False, disable=None)):
        if schedule:
            warm, cosine = min(1.0, (step + 1) / 50), 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.param_groups[0]["lr"] = lr * warm * (0.05 + 0.95 * cosine)
        seqs = [(tok(ex["prompt"])["input_ids"], tok(ex[target])["input_ids"] + [tok.eos_token_id])
                for ex in rng.sample(examples, batch)]  # (prompt ids, response ids + EOS)
        L = max(len(prompt) + len(response) for prompt, response in seqs)  # the longest sequence
        ids = torch.tensor([prompt + response + [tok.pad_token_id] * (L - len(prompt) - len(response))
                            for prompt, response in seqs], device=device)  # (B, L) right-padded
        labels = torch.tensor([[-100] * len(prompt) + response + [-100] * (L - len(prompt) - len(response))
                               for prompt, response in seqs], device=device)  # (B, L): -100 outside the response
        lengths = torch.tensor([len(prompt) for prompt, _ in seqs], device=device)  # (B,)
        attention = (labels != -100) | (torch.arange(L, device=device) < lengths[:, None])  # (B, L)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0 if schedule else math.inf)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if check and (step + 1) % check_every == 0:
            model.eval()
            if check():
                break
            model.train()
    return model.eval()


@torch.no_grad()
def accuracy(model, tok, examples: list[dict], answer: str = "answer") -> float:
    """Greedy accuracy against ex[answer] (nan for no problem)."""
    if not examples:
        return float("nan")
    hits = 0.0
    for start in range(0, len(examples), 512):
        chunk = examples[start : start + 512]
        rollouts = kdrl.sample_rollouts(model, tok, [ex["prompt"] for ex in chunk], 1, RL["max_new_tokens"], 0.0)
        texts = kdrl.decode(tok, rollouts)
        golds = [dict(ex, answer=ex[answer]) for ex in chunk]
        hits += sum(kdrl.math_reward(g["prompt"], text, g) for g, text in zip(golds, texts, strict=True))
    return hits / len(examples)


@torch.no_grad()
def weakest_token(model, tok, examples: list[dict]) -> dict:
    """Teacher-forced on each correct solution, the token the model gives the lowest probability: that probability and
    the entropy there, medians. Confidently wrong: both near 0 (reverse KL's dead zone); uncertain: a real entropy."""
    probs, entropies = [], []
    device = next(model.parameters()).device
    for ex in examples:
        prompt, ids = tok(ex["prompt"])["input_ids"], tok(ex["solution"])["input_ids"] + [tok.eos_token_id]
        logits = model(input_ids=torch.tensor([prompt + ids], device=device)).logits[0, len(prompt) - 1 : -1]
        logp = torch.log_softmax(logits[:, : len(tok)].float(), -1)  # (n, V): each next token of the solution
        t = int(logp.gather(1, torch.tensor(ids, device=device)[:, None]).argmin())  # the weakest position
        probs.append(logp[t, ids[t]].exp().item())
        entropies.append(-(logp[t].exp() * logp[t]).sum().item())
    return dict(weakest_p=statistics.median(probs), weakest_entropy=statistics.median(entropies))


def evaluate(model, tok, data: dict, split: str = "test", curve: bool = False) -> dict:
    """Greedy accuracy on each population of data[split] (the curve's subsets, or all of them, the whole split "id",
    OOD by whether it needs a step unseen in training: a tens carry, and weakest_token on the carry subset)."""
    pops = populations(data[split], CURVE if curve else None)
    out = {f"id_{name}": accuracy(model, tok, exs) for name, exs in pops.items()}
    if not curve:
        out["id"] = sum(out[f"id_{name}"] * len(exs) for name, exs in pops.items()) / len(data[split])
        out["ood_seen"], out["ood_unseen"] = (accuracy(model, tok, [e for e in data["ood"] if e["carry"] is unseen])
                                              for unseen in (False, True))
        out.update(weakest_token(model, tok, populations(data[split], CURVE)["carry"]))
    return out


def get_teacher(tok, data, p: Preset, cache: Path, device):
    """Train the teacher on its buggy solutions (no carry : carry : B drawn 2:1:1) until, on 200 train problems each,
    it is ≥ 97% right on carries, ≥ 98% without, and writes its bug on ≥ 95% of B; or load it from cache."""
    settings = dict(arch=p.teacher, steps=p.teacher_steps, n_train=p.n_train, vocab=VOCAB, bug="drop-hundreds-in-B",
                    recipe="mix 2:1:1, warmup 50, clip 1, cosine")
    path = cache / ("teacher-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12])
    if (path / "meta.json").exists():
        model = LlamaForCausalLM.from_pretrained(path).to(device).eval().requires_grad_(False)
        return model, json.loads((path / "meta.json").read_text())
    t0 = time.time()
    model = new_model(tok, p.teacher, seed=0).to(device)
    pops = populations(data["train"])
    rows = drawn([pops["nocarry"], pops["carry"], pops["B"]], [2, 1, 1], 20_000, seed=7)

    def knows_it() -> bool:
        return (accuracy(model, tok, pops["carry"][:200]) >= 0.97 and accuracy(model, tok, pops["B"][:200],
                "teacher_answer") >= 0.95 and accuracy(model, tok, pops["nocarry"][:200]) >= 0.98)

    supervised(model, tok, rows, p.teacher_steps, 0, "teacher (supervised, with its bug)", knows_it, 25,
               target="teacher_solution", schedule=True)
    meta = dict(train_s=time.time() - t0, settings=settings)
    model.save_pretrained(path)
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return model.requires_grad_(False), meta


def get_student(tok, data, p: Preset, seed: int, device):
    """A fresh small student, supervised on correct solutions of which start_carry are carry problems, stopped once it
    is ≥ 97% right without a carry on 100 train problems (checked every 10 steps); (model, seconds)."""
    t0 = time.time()
    model = new_model(tok, p.student, seed=100 + seed).to(device)
    carry, plain = ([ex for ex in data["train"] if ex["carry"] is has_carry] for has_carry in (True, False))
    rows = drawn([carry, plain], [p.start_carry, 1 - p.start_carry], p.n_train, seed)

    def reliable() -> bool:
        return accuracy(model, tok, plain[:100]) >= 0.97

    supervised(model, tok, rows, p.student_steps, seed, f"student seed {seed} (start)", reliable)
    return model, time.time() - t0


# -----------------------------------------------------------------------------
# Post-training: every arm from the same student start, via train.train, in segments with an evaluation after each.

def arm_config(arm: str, p: Preset, seed: int, out: Path, settings: dict) -> kdrl.KDRLConfig:
    """from_method(arm), the demo's fields, the arm's tuned lr (and β where KD is balanced against a reward) or else
    FALLBACK's or kdrl's (kdrl-anneal: β → β/5 over 80/280 of the run, the paper's shape; kdrl-seq keeps its own β,
    in reward units); kd-then-grpo gets SEQUENTIAL's switch."""
    tuned = settings.get(arm) or settings[FALLBACK.get(arm, "kdrl")]
    cfg = kdrl.KDRLConfig.from_method(arm, **p.rl, lr=tuned["lr"], seed=seed, out=str(out), progress=False)
    if cfg.use_reward and cfg.kd_mode == "loss" and cfg.beta > 0:
        decay = dict(beta_min=tuned["beta"] / 5, beta_decay_steps=max(1, round(cfg.steps * 80 / 280)))
        cfg = replace(cfg, beta=tuned["beta"], **(decay if cfg.beta_min is not None else {}))
    if cfg.switch_step:
        cfg = replace(cfg, switch_step=max(1, round(cfg.steps * SEQUENTIAL["latest"])),
                      switch_patience=SEQUENTIAL["patience"], eval_every=max(1, cfg.steps // p.eval_points),
                      eval_limit=SEQUENTIAL["eval_limit"])
    return cfg


def run_arm(arm, p: Preset, seed: int, student, teacher, tok, data, start: dict, out: Path, settings: dict,
            split: str = "test") -> dict:
    """Post-train `student` with `arm` in eval_points segments (train.train resumed, bit-exact), the curve subsets
    evaluated after each, all of data[split] after the last; start: the student's evaluations ("curve", "full")."""
    cfg = arm_config(arm, p, seed, out / f"{arm}-seed{seed}", settings)
    wall = eval_s = 0.0  # seconds of post-training and of the demo's evaluations
    curve = [dict(step=0, wall_s=0.0, **start["curve"])]
    ends = sorted({max(1, round(cfg.steps * (i + 1) / p.eval_points)) for i in range(p.eval_points)})
    prompts = populations(data["train"])
    prompts = drawn([prompts["nocarry"], prompts["carry"], prompts["B"]], [1, 2, 1], p.n_train, seed)
    for segment, end in enumerate(ends):
        switched = segment > 0 and train.read_checkpoint(Path(cfg.out) / "checkpoint")["switch"]["at"] is not None
        eval_set = data["val"] if cfg.switch_patience and not switched else None
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its notes
            summary = train.train(replace(cfg, steps=end, resume=segment > 0), student, teacher, tok, prompts,
                                  kdrl.math_reward, eval_set)
        validation = summary["time"].get("eval", 0.0)  # kd-then-grpo's evaluations for its switch
        wall += time.time() - t0 - validation
        t0 = time.time()
        last = evaluate(student, tok, data, split) if segment + 1 == len(ends) else None
        curve.append(dict(step=end, wall_s=wall, **evaluate(student, tok, data, split, curve=True)))
        eval_s += validation + time.time() - t0
    steps = [row for row in map(json.loads, (Path(cfg.out) / "metrics.jsonl").read_text().splitlines())
             if not row.get("eval")]
    zero_adv = [row["zero_adv_frac"] for row in steps if "zero_adv_frac" in row and row.get("phase") != "kd"]
    switch = next((row["step"] for row in steps if row.get("phase") == "grpo"), None)
    return dict(method=arm, seed=seed, lr=cfg.lr, beta=cfg.beta, wall_s=wall, eval_s=eval_s, curve=curve,
                zero_adv=zero_adv if cfg.use_reward or cfg.switch_step else [], switch_step=switch,
                area_carry=area(curve, "id_carry"), gain_carry=last["id_carry"] - start["full"]["id_carry"], **last)


def area(curve: list[dict], key: str) -> float:
    """The area under curve[key] against step over the run's steps (trapezoids): the accuracy averaged over the run."""
    total = sum((b["step"] - a["step"]) * (a[key] + b[key]) / 2 for a, b in itertools.pairwise(curve))
    return total / (curve[-1]["step"] - curve[0]["step"])


# The jobs. Each worker process builds the data and loads the (cached) teacher once; every job then runs on one
# thread, so that its numbers do not depend on how many jobs share the machine, or on which worker runs it.
_WORKER: dict = {}


def _init_worker(p: Preset, cache: Path, device, split: str, teacher=None) -> None:
    torch.set_num_threads(1)
    tok, data = char_tokenizer(), make_splits(p)
    teacher = get_teacher(tok, data, p, cache, device)[0] if teacher is None else teacher
    _WORKER.update(p=p, device=device, tok=tok, data=data, teacher=teacher, split=split)


def _jobs(fn, items: list, workers: int, args: tuple, teacher):
    """fn over items, in this process (workers = 1) or in a pool of `workers` processes; results as they finish."""
    if workers <= 1:
        _init_worker(*args, teacher)
        yield from map(fn, items)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, args) as pool:
        yield from pool.imap_unordered(fn, items)
        pool.close()  # let the workers exit by themselves (the with-block's terminate() leaks their semaphores)
        pool.join()


def _start_job(seed: int) -> tuple:
    """A seed's student start: (seed, its weights, its evaluations: "full" on the split, "curve" on the subsets)."""
    p, tok, data, device, split = (_WORKER[key] for key in ("p", "tok", "data", "device", "split"))
    student, wall = get_student(tok, data, p, seed, device)
    start = dict(full=evaluate(student, tok, data, split), curve=evaluate(student, tok, data, split, curve=True))
    return seed, {name: tensor.cpu() for name, tensor in student.state_dict().items()}, start, wall


def _arm_job(job: tuple) -> dict:
    """One arm at some settings from one seed's student start, under out: run_arm's row."""
    seed, arm, settings, out, state, start = job
    w = _WORKER
    student = new_model(w["tok"], w["p"].student, seed=100 + seed).to(w["device"])
    student.load_state_dict(state)
    row = run_arm(arm, w["p"], seed, student.eval(), w["teacher"], w["tok"], w["data"], start, out, settings,
                  w["split"])
    return dict(row, setting=settings.get(arm))  # the tuned setting it ran at (None: a fallback's)


def run_all(p: Preset, runs: list[tuple], seeds: list[int], device, cache: Path, split: str = "test"):
    """The teacher, each seed's start, then every (seed, run) job, run = (arm, settings, its output directory).
    Returns (the teacher's row, the starts' rows, the runs' rows), printing a line per job as it ends."""
    tok, data = char_tokenizer(), make_splits(p)
    teacher, meta = get_teacher(tok, data, p, cache, device)
    teacher_row = dict(method="teacher", seed=0, wall_s=meta["train_s"], **evaluate(teacher, tok, data, split),
                       id_B_bug=accuracy(teacher, tok, populations(data[split])["B"], "teacher_answer"))
    print(f"teacher: carry {teacher_row['id_carry']:.1%} | no carry {teacher_row['id_nocarry']:.1%} | B "
          f"{teacher_row['id_B']:.1%}, its bug on B {teacher_row['id_B_bug']:.1%} (by design) | {meta['train_s']:.0f}s")
    args = (p, cache, device, split)
    starts, start_rows = {}, []
    for seed, state, start, wall in _jobs(_start_job, seeds, p.workers, args, teacher):
        starts[seed] = (state, start)
        start_rows.append(dict(method="student (start)", seed=seed, wall_s=wall, **start["full"]))
        print(f"seed {seed} start: carry {start['full']['id_carry']:.1%} | no carry {start['full']['id_nocarry']:.1%} "
              f"| B {start['full']['id_B']:.1%} | {wall:.0f}s", flush=True)
    jobs = [(seed, arm, settings, run_out, *starts[seed]) for seed in seeds for arm, settings, run_out in runs]
    rows = []
    for row in _jobs(_arm_job, jobs, p.workers, args, teacher):
        rows.append(row)
        zero_adv = f"{statistics.mean(row['zero_adv'][:30]):.2f}" if row["zero_adv"] else "—"
        print(f"seed {row['seed']} {row['method']} (lr {row['lr']:g}): ID {row['id']:.1%} | carry {row['id_carry']:.1%}"
              f" | B {row['id_B']:.1%} | area carry {100 * row['area_carry']:.1f} | zero-adv (first 30) {zero_adv} | "
              f"{row['wall_s']:.0f}s + eval {row['eval_s']:.0f}s", flush=True)
    by_seed = operator.itemgetter("seed")
    return teacher_row, sorted(start_rows, key=by_seed), sorted(rows, key=by_seed)


# -----------------------------------------------------------------------------
# The test: paired by seed, t on n − 1 df and the exact sign-flip test, Holm across the primaries.


def paired_test(diffs: list[float]) -> dict:
    """Two-sided tests that the mean of per-seed paired differences is 0: Student's t on n − 1 degrees of freedom
    (scipy.stats.ttest_1samp), and the exact sign-flip test over all 2^n sign patterns (p ≥ 2 / 2^n)."""
    from scipy import stats

    n, mean = len(diffs), statistics.mean(diffs) if diffs else math.nan
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    if n < 2:
        p_t = math.nan
    elif se == 0:
        p_t = 1.0 if mean == 0 else 0.0
    else:
        p_t = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    patterns = itertools.product((1, -1), repeat=n)
    flips = [abs(sum(sign * d for sign, d in zip(signs, diffs, strict=True))) for signs in patterns]
    p_sign = sum(flip >= abs(sum(diffs)) - 1e-9 for flip in flips) / len(flips)
    return dict(n=n, mean=mean, se=se, p_t=p_t, p_sign=p_sign)


def holm(pvalues: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm: the i-th smallest p (from 0, NaN last) is rejected if ≤ alpha / (k − i), up to the first not."""
    rejected = [False] * len(pvalues)
    for rank, i in enumerate(sorted(range(len(pvalues)), key=lambda i: (math.isnan(pvalues[i]), pvalues[i]))):
        if not pvalues[i] <= alpha / (len(pvalues) - rank):
            break
        rejected[i] = True
    return rejected


def seeds_needed(sd: float, delta: float, k: int = len(PRIMARIES), alpha: float = 0.05) -> int:
    """Seeds for 80% power at effect delta, paired, two-sided at alpha / k: ((z(1−α/2k) + z(0.8))·sd/δ)² + 2."""
    z = statistics.NormalDist().inv_cdf
    return math.ceil(((z(1 - alpha / (2 * k)) + z(0.8)) * sd / delta) ** 2 + 2)


def primaries(rows: list[dict]) -> tuple[list[dict], dict]:
    """Each primary's paired test, Holm's decision and verdict ("held", "reversed", "not shown"; "no power" when
    the positive control failed), and the control: (list of results, control)."""
    gains = [100 * row[CONTROL["measure"]] for row in rows if row["method"] == CONTROL["arm"]]
    control = dict(**CONTROL, mean=statistics.mean(gains) if gains else math.nan, n=len(gains))
    control["passed"] = control["mean"] >= CONTROL["threshold"]
    results = []
    for primary in PRIMARIES:
        base = {row["seed"]: row[primary["measure"]] for row in rows if row["method"] == primary["base"]}
        diffs = [100 * (row[primary["measure"]] - base[row["seed"]]) for row in rows
                 if row["method"] == primary["arm"] and row["seed"] in base]
        results.append(dict(primary, **paired_test(diffs), needed=seeds_needed(primary["sd"], primary["delta"])))
    for result, rejected in zip(results, holm([result["p_t"] for result in results]), strict=True):
        verdict = ("held" if result["mean"] > 0 else "reversed") if rejected else "not shown"
        result["verdict"] = verdict if control["passed"] else "no power (the control failed)"
    return results, control


def report_primaries(results: list[dict], control: dict) -> str:
    """The preregistered comparisons and the control, in markdown."""
    verdict = "passed" if control["passed"] else "FAILED: this run has no power to compare the methods"
    lines = [f"Positive control: {control['arm']}'s carry accuracy gained, mean over {control['n']} seed(s), "
             f"{control['mean']:+.1f} points (threshold {control['threshold']:+.0f}): {verdict}.", "",
             "| primary | arm − base, measure | n | mean ± s.e. (points) | t-test p | sign-flip p | verdict (Holm, "
             "α = 0.05) | seeds for 80% power at δ |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        power = f"{r['needed']} at δ = {r['delta']:g}" + (" (this run: too few)" if r["n"] < r["needed"] else "")
        lines.append(f"| P{i}: {r['claim']} | {r['arm']} − {r['base']}, {MEASURES[r['measure']]} | {r['n']} | "
                     f"{r['mean']:+.1f} ± {r['se']:.1f} | {r['p_t']:.2g} | {r['p_sign']:.2g} | {r['verdict']} | "
                     f"{power} |")
    return "\n".join(lines)


COLUMNS = [("id", "ID"), ("id_carry", "carry"), ("id_nocarry", "no carry"), ("id_B", "B"), ("ood_seen", "OOD seen"),
           ("ood_unseen", "OOD unseen"), ("area_carry", "area carry"), ("weakest_p", "weakest carry p (%)")]


def mean_se(xs: list[float], fmt: str = "{:.1f}") -> str:
    """`mean ± standard error` over seeds (n − 1 in the sd), or the mean alone for one value."""
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {statistics.stdev(xs) / math.sqrt(len(xs)):.1f}"


def table(rows: list[dict], names: list[str], baseline: str = "grpo") -> str:
    """One row per arm: accuracies (%) mean ± s.e. over seeds, zero-adv, wall time, and (exploratory) the ID and B
    differences from the baseline paired by seed."""
    headers = [label for _, label in COLUMNS] + ["its entropy", "zero-adv first 30", "wall (s)", f"ID − {baseline}",
                                                 f"B − {baseline}"]
    lines = ["| arm | n | " + " | ".join(headers) + " |", "|---|---|" + "---|" * len(headers)]
    for name in names:
        runs = [row for row in rows if row["method"] == name]  # one per seed
        if not runs:
            continue
        cells = [mean_se([100 * run[key] for run in runs]) if key in runs[0] else "—" for key, _ in COLUMNS]
        extra = ([run["weakest_entropy"] for run in runs if "weakest_entropy" in run],
                 [statistics.mean(run["zero_adv"][:30]) for run in runs if run.get("zero_adv")])
        cells += [mean_se(values, "{:.2f}") if values else "—" for values in extra]
        cells.append(mean_se([run["wall_s"] for run in runs], "{:.0f}"))
        base = {row["seed"]: row for row in rows if row["method"] == baseline}
        for key in ("id", "id_B"):
            diffs = [100 * (run[key] - base[run["seed"]][key]) for run in runs if run["seed"] in base]
            paired = diffs and name not in (baseline, "teacher", "student (start)")
            cells.append(mean_se(diffs, "{:+.1f}") if paired else "—")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(out: Path, rows: list[dict], arms: list[str]) -> None:
    """curves.png: carry, B and no-carry accuracy against step (mean ± s.e. over seeds, on the curve subsets), and
    the fraction of groups whose advantages are all 0 over the rewarded steps (10-step running mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("id_carry", "carry accuracy (%): the skill the teacher teaches"), ("id_B", "region B accuracy (%): "
              "the teacher's bug"), ("id_nocarry", "no-carry accuracy (%)")]
    for index, arm in enumerate(arms):
        runs = [row for row in rows if row["method"] == arm]
        if not runs:
            continue
        style = dict(color=f"C{index % 10}", ls="--" if index >= 10 else "-", label=arm)
        steps = [point["step"] for point in runs[0]["curve"]]
        for ax, (key, label) in zip(axes.flat, panels, strict=False):
            _band(ax, steps, [[100 * point[key] for point in run["curve"]] for run in runs], style)
            ax.set(xlabel="step", ylabel=label)
        zero_adv = [[statistics.mean(run["zero_adv"][max(0, i - 9) : i + 1]) for i in range(len(run["zero_adv"]))]
                    for run in runs]
        if all(zero_adv):  # kd-then-grpo: each seed from its own switch on
            longest = max(map(len, zero_adv))
            _band(axes.flat[3], list(range(steps[-1] - longest, steps[-1])),
                  [[None] * (longest - len(curve)) + curve for curve in zero_adv], style)
    axes.flat[3].set(xlabel="step", ylabel="groups with all advantages 0")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"post-training from the same students (mean ± s.e. over {len({row['seed'] for row in rows})} seeds)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def _band(ax, xs: list, ys: list[list], style: dict) -> None:
    """The mean of the curves ys at each x and a ± 1 s.e. band, over the seeds with a value there (None: none)."""
    columns = [[curve[i] for curve in ys if curve[i] is not None] for i in range(len(xs))]
    mean = [statistics.mean(column) for column in columns]
    se = [statistics.stdev(column) / math.sqrt(len(column)) if len(column) > 1 else 0.0 for column in columns]
    ax.plot(xs, mean, marker="o", ms=2, lw=1.2, **style)
    low, high = ([m + sign * e for m, e in zip(mean, se, strict=True)] for sign in (-1, 1))
    ax.fill_between(xs, low, high, color=style["color"], alpha=0.12)


# -----------------------------------------------------------------------------
# The run, the tuning, main.


def run_demo(p: Preset, preset: str, arms: list[str], out: Path, device, first_seed: int, cache: Path) -> dict:
    """Every arm at its tuned settings from each seed's student; the preregistered test; results.md, results.json,
    curves.png. One thread per process (tiny models gain little from two, and waiting threads spin)."""
    t_start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)
    settings = json.loads(SETTINGS.read_text())["chosen"]
    seeds = list(range(first_seed, first_seed + p.seeds))
    print(f"preset {preset} | {', '.join(arms)} | seeds {seeds} | {p.rl['steps']} steps | {expected(p, arms, device)}")
    try:
        teacher, starts, rows = run_all(p, [(arm, settings, out) for arm in arms], seeds, device, cache)
    finally:
        torch.set_num_threads(threads)
    results, control = primaries(rows)
    total = time.time() - t_start
    report = (f"# Results: preset `{preset}`, device {device}, {p.seeds} seed(s) {seeds}, total {total:.0f}s\n\n"
              f"{p.rl['steps']} steps; greedy accuracy (%) on all {p.n_test} ID test problems by population and the "
              "900 OOD ones; area carry: the carry accuracy averaged over the run. Mean ± s.e. over seeds.\n\n"
              + table([teacher, *starts, *rows], ["teacher", "student (start)", *arms]) + "\n\n"
              "## The preregistered primaries (docs/preregistration.md)\n\n" + report_primaries(results, control)
              + "\n\nEverything else above is exploratory: differences are shown with their standard errors, and none "
              "is called significant.\n")
    print("\n" + report)
    (out / "results.md").write_text(report)
    raw = dict(preset=preset, device=str(device), seeds=seeds, settings=asdict(p), tuned=settings, total_s=total,
               primaries=results, control=control, rows=[teacher, *starts, *rows])
    (out / "results.json").write_text(json.dumps(raw, indent=2))
    plot(out, rows, arms)
    return dict(rows=[teacher, *starts, *rows], primaries=results, control=control, out=str(out))


def tune(p: Preset, out: Path, device, cache: Path, command: str) -> dict:
    """Each arm of GRID at each of its settings from the TUNE_SEEDS students, judged by the final ID accuracy on
    the validation split (mean over the seeds); the best are written to tiny_settings.json with the command."""
    torch.set_num_threads(1)
    runs = [(arm, {arm: setting}, out / "-".join([arm, *(f"{k}{v:g}" for k, v in setting.items())]))
            for arm, grid in GRID.items() for setting in grid]
    _, _, rows = run_all(p, runs, list(TUNE_SEEDS), device, cache, split="val")
    scores = {arm: {} for arm in GRID}
    for arm, settings, _ in runs:
        mine = [row["id"] for row in rows if row["method"] == arm and row["setting"] == settings[arm]]
        scores[arm][json.dumps(settings[arm], sort_keys=True)] = statistics.mean(mine)
    chosen = {arm: json.loads(max(by_setting, key=by_setting.__getitem__)) for arm, by_setting in scores.items()}
    record = dict(command=command, seeds=list(TUNE_SEEDS), steps=p.rl["steps"], criterion="final validation ID "
                  "accuracy, mean over seeds", validation_id=scores, chosen=chosen)
    SETTINGS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {SETTINGS}: {chosen}")
    return record


def expected(p: Preset, arms: list[str], device) -> str:
    """An estimate from costs measured on this project's 2-core CPU: 0.12 s a step of a job on one thread (× 1.45 with
    the teacher), 6 s of evaluation a job, 15 s a start, 80 s the teacher (12 seeds: said 22 min, took 19). No GPU."""
    if torch.device(device).type == "cuda":
        return "no estimate on a GPU (none has run the demo yet)"
    job = sum(p.rl["steps"] * 0.12 * (1 if arm in ("grpo", "rlad") else 1.45) + 6 for arm in arms)
    minutes = (p.seeds * (job + 15) / max(1, min(p.workers, p.seeds * len(arms))) + 80) / 60
    return f"expected on 2 CPU cores: about {minutes:.0f} min with the teacher's training (an estimate)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), help="default: gpu on CUDA (see --device), else cpu")
    parser.add_argument("--out", default="runs/tiny", help="output directory")
    parser.add_argument("--cache", help="where the teacher is cached (default: <out>/cache)")
    parser.add_argument("--seeds", type=int, help="seeds (default: the preset's; the preregistered run: 12)")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds − 1")
    parser.add_argument("--steps", type=int, help="post-training steps of every arm (default: the preset's, 200)")
    parser.add_argument("--workers", type=int, help="processes running the jobs, one thread each")
    parser.add_argument("--methods", help="kdrl.METHODS presets, comma-separated, or 'all' (default: the preset's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    parser.add_argument("--tune", action="store_true", help="write tiny_settings.json from the validation split")
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be >= 1")
    try:
        device = train.resolve_device(args.device)
    except kdrl.KDRLError as e:
        parser.error(str(e))
    if args.preset is None:
        args.preset = "gpu" if device.type == "cuda" else "cpu"
        print(f"{'GPU found' if device.type == 'cuda' else 'no GPU in use'}: the {args.preset} preset (--preset)")
    p = PRESETS[args.preset]
    p = replace(p, seeds=args.seeds or p.seeds, workers=args.workers or p.workers, rl={**p.rl, "steps": args.steps
                or p.rl["steps"]})
    arms = args.methods.split(",") if args.methods else list(p.arms or kdrl.METHODS)
    arms = list(kdrl.METHODS) if arms == ["all"] else arms
    if bad := [arm for arm in arms if arm not in kdrl.METHODS]:
        parser.error(f"unknown arms {bad}; choose from {list(kdrl.METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "cache"
    if args.tune:
        steps = f" --steps {args.steps}" if args.steps else ""
        return tune(p, out, device, cache, f"python train_tiny.py --tune --preset {args.preset}{steps}")
    return run_demo(p, args.preset, arms, out, device, args.first_seed, cache)


if __name__ == "__main__":
    main()
