"""
bench.py: the benches, the real-vocabulary fixture and the first run on a GPU; the demo is train_tiny.py.

    python bench.py                  # the speed anchor: GRPO and KDRL steps of train.train (was train_tiny.py --bench)
    python bench.py --trl            # the same through TRL too (was --bench-trl; needs requirements-trl.txt)
    python bench.py --memory         # peak memory, kdrl vs kdrl-full, 151,665-token vocabulary (was --bench-memory)
    python bench.py --save-pair DIR  # a tiny random student, teacher and train.jsonl (was train_tiny.py --save-pair)
    python bench.py --check-gpu      # on a GPU: the tests, the smoke demo and the bench on CUDA (was --check-gpu)

--model DIR (was --bench-model) times a saved causal LM, as student and teacher, instead of the anchor model;
--device auto|cpu|cuda picks the device of the speed bench and of --trl (auto: CUDA when available).

It imports train_tiny (the character tokenizer and the model builder), which never imports it back; train_trl only
for --trl.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

import kdrl
import train
from train_tiny import VOCAB, char_tokenizer, new_model

# -----------------------------------------------------------------------------
# The speed anchor (`python bench.py`, `--trl`): GRPO and KDRL steps of train.train, set as TRL's GRPOTrainer was timed.


def _device_label(device: torch.device) -> str:
    """A bench header's device: the GPU's name, or the CPU's thread count."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _dtype_label(dtype: str, device: torch.device) -> str:
    """A bench header's dtype: what cfg.dtype resolves to on `device` (kdrl.compute_dtype)."""
    if kdrl.compute_dtype(dtype, device) == torch.bfloat16:
        return "bfloat16 autocast over float32 weights"
    return "float32"


