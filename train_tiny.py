"""
train_tiny.py: the KDRL comparison on tiny models, from scratch, with no downloads.

    python train_tiny.py                   # cpu preset without a GPU (6.5-8.5 min on 2 cores), gpu preset with one
    python train_tiny.py --preset smoke    # < 60 s, tiny everything: checks the plumbing, not the methods

Task: 2-digit addition worked column by column with carries, e.g. `95+98=` → `5+8=13|9+9+1=19|#### 193`,
scored by kdrl.math_reward (the last `#### x`). The out-of-distribution (OOD) split holds the problems whose
two tens digits are equal (`77+74=`); no method trains on them. Every step string such as `7+7=14` is seen
in training, in the units column, so OOD asks for a known step in a new place: composition at the same
length, not length extrapolation (which small character models fail at, so every method would score 0).

Pipeline: (1) a Llama-style teacher (random init) is trained with supervision until it is strong in
distribution, and cached under <out>/cache/teacher-<hash of its settings>; (2) a smaller student gets a
brief supervised start so that it begins weak but not hopeless; (3) from that same student, each
kdrl.METHODS preset is post-trained with kdrl.train on the same rollout budget; (4) results.md (table),
results.json (raw numbers), accuracy.png (ID greedy accuracy vs step) and one metrics.jsonl per run.

What to expect (cpu preset, 2 CPU cores): 2-2.5 min for the teacher (cached afterwards), then 25-45 s
per method; the teacher at 96% ID, the student starting near 20%, and the methods between. One seed
on 200 problems is mostly noise (a standard error of about 3 points): read smaller differences as ties.
The demo scales the paper's β and anneal length to tiny models once, in DEMO_SCALE, and uses one learning
rate for every method, the one best for GRPO (the baseline) among 1e-4, 3e-4 and 1e-3.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import kdrl

# -----------------------------------------------------------------------------
# Presets: one dataclass, one instance per preset.


@dataclass
class Preset:
    digits: int = 2
    """operand length; every split uses the same length (OOD is by composition, not by length)"""
    n_train: int = 4000
    """train prompts (also the worked solutions for supervised pre-training)"""
    n_test: int = 200
    """ID and OOD test problems each"""
    teacher: dict = field(default_factory=lambda: dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4))
    """teacher architecture (LlamaConfig fields)"""
    teacher_steps: int = 1200
    """max supervised steps for the teacher; it stops early at teacher_target"""
    teacher_target: float = 0.95
    """stop teacher training once greedy ID accuracy on a held-out check reaches this"""
    student: dict = field(default_factory=lambda: dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    """student architecture: smaller than the teacher"""
    student_steps: int = 400
    """max steps of the student's brief supervised start; it stops early at student_target"""
    student_target: float = 0.2
    """stop the student's supervised start once greedy ID accuracy on a held-out check reaches this:
    weak but not hopeless, the regime where the paper says RL explores poorly"""
    check_every: int = 10
    """steps between those accuracy checks (the student's accuracy jumps within a few dozen steps)"""
    sft_lr: float = 3e-3
    """AdamW lr for the supervised pre-training of both models"""
    sft_batch: int = 64
    """sequences per supervised step"""
    rl: dict = field(default_factory=dict)
    """KDRLConfig fields shared by every method (the demo's overrides)"""
    seeds: int = 1
    """seeds per method (student init, data order, sampling)"""


RL_CPU = dict(steps=150, prompts_per_step=8, group_size=8, lr=1e-4, max_new_tokens=28, temperature=1.0, eval_every=25, eval_limit=200, minibatch_size=64)
PRESETS = {
    "smoke": Preset(digits=2, n_train=300, n_test=16, teacher=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2), teacher_steps=20,
                    student=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2), student_steps=5, sft_batch=16,
                    rl={**RL_CPU, "steps": 2, "prompts_per_step": 2, "group_size": 2, "eval_every": 0}),
    "cpu": Preset(rl=RL_CPU),
    "gpu": Preset(rl={**RL_CPU, "prompts_per_step": 32}, seeds=3),  # untested: no GPU was lent while building it
}
# The paper's β (5e-3 → 1e-3) is sized for 1.5B-parameter models whose per-token KL is small and whose GRPO
# term is tiny per token; on these models KD would vanish at that size. So every β given in the paper's
# units (the KDRL variants; not kd's β = 1, which has no RL term to balance) is multiplied by beta, once,
# and the anneal length is scaled from the paper's ~280-step run to ours. kdrl-anneal still anneals β → β/5.
DEMO_SCALE = dict(beta=20.0, paper_steps=280)
VOCAB = "0123456789+=|# "

# -----------------------------------------------------------------------------
# Task: procedurally generated additions with worked solutions.


def solution(a: int, b: int, digits: int) -> str:
    """Column-by-column working, units first: `7+5=12|4+8+1=13|...|#### 1332`."""
    steps, carry = [], 0
    for i in range(digits):
        x, y = a // 10**i % 10, b // 10**i % 10
        s = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
        carry = s // 10
    return "|".join(steps) + f"|#### {a + b}"


def make_splits(p: Preset, seed: int = 1234) -> dict[str, list[dict]]:
    """train / test (ID) / ood: problems whose leading digits are equal (77+74=) never appear in train or
    test. Every step string like `7+7=14` is seen in the units column, so OOD asks for a known step at a new
    place: composition, at the same length. Disjoint splits; fixed seed, so every run sees the same data."""
    rng, seen, out = random.Random(seed), set(), {"train": [], "test": [], "ood": []}
    want = {"train": p.n_train, "test": p.n_test, "ood": p.n_test}
    lo, hi = 10 ** (p.digits - 1), 10**p.digits - 1
    while any(len(out[k]) < want[k] for k in out):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        split = "ood" if a // lo == b // lo else ("test" if len(out["test"]) < p.n_test else "train")
        if len(out[split]) < want[split]:
            out[split].append(dict(prompt=f"{a}+{b}=", answer=str(a + b), solution=solution(a, b, p.digits)))
    return out


def char_tokenizer(chars: str = VOCAB) -> PreTrainedTokenizerFast:
    """A character-level transformers tokenizer built in code: one id per character, plus pad/unk/eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<eos>", *dict.fromkeys(chars)])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character is a token
    t.decoder = decoders.Fuse()  # join characters back without spaces
    # pad != eos, so the model is taught to stop (kdrl masks by position anyway)
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


# -----------------------------------------------------------------------------
# Models: random-init Llamas, and the supervised pre-training (demo plumbing, not part of KDRL).


def new_model(tok, arch: dict, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    h = arch["hidden_size"]
    cfg = LlamaConfig(vocab_size=len(tok), intermediate_size=4 * h, num_key_value_heads=arch["num_attention_heads"], max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True, **arch)
    return LlamaForCausalLM(cfg)


def supervised(model, tok, examples: list[dict], steps: int, lr: float, batch: int, seed: int, desc: str, check=None, check_every: int = 100):
    """Next-token NLL on prompt → worked solution + EOS, loss on the response only. `check()` every check_every
    steps may return True to stop early (the teacher trains "until strong", the student "until not hopeless")."""
    rng, opt = random.Random(seed), torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    device = next(model.parameters()).device
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc, dynamic_ncols=True)):
        rows = rng.sample(examples, batch)
        seqs = [(tok(ex["prompt"])["input_ids"], tok(ex["solution"])["input_ids"] + [tok.eos_token_id]) for ex in rows]
        L = max(len(p) + len(r) for p, r in seqs)
        ids = torch.tensor([p + r + [tok.pad_token_id] * (L - len(p) - len(r)) for p, r in seqs], device=device)  # (B, L) right-padded
        labels = torch.tensor([[-100] * len(p) + r + [-100] * (L - len(p) - len(r)) for p, r in seqs], device=device)
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (torch.arange(L, device=device) < torch.tensor([len(p) for p, _ in seqs], device=device)[:, None]), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if check and (step + 1) % check_every == 0:
            model.eval()
            stop = check()
            model.train()
            if stop:
                break
    model.eval()
    return model


def evaluate(model, tok, examples, p: Preset) -> dict:
    """kdrl.evaluate (greedy + one sample) with the demo's sampling settings."""
    return kdrl.evaluate(model, tok, examples, kdrl.math_reward, kdrl.KDRLConfig(**p.rl), batch_size=256)