def bench(model_dir: str | None = None, steps: int = 6, warmup: int = 2, device: str = "auto",
          dtype: str = "auto") -> list[str]:
    """Time train.train's GRPO and KDRL steps: a tiny Llama (6 layers, hidden 256) as student *and* teacher,
    8 addition prompts × 8 samples, ≤ 48 new tokens at temperature 1, μ = 1, on `device` ("auto": CUDA when
    available; CPU with 2 threads) in kdrl's compute dtype there (dtype "auto": bfloat16 autocast over float32 weights
    on CUDA, float32 on CPU), both named in the first line. Prints the median step after `warmup` steps, its
    breakdown, non-pad tokens/s, and one `bench ...` line per method; on CUDA the line ends with peak_mib, the most
    memory allocated during that method's run (torch.cuda.max_memory_allocated)."""
    device = train.resolve_device(device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    tok, model = bench_model(model_dir)
    model = model.to(device).eval()
    n_params = sum(param.numel() for param in model.parameters())
    print(f"bench: {n_params:,} parameters on {_device_label(device)}, {_dtype_label(dtype, device)}")
    data = random_additions(8 * (steps + warmup))

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    lines = []
    for method in ("grpo", "kdrl"):
        student = copy.deepcopy(model)  # the teacher stays the untouched model
        out = Path(tempfile.mkdtemp(prefix=f"kdrl-bench-{method}-"))
        cfg = kdrl.KDRLConfig.from_method(method, steps=steps + warmup, group_size=8, prompts_per_step=8,
                                          max_new_tokens=48, temperature=1.0, mu=1, minibatch_size=64, lr=1e-6,
                                          out=str(out), progress=False, device=device.type, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train.train(cfg, student, model, tok, data, kdrl.math_reward)
        peak = f" peak_mib={torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else ""
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [row for row in logged if not row.get("eval")][warmup:]  # the timed steps
        shutil.rmtree(out, ignore_errors=True)
        step_s = [row["time_sampling"] + row["time_teacher"] + row["time_update"] for row in rows]
        tokens_per_s = sum(row["tokens"] for row in rows) / sum(step_s)
        mean_len = statistics.mean(row["length"] for row in rows)
        lines.append(
            f"bench {method} median_step_s={statistics.median(step_s):.2f}"
            f" sampling_s={median(rows, 'time_sampling'):.2f} teacher_s={median(rows, 'time_teacher'):.2f}"
            f" update_s={median(rows, 'time_update'):.2f} tokens_per_s={tokens_per_s:.0f} mean_len={mean_len:.1f}"
            + peak
        )
    print("\n".join(lines))
    return lines


def bench_trl(model_dir: str | None = None, steps: int = 6, warmup: int = 2, device: str = "auto",
              dtype: str = "auto") -> list[str]:
    """The same setting through TRL (needs requirements-trl.txt): TRL's plain GRPOTrainer at β = 0, then
    train_trl.KDRLTrainer with --method grpo and --method kdrl (the anchor model as its own teacher), each with TRL's
    sampler, one optimizer step per batch of 64, no gradient checkpointing. Then kdrl.py's own bench() in the same
    run. Every run is on one device in one dtype, named in the first line: `device` ("auto": CUDA when available;
    CPU with 2 threads) and dtype "auto", which is bfloat16 autocast over float32 weights on CUDA (TRL's bf16 mixed
    precision, kdrl's autocast) and float32 on CPU. On CUDA each line ends with the run's peak allocated memory."""
    from trl import GRPOTrainer

    import train_trl

    device = train.resolve_device(device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    tok, model = bench_model(model_dir)
    data = random_additions(64)
    print(f"bench-trl: TRL's GRPOTrainer, train_trl and kdrl.py, all on {device.type}, {_dtype_label(dtype, device)}")

    def math_reward_trl(prompts, completions, kdrl_index, **kwargs):
        """TRL's reward-function signature: one reward per completion; kdrl_index is the dataset column."""
        return [
            kdrl.math_reward(prompt, completion, data[index])
            for prompt, completion, index in zip(prompts, completions, kdrl_index, strict=True)
        ]

    lines = []
    for name, method in (("trl-grpo", "grpo"), ("train_trl-grpo", "grpo"), ("train_trl-kdrl", "kdrl")):
        out = Path(tempfile.mkdtemp(prefix=f"kdrl-bench-{name}-"))
        setting = dict(method=method, steps=steps + warmup, group_size=8, prompts_per_step=8, max_new_tokens=48,
                       temperature=1.0, mu=1, minibatch_size=64, lr=1e-6, out=str(out), progress=False,
                       device=device.type, dtype=dtype)
        cfg = kdrl.KDRLConfig.from_method(**setting)
        args = train_trl.grpo_config(cfg, 1, use_vllm=False)  # use_cpu and bf16 from cfg.device and cfg.dtype
        timer = _StepTimes(device)
        dataset = train_trl.dataset_for(tok, data)
        common = dict(args=args, train_dataset=dataset, processing_class=tok, callbacks=[timer])
        if name == "trl-grpo":
            trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=[math_reward_trl], **common)
        else:
            trainer = train_trl.KDRLTrainer(cfg, copy.deepcopy(model), copy.deepcopy(model), kdrl.math_reward, data,
                                           **common)
        lengths = []
        trainer.add_callback(_MeanLength(trainer, lengths))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
        peak = f" peak_mib={torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else ""
        shutil.rmtree(out, ignore_errors=True)
        phase_totals = getattr(trainer, "kdrl_timer", {})  # train_trl's breakdown, summed over all steps
        phases = ("sampling", "teacher", "update")
        mean_per_step = {phase: phase_totals.get(phase, 0.0) / (steps + warmup) for phase in phases}
        breakdown = " ".join(f"{phase}_s={seconds:.2f}" for phase, seconds in mean_per_step.items())
        lines.append(f"bench {name} median_step_s={statistics.median(timer.times[warmup:]):.2f} {breakdown}"
                     f" mean_len={statistics.mean(lengths[warmup:steps + warmup]):.1f}{peak}")
        print(lines[-1], flush=True)
    return lines + bench(model_dir, steps, warmup, device=device.type, dtype=dtype)


class _StepTimes(TrainerCallback):
    """bench_trl: the wall time of each optimizer step. On CUDA it waits for the queued kernels at both ends, so a
    step's time is its own (kernels run asynchronously: without the wait it would be the time to queue them)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times = []
        self.start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self.start)


class _MeanLength(TrainerCallback):
    """bench_trl: TRL's mean completion length of each step, read before its log() clears the step's metrics."""

    def __init__(self, trainer, lengths: list):
        self.trainer = trainer
        self.lengths = lengths

    def on_step_end(self, args, state, control, **kwargs):
        self.lengths.append(self.trainer._metrics["train"]["completions/mean_length"][-1])


def bench_model(model_dir: str | None = None):
    """(tokenizer, model): the saved causal LM in model_dir, or the anchor model (a random tiny Llama, 6.3M)."""
    from transformers import AutoModelForCausalLM

    if model_dir:
        tok = train.load_tokenizer(model_dir, "model")
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
# --save-pair, and the real-vocabulary fixture (the tests' and --memory's).


def save_pair(out: Path) -> None:
    """A tiny random student and teacher (different seeds, one tokenizer) and a JSONL of 64 additions, to try the
    kdrl.py and train_trl.py command lines on without downloading anything. Untrained: for plumbing, not results."""
    tok = char_tokenizer()
    arch = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    for name, seed in (("student", 0), ("teacher", 1)):
        new_model(tok, arch, seed).save_pretrained(out / name)
        tok.save_pretrained(out / name)
    rows = random_additions(64)
    (out / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
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
    n_plain = LARGE_VOCAB - 22  # ordinary tokens: <unk>, the characters, fillers; then 22 specials
    fillers = [f"<filler{i}>" for i in range(n_plain - len(chars) - 1)]
    vocab = {token: index for index, token in enumerate(["<unk>", *chars, *fillers])}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|special{i}|>" for i in range(19))]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(special, special=True, normalized=False) for special in specials])
    roles = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
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
        config = Qwen2Config(vocab_size=width, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=end_ids,
                             pad_token_id=tok.pad_token_id, bos_token_id=None)
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=end_ids, pad_token_id=tok.pad_token_id)
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    (out / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in random_additions(16, seed)))
    return out


# -----------------------------------------------------------------------------
# --memory: peak memory at a 151,665-token vocabulary, kdrl against kdrl-full.


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
    tok = train.load_tokenizer(str(Path(pair) / "student"), "student")
    student = AutoModelForCausalLM.from_pretrained(Path(pair) / "student", dtype=torch.float32).to(device).eval()
    teacher = AutoModelForCausalLM.from_pretrained(Path(pair) / "teacher", dtype=torch.float32).to(device).eval()
    teacher.requires_grad_(False)
    V = len(tok)
    P = 16  # prompt length; B = batch, T = length (all responses full-length)
    cfg = kdrl.KDRLConfig.from_method(method, group_size=8, prompts_per_step=batch // 8, max_new_tokens=length,
                                      minibatch_size=64, lr=1e-6)
    generator = torch.Generator().manual_seed(0)
    # ordinary tokens only (the 22 specials are the last ids), so no end id
    ids = torch.randint(0, V - 22, (batch, P + length), generator=generator).to(device)  # (B, P + T)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)  # (B, T)
    sampler_logprobs = torch.zeros(batch, length, device=device)  # (B, T), unused by the update
    truncated = torch.ones(batch, dtype=torch.bool, device=device)  # (B,)
    rollouts = kdrl.Rollouts(ids, torch.ones_like(ids), mask, sampler_logprobs, truncated)
    correct = torch.rand(batch, generator=generator).lt(0.5).to(device)  # (B,)
    adv = kdrl.grpo_advantages(correct.double(), 8).float()  # (B,)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    timer = train.Timer()
    for phase in ("warmup", "measured"):  # the first step allocates AdamW's state; measure the second
        if phase == "measured":
            before = _rss_mib("VmRSS")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated() / 2**20
            _peak_rss_reset()
            timer = train.Timer()
        with timer("teacher"):
            scores = kdrl.teacher_pass(cfg, student, teacher, rollouts, V)
        with timer("update"):
            kdrl.policy_update(cfg, student, teacher, optimizer, rollouts=rollouts, advantages=adv, trained_on=correct,
                               beta=cfg.beta, scores=scores, vocab_size=V, step=0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mib("VmHWM")
    queue.put((peak, before, timer["teacher"], timer["update"]))


def bench_memory(sizes=((16, 64), (64, 512)), methods=("kdrl", "kdrl-full")) -> list[str]:
    """Peak memory and time of one teacher pass + update step, kdrl vs kdrl-full, on the real-vocabulary pair
    (151,665 tokens; logits 151,936 / 152,064 wide), each in a fresh process. Prints one `memory ...` line per case:
    peak (resident on CPU, allocated on CUDA) over the step, what was resident before it, and what a (B, T, V)
    float32 logits tensor alone would take. A case whose process dies before reporting (out of memory) gets a
    `memory ... failed` line with its exit code, and the next case runs."""
    import multiprocessing
    from queue import Empty

    pair = Path(tempfile.mkdtemp(prefix="kdrl-large-vocab-"))
    save_large_vocab_pair(pair, hidden_size=64, layers=2)
    device = "cuda" if torch.cuda.is_available() else "cpu (2 threads)"
    print(f"bench-memory: Qwen2 pair, hidden 64, 2 layers, vocab {LARGE_VOCAB:,}, logits {LARGE_WIDTHS}, on {device}")
    ctx = multiprocessing.get_context("spawn")
    lines = []
    for batch, length in sizes:
        for method in methods:
            queue = ctx.Queue()
            proc = ctx.Process(target=_memory_case, args=(str(pair), method, batch, length, queue))
            proc.start()
            result = None
            while result is None:  # a bare queue.get() would wait forever on a child the OOM killer took
                try:
                    result = queue.get(timeout=1.0)
                except Empty:
                    if not proc.is_alive():  # dead: one last look for a result it sent just before exiting
                        with contextlib.suppress(Empty):
                            result = queue.get(timeout=1.0)
                        break
            proc.join()
            if result is None:
                lines.append(f"memory {method} B={batch} T={length} failed: its process exited with code "
                             f"{proc.exitcode} before reporting (-9: killed, e.g. out of memory)")
                print(lines[-1], flush=True)
                continue
            peak, before, t_teacher, t_update = result
            logits_mib = batch * length * LARGE_VOCAB * 4 / 2**20
            lines.append(f"memory {method} B={batch} T={length} peak_mib={peak:.0f} before_mib={before:.0f} "
                         f"teacher_s={t_teacher:.2f} update_s={t_update:.2f} one_BTV_float32_mib={logits_mib:.0f}")
            print(lines[-1], flush=True)
    shutil.rmtree(pair, ignore_errors=True)
    return lines


# -----------------------------------------------------------------------------
# --check-gpu: the first run on a GPU, in one command.


def check_gpu(pytest_args: tuple = ()) -> dict:
    """Check this machine's GPU end to end: the test suite on it (KDRL_TEST_DEVICE=cuda python -m pytest -q
    *pytest_args), `train_tiny.py --preset smoke`, and the speed bench (`bench.py`), each on CUDA in its own process,
    their output shown as it comes. Prints the GPU, the torch and transformers versions, and a closing summary: each
    part's outcome and time, the tests' count, the bench's step times and peak memory. Returns {"ok": every part
    passed, "parts": {name: {"ok", "seconds", "summary"}}}. Raises KDRLError without CUDA."""
    import transformers

    if not torch.cuda.is_available():
        raise kdrl.KDRLError(f"--check-gpu needs a CUDA GPU, and torch {torch.__version__} (built for CUDA "
                             f"{torch.version.cuda}) sees none; on CPU the checks are `python -m pytest -q` and "
                             "`python train_tiny.py --preset smoke`")
    repo = Path(__file__).resolve().parent
    header = (f"check-gpu: {torch.cuda.get_device_name(0)} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
              f"transformers {transformers.__version__}")
    print(header, flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="kdrl-check-gpu-"))
    commands = dict(
        tests=[sys.executable, "-m", "pytest", "-q", *pytest_args],
        smoke=[sys.executable, str(repo / "train_tiny.py"), "--preset", "smoke", "--device", "cuda", "--out",
               str(scratch / "smoke")],
        bench=[sys.executable, str(repo / "bench.py"), "--device", "cuda"],
    )
    env = {**os.environ, "KDRL_TEST_DEVICE": "cuda"}  # read by the tests only
    t0 = time.time()
    parts = {}
    for name, command in commands.items():
        print(f"\n--- {name}: {' '.join(command[1:])}", flush=True)
        parts[name] = _run_part(command, repo, env)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{header}")
    for name, part in parts.items():
        print(f"  {name:<6} {'ok' if part['ok'] else 'FAILED':<6} {part['seconds']:6.0f} s | {part['summary']}")
    ok = all(part["ok"] for part in parts.values())
    failed = ", ".join(name for name, part in parts.items() if not part["ok"])
    print(f"check-gpu: {'all passed' if ok else 'FAILED: ' + failed} in {time.time() - t0:.0f} s", flush=True)
    return dict(ok=ok, parts=parts)


def _run_part(command: list[str], cwd: Path, env: dict) -> dict:
    """Run one part of check_gpu, echoing its output line by line. summary: the bench's lines, the demo's results
    heading (preset, device, time), or else the last line printed (pytest's count)."""
    t0 = time.time()
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        lines = []
        for raw in proc.stdout:  # bytes, split at \n only: a progress bar's \r updates stay on one line
            text = raw.decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            lines.append(text.split("\r")[-1].rstrip())  # what the line shows once its \r updates are drawn
    printed = [line for line in lines if line.strip()]
    picked = [line for line in printed if line.startswith(("bench ", "bench:", "# Results: "))]
    summary = " | ".join(picked) if picked else (printed[-1] if printed else "(no output)")
    return dict(ok=proc.returncode == 0, seconds=time.time() - t0, summary=summary)


# -----------------------------------------------------------------------------
# Main.


def main(argv=None) -> dict:
    """The command line: one bench or tool per run (the speed anchor by default); errors through parser.error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    command = parser.add_mutually_exclusive_group()
    command.add_argument("--trl", action="store_true",
                         help="the speed bench through TRL too: plain GRPOTrainer, train_trl grpo and kdrl "
                              "(requirements-trl.txt)")
    command.add_argument("--memory", action="store_true",
                         help="peak memory and time of a kdrl vs kdrl-full step, 151,665-token vocabulary "
                              "(bench_memory)")
    command.add_argument("--save-pair", metavar="DIR", default=None,
                         help="save a tiny random student/teacher pair and train.jsonl to DIR, then exit")
    command.add_argument("--check-gpu", action="store_true",
                         help="check a CUDA GPU end to end, a few minutes: the tests on it, train_tiny.py --preset "
                              "smoke and the speed bench (check_gpu)")
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="the speed bench and --trl: a saved causal LM to use as student and teacher "
                             "(default: build the anchor model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device of the speed bench and --trl (default: auto, cuda when available)")
    args = parser.parse_args(argv)
    if args.save_pair:
        return save_pair(Path(args.save_pair)) or {}
    try:
        if args.check_gpu:
            result = check_gpu()
            if not result["ok"]:
                raise SystemExit(1)
            return result
        device = train.resolve_device(args.device)
        if args.trl:
            return dict(bench=bench_trl(args.model, device=device.type))
        if args.memory:
            return dict(bench=bench_memory())
        return dict(bench=bench(args.model, device=device.type))
    except kdrl.KDRLError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