def reached(model, tok, data, p: Preset, target: float):
    """A stopping check: greedy accuracy on a peek at 100 *train* problems (the test splits stay unseen) ≥ target."""
    return lambda: evaluate(model, tok, data["train"][:100], p)["acc_greedy"] >= target


def get_teacher(p: Preset, tok, data, cache_dir: Path, device):
    """Train the teacher, or load it from cache/teacher-<hash of every setting that shapes it>."""
    key = dict(arch=p.teacher, steps=p.teacher_steps, target=p.teacher_target, lr=p.sft_lr, batch=p.sft_batch, digits=p.digits, n_train=p.n_train, vocab=VOCAB, check="train100")
    path = cache_dir / ("teacher-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12])
    if (path / "meta.json").exists():
        print(f"teacher: cached at {path}")
        return LlamaForCausalLM.from_pretrained(path).to(device).eval().requires_grad_(False), json.loads((path / "meta.json").read_text())
    t0, model = time.time(), new_model(tok, p.teacher, seed=0).to(device)
    supervised(model, tok, data["train"], p.teacher_steps, p.sft_lr, p.sft_batch, 0, "teacher (supervised)", reached(model, tok, data, p, p.teacher_target))
    meta = dict(train_s=time.time() - t0, settings=key)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return model.requires_grad_(False), meta


# -----------------------------------------------------------------------------
# Post-training: every kdrl.METHODS preset from the same student, via kdrl.train.


def method_config(method: str, p: Preset, seed: int, out: Path) -> kdrl.KDRLConfig:
    """KDRLConfig.from_method(method, **demo overrides), then DEMO_SCALE applied once (see its comment)."""
    cfg = kdrl.KDRLConfig.from_method(method, **p.rl, seed=seed, out=str(out))
    if cfg.beta and cfg.use_reward:  # β in the paper's units
        cfg.beta *= DEMO_SCALE["beta"]
        cfg.beta_min = cfg.beta_min * DEMO_SCALE["beta"] if cfg.beta_min is not None else None
    if cfg.beta_decay_steps:
        cfg.beta_decay_steps = max(1, round(cfg.beta_decay_steps * cfg.steps / DEMO_SCALE["paper_steps"]))
    return cfg


def run_method(method, p, seed, student0, teacher, tok, data, out: Path) -> dict:
    cfg = method_config(method, p, seed, out / f"{method}-seed{seed}")
    student, t0 = copy.deepcopy(student0), time.time()
    summary = kdrl.train(cfg, student, teacher, tok, data["train"], kdrl.math_reward, data["test"])
    wall = time.time() - t0
    ood = evaluate(student, tok, data["ood"], p)
    return dict(method=method, seed=seed, id=summary["eval"]["acc_greedy"], ood=ood["acc_greedy"], length=summary["eval"]["length"], wall_s=wall,
                id_sampled=summary["eval"]["acc_sampled"], ood_sampled=ood["acc_sampled"], beta=cfg.beta, beta_min=cfg.beta_min, beta_decay_steps=cfg.beta_decay_steps)


# -----------------------------------------------------------------------------
# Reporting: table (mean ± standard error over seeds), JSON, plot.


def mean_se(xs: list[float], fmt: str) -> str:
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return fmt.format(m)
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
    return f"{fmt.format(m)} ± {fmt.replace('+', '').format(se)}"


def table(rows: list[dict], names: list[str], baseline: str = "grpo") -> str:
    """One row per model. The last column compares each method with the baseline *paired by seed* (both start
    from the same student), which removes the spread between students that the per-column errors include."""
    base = {r["seed"]: r["id"] for r in rows if r["method"] == baseline}
    lines = [f"| model | n | ID acc (%) | OOD acc (%) | mean length (tokens) | wall time (s) | ID − {baseline}, paired (points) |", "|---|---|---|---|---|---|---|"]
    for name in names:
        rs = [r for r in rows if r["method"] == name]
        if rs:
            paired = [100 * (r["id"] - base[r["seed"]]) for r in rs if r["seed"] in base]
            show_paired = name not in (baseline, "teacher") and len(paired) == len(rs)
            cells = [mean_se([100 * r["id"] for r in rs], "{:.1f}"), mean_se([100 * r["ood"] for r in rs], "{:.1f}"),
                     mean_se([r["length"] for r in rs], "{:.1f}"), mean_se([r["wall_s"] for r in rs], "{:.0f}"),
                     mean_se(paired, "{:+.1f}") if show_paired else "—"]
            lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(out: Path, methods: list[str], seeds: int, start: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        curves = []
        for s in range(seeds):
            evals = [json.loads(l) for l in (out / f"{m}-seed{s}" / "metrics.jsonl").read_text().splitlines()]
            curves.append([(0, start[s])] + [(e["step"] + 1, e["acc_greedy"]) for e in evals if e.get("eval")])
        xs = [x for x, _ in curves[0]]
        ax.plot(xs, [100 * sum(c[i][1] for c in curves) / len(curves) for i in range(len(xs))], marker="o", ms=3, label=m)
    ax.set(xlabel="step", ylabel="ID greedy accuracy (%)", title=f"post-training from the same student (mean of {seeds} seed(s))")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# --bench: the speed anchor. GRPO and KDRL steps of kdrl.train in the setting TRL's GRPOTrainer was timed in.


def bench(model_dir: str | None = None, steps: int = 6, warmup: int = 2) -> list[str]:
    """Time kdrl.train's GRPO and KDRL steps: a tiny Llama (6 layers, hidden 256) as student *and* teacher,
    8 addition prompts × 8 samples, ≤ 48 new tokens at T = 1, μ = 1, fp32, 2 threads on CPU. Prints the
    median step after `warmup` steps, its breakdown, non-pad tokens/s, and one `bench ...` line per method."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(2)
    tok, model = bench_model(model_dir)
    model = model.to(device).eval()
    print(f"bench: {sum(p.numel() for p in model.parameters()):,} parameters on {device}, {torch.get_num_threads()} threads")
    data = random_additions(8 * (steps + warmup))
    lines = []
    for method in ("grpo", "kdrl"):
        student = copy.deepcopy(model)  # the teacher stays the untouched model
        out = Path(tempfile.mkdtemp(prefix=f"kdrl-bench-{method}-"))
        cfg = kdrl.KDRLConfig.from_method(method, steps=steps + warmup, group_size=8, prompts_per_step=8, max_new_tokens=48,
                                          temperature=1.0, mu=1, minibatch_size=64, lr=1e-6, out=str(out), progress=False)
        kdrl.train(cfg, student, model, tok, data, kdrl.math_reward)
        rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if not r.get("eval")][warmup:]
        shutil.rmtree(out, ignore_errors=True)
        med = lambda key: statistics.median(r[key] for r in rows)
        step = [r["time_sampling"] + r["time_teacher"] + r["time_update"] for r in rows]
        lines.append(
            f"bench {method} median_step_s={statistics.median(step):.2f} sampling_s={med('time_sampling'):.2f} teacher_s={med('time_teacher'):.2f}"
            f" update_s={med('time_update'):.2f} tokens_per_s={sum(r['tokens'] for r in rows) / sum(step):.0f} mean_len={statistics.mean(r['length'] for r in rows):.1f}"
        )
    print("\n".join(lines))
    return lines


def bench_trl(model_dir: str | None = None, steps: int = 6, warmup: int = 2) -> list[str]:
    """The same setting through TRL (needs requirements-trl.txt): TRL's plain GRPOTrainer at β = 0, then
    kdrl_trl.KDRLTrainer with --method grpo and --method kdrl (the anchor model as its own teacher), each with TRL's
    sampler, one optimizer step per batch of 64, no gradient checkpointing. Then kdrl.py's own bench in the same run."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    import kdrl_trl

    torch.set_num_threads(2)
    tok, model = bench_model(model_dir)
    data = random_additions(64)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    class MeanLength(TrainerCallback):
        def __init__(self, trainer, lengths):
            self.trainer, self.lengths = trainer, lengths

        def on_step_end(self, args, state, control, **kwargs):  # TRL's metrics of the step, before log() clears them
            self.lengths.append(self.trainer._metrics["train"]["completions/mean_length"][-1])

    def math_reward_trl(prompts, completions, kdrl_index, **kwargs):
        return [kdrl.math_reward(p, c, data[i]) for p, c, i in zip(prompts, completions, kdrl_index)]

    lines = []
    for name, method in (("trl-grpo", "grpo"), ("kdrl_trl-grpo", "grpo"), ("kdrl_trl-kdrl", "kdrl")):
        out = Path(tempfile.mkdtemp(prefix=f"kdrl-bench-{name}-"))
        setting = dict(method=method, steps=steps + warmup, group_size=8, prompts_per_step=8, max_new_tokens=48,
                       temperature=1.0, mu=1, minibatch_size=64, lr=1e-6, out=str(out), progress=False, device="cpu")
        cfg = kdrl.KDRLConfig.from_method(**setting)
        args = kdrl_trl.grpo_config(cfg, 1, use_vllm=False)
        timer = StepTimes()
        common = dict(args=args, train_dataset=kdrl_trl.dataset_for(tok, data), processing_class=tok, callbacks=[timer])
        if name == "trl-grpo":
            trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=[math_reward_trl], **common)
        else:
            trainer = kdrl_trl.KDRLTrainer(cfg, copy.deepcopy(model), copy.deepcopy(model), kdrl.math_reward, data,
                                           **common)
        lengths = []
        trainer.add_callback(MeanLength(trainer, lengths))
        trainer.train()
        shutil.rmtree(out, ignore_errors=True)
        parts = getattr(trainer, "kdrl_timer", {})  # kdrl_trl's breakdown, summed over all steps: per-step means
        phases = ("sampling", "teacher", "update")
        breakdown = " ".join(f"{k}_s={parts.get(k, 0.0) / (steps + warmup):.2f}" for k in phases)
        lines.append(f"bench {name} median_step_s={statistics.median(timer.times[warmup:]):.2f} {breakdown}"
                     f" mean_len={statistics.mean(lengths[warmup:steps + warmup]):.1f}")
        print(lines[-1], flush=True)
    return lines + bench(model_dir, steps, warmup)


def save_pair(out: Path) -> None:
    """A tiny random student and teacher (different seeds, one tokenizer) and a JSONL of 64 additions, to try the
    kdrl.py and kdrl_trl.py command lines on without downloading anything. Untrained: for plumbing, not results."""
    tok = char_tokenizer()
    arch = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    for name, seed in (("student", 0), ("teacher", 1)):
        new_model(tok, arch, seed).save_pretrained(out / name)
        tok.save_pretrained(out / name)
    rows = random_additions(64)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"saved {out}/student, {out}/teacher and {out}/train.jsonl")


# A Qwen2.5-shaped vocabulary: 151,643 ordinary tokens, then <|endoftext|>, <|im_start|>, <|im_end|> and 19 more
# specials (151,665 in all); the student's logits are 151,936 wide, the teacher's 152,064, as in Qwen2.5 0.5B / 7B.
LARGE_VOCAB, LARGE_WIDTHS = 151_665, dict(student=151_936, teacher=152_064)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def large_vocab_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer padded with filler tokens to Qwen2.5's 151,665 entries, with its special tokens
    and a ChatML chat template, built in code. EOS is <|im_end|>; generation configs also list <|endoftext|>."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = dict.fromkeys(VOCAB + "abcdefghijklmnopqrstuvwxyz\n")
    n_plain = LARGE_VOCAB - 22
    vocab = {t: i for i, t in enumerate(["<unk>", *chars, *(f"<filler{i}>" for i in range(n_plain - len(chars) - 1))])}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|special{i}|>" for i in range(19))]
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    t.add_special_tokens([AddedToken(x, special=True, normalized=False) for x in specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_large_vocab_pair(out: Path, hidden_size: int = 32, layers: int = 1, seed: int = 0) -> Path:
    """A random Qwen2-architecture student and teacher on large_vocab_tokenizer(), logits padded to different
    widths, generation_config listing both end ids, and a JSONL of additions: the real-vocabulary fixture."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = large_vocab_tokenizer()
    end_ids = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    for i, (name, width) in enumerate(LARGE_WIDTHS.items()):
        torch.manual_seed(seed + i)
        config = Qwen2Config(vocab_size=width, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
                             eos_token_id=end_ids, pad_token_id=tok.pad_token_id, bos_token_id=None)
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=end_ids, pad_token_id=tok.pad_token_id)
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in random_additions(16, seed)))
    return out


def _peak_rss_reset() -> bool:
    """Reset this process's peak resident memory (Linux: /proc/self/clear_refs), so VmHWM measures what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _memory_case(pair: str, method: str, batch: int, length: int, queue) -> None:
    """One update step of `method` on synthetic full-length rollouts (batch × length response tokens), in a fresh
    process: puts (peak MiB over the step, MiB before it, teacher s, update s) on queue."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    tok = kdrl.load_tokenizer(str(Path(pair) / "student"), "student")
    student = AutoModelForCausalLM.from_pretrained(Path(pair) / "student", dtype=torch.float32).to(device).eval()
    teacher = AutoModelForCausalLM.from_pretrained(Path(pair) / "teacher", dtype=torch.float32).to(device).eval()
    teacher.requires_grad_(False)
    V, P = len(tok), 16
    cfg = kdrl.KDRLConfig.from_method(method, group_size=8, prompts_per_step=batch // 8, max_new_tokens=length, minibatch_size=64, lr=1e-6)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V - 22, (batch, P + length), generator=g).to(device)  # ordinary tokens, no end id
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    ro = kdrl.Rollouts(ids, torch.ones_like(ids), mask, torch.zeros(batch, length, device=device), torch.ones(batch, dtype=torch.bool, device=device))
    correct = torch.rand(batch, generator=g).lt(0.5).to(device)
    adv = kdrl.grpo_advantages(correct.double(), 8).float()
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    timer = kdrl.Timer()
    for phase in ("warmup", "measured"):  # the first step allocates AdamW's state; measure the second
        if phase == "measured":
            before = _rss_mib("VmRSS")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated() / 2**20
            _peak_rss_reset()
            timer = kdrl.Timer()
        with timer("teacher"):
            scores = kdrl.teacher_pass(cfg, student, teacher, ro, V)
        with timer("update"):
            kdrl.policy_update(cfg, student, teacher, optimizer, ro, adv, correct, cfg.beta, scores, V, step=0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mib("VmHWM")
    queue.put((peak, before, timer["teacher"], timer["update"]))


def bench_memory(sizes=((16, 64), (64, 512)), methods=("kdrl", "kdrl-full")) -> list[str]:
    """Peak memory and time of one teacher pass + update step, kdrl vs kdrl-full, on the real-vocabulary pair
    (151,665 tokens; logits 151,936 / 152,064 wide), each in a fresh process. Prints one `memory ...` line per case:
    peak (resident on CPU, allocated on CUDA) over the step, what was resident before it, and what a (B, T, V)
    float32 logits tensor alone would take."""
    import multiprocessing

    pair = Path(tempfile.mkdtemp(prefix="kdrl-large-vocab-"))
    save_large_vocab_pair(pair, hidden_size=64, layers=2)
    device = "cuda" if torch.cuda.is_available() else "cpu (2 threads)"
    print(f"bench-memory: Qwen2 pair, hidden 64, 2 layers, vocab {LARGE_VOCAB:,}, logits {LARGE_WIDTHS}, on {device}")
    ctx, lines = multiprocessing.get_context("spawn"), []
    for batch, length in sizes:
        for method in methods:
            queue = ctx.Queue()
            proc = ctx.Process(target=_memory_case, args=(str(pair), method, batch, length, queue))
            proc.start()
            peak, before, t_teacher, t_update = queue.get()
            proc.join()
            logits_mib = batch * length * LARGE_VOCAB * 4 / 2**20
            lines.append(f"memory {method} B={batch} T={length} peak_mib={peak:.0f} before_mib={before:.0f} "
                         f"teacher_s={t_teacher:.2f} update_s={t_update:.2f} one_BTV_float32_mib={logits_mib:.0f}")
            print(lines[-1], flush=True)
    shutil.rmtree(pair, ignore_errors=True)
    return lines


def bench_model(model_dir: str | None = None):
    """(tokenizer, model): the saved causal LM in model_dir, or the anchor model (a random tiny Llama, 6.3M)."""
    from transformers import AutoModelForCausalLM

    if model_dir:
        tok = kdrl.load_tokenizer(model_dir, "bench-model")
        return tok, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    tok = char_tokenizer(VOCAB)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=4, max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    return tok, LlamaForCausalLM(config)


def random_additions(n: int, seed: int = 0) -> list[dict]:
    """n random 2-digit additions {"prompt": "37+58=", "answer": "95"} (the bench and --save-pair data)."""
    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    return [dict(prompt=f"{a}+{b}=", answer=str(a + b)) for a, b in pairs]


# -----------------------------------------------------------------------------
# Main.


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default=None, help="default: gpu if CUDA is available, else cpu")
    ap.add_argument("--out", default="runs/tiny", help="output directory (the teacher cache lives in <out>/cache)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per method (default: the preset's)")
    ap.add_argument("--methods", default=",".join(kdrl.METHODS), help="comma-separated subset of kdrl.METHODS")
    ap.add_argument("--bench", action="store_true", help="time GRPO and KDRL steps in the speed-anchor setting instead (see bench)")
    ap.add_argument("--bench-model", default=None, help="with --bench: a saved causal LM to use as student and teacher (default: build the anchor model)")
    ap.add_argument("--bench-trl", action="store_true",
                    help="--bench through TRL too: plain GRPOTrainer, kdrl_trl grpo and kdrl (requirements-trl.txt)")
    ap.add_argument("--bench-memory", action="store_true",
                    help="peak memory and time of one kdrl vs kdrl-full step on a 151,665-token vocabulary (see bench_memory)")
    ap.add_argument("--save-pair", metavar="DIR", default=None,
                    help="save a tiny random student/teacher pair and train.jsonl to DIR, then exit")
    args = ap.parse_args(argv)
    if args.save_pair:
        return save_pair(Path(args.save_pair)) or {}
    if args.bench_trl:
        return dict(bench=bench_trl(args.bench_model))
    if args.bench_memory:
        return dict(bench=bench_memory())
    if args.bench:
        return dict(bench=bench(args.bench_model))
    if args.preset is None:
        args.preset = "gpu" if torch.cuda.is_available() else "cpu"
        print("GPU found: using the gpu preset" if args.preset == "gpu" else "no GPU found: using the cpu preset (6.5-8.5 min on 2 cores; --preset gpu/smoke to override)")
    p = PRESETS[args.preset]
    p = replace(p, seeds=args.seeds or p.seeds)
    methods = [m for m in args.methods.split(",") if m]
    if bad := [m for m in methods if m not in kdrl.METHODS]:
        ap.error(f"unknown methods {bad}; choose from {list(kdrl.METHODS)}")
    out, device, t_start = Path(args.out), torch.device("cuda" if torch.cuda.is_available() else "cpu"), time.time()
    out.mkdir(parents=True, exist_ok=True)
    tok, data = char_tokenizer(), make_splits(p)
    print(f"preset {args.preset} | {len(data['train'])} train, {len(data['test'])} ID test, {len(data['ood'])} OOD | e.g. {data['train'][0]['prompt']}{data['train'][0]['solution']}")

    teacher, meta = get_teacher(p, tok, data, out / "cache", device)
    ev_t, ood_t = evaluate(teacher, tok, data["test"], p), evaluate(teacher, tok, data["ood"], p)
    rows = [dict(method="teacher", seed=0, id=ev_t["acc_greedy"], ood=ood_t["acc_greedy"], length=ev_t["length"], wall_s=meta["train_s"])]
    print(f"teacher: ID {ev_t['acc_greedy']:.1%} | OOD {ood_t['acc_greedy']:.1%}")
    start_acc = {}
    for seed in range(p.seeds):
        t0 = time.time()
        student = new_model(tok, p.student, seed=100 + seed).to(device)
        supervised(student, tok, data["train"], p.student_steps, p.sft_lr, p.sft_batch, seed, f"student seed {seed} (supervised)",
                   reached(student, tok, data, p, p.student_target), p.check_every)
        wall, ev_s, ood_s = time.time() - t0, evaluate(student, tok, data["test"], p), evaluate(student, tok, data["ood"], p)
        start_acc[seed] = ev_s["acc_greedy"]
        rows.append(dict(method="student (start)", seed=seed, id=ev_s["acc_greedy"], ood=ood_s["acc_greedy"], length=ev_s["length"], wall_s=wall))
        print(f"student seed {seed}: ID {ev_s['acc_greedy']:.1%} | OOD {ood_s['acc_greedy']:.1%}")
        for m in methods:
            rows.append(r := run_method(m, p, seed, student, teacher, tok, data, out))
            print(f"{m} seed {seed}: ID {r['id']:.1%} | OOD {r['ood']:.1%} | length {r['length']:.1f} | {r['wall_s']:.0f}s")

    n_params = lambda m: sum(x.numel() for x in m.parameters())
    md = (f"# Results: preset `{args.preset}`, device {device}, {p.seeds} seed(s), total {time.time() - t_start:.0f}s\n\n"
          f"Greedy accuracy on {len(data['test'])} ID and {len(data['ood'])} OOD problems, mean ± standard error over seeds (n = 1: no error bar); "
          f"the last column is the ID difference from grpo within each seed, mean ± standard error. "
          f"Teacher {n_params(teacher) / 1e3:.0f}K params, student {n_params(student) / 1e3:.0f}K. Teacher wall time = its supervised training (cached runs reuse it); "
          f"student (start) = its brief supervised start; methods = kdrl.train incl. its evals.\n\n" + table(rows, ["teacher", "student (start)", *methods]) + "\n")
    print("\n" + md)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(dict(preset=args.preset, device=str(device), settings=asdict(p), demo_scale=DEMO_SCALE, rows=rows), indent=2))
    plot(out, methods, p.seeds, start_acc)
    return dict(rows=rows, out=str(out))


if __name__ == "__main__":
    main()
