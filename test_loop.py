"""Tests of kdrl.py's model-facing half: sampling, log-probs, rewards, the loop, checkpoints and the CLI.
Tiny Llama and Qwen2 models and a character tokenizer are built in code and saved to temporary
directories: nothing is downloaded."""
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import kdrl
from train_tiny import char_tokenizer

CHARS = "0123456789+=#| "


def _tiny(kind: str, vocab_size: int, seed: int):
    """A random tiny causal LM whose logit width vocab_size pads past the tokenizer's length."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    return (LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Saved student (Llama, logits padded to 24) and teacher (Qwen2, padded to 32), one tokenizer, data."""
    root = tmp_path_factory.mktemp("pair")
    tok = char_tokenizer(CHARS)
    for name, kind, width, seed in (("student", "llama", 24, 0), ("teacher", "qwen2", 32, 1)):
        _tiny(kind, width, seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rows = [{"prompt": f"{a}+{b}=", "answer": a + b} for a in range(1, 9) for b in range(1, 4)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _argv(root: Path, out: Path, *extra):
    return ["--student", str(root / "student"), "--teacher", str(root / "teacher"), "--train", str(root / "train.jsonl"),
            "--out", str(out), "--steps", "2", "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "8",
            "--minibatch-size", "4", "--lr", "1e-3", "--no-progress", *extra]


def _steps(out: Path) -> list[dict]:
    """The per-step metric rows, wall times left out (they are the only thing allowed to differ)."""
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if not r.get("eval")]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


# --- presets and the CLI ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(kdrl.METHODS))
def test_every_preset_trains(pair, tmp_path, method):
    """Each preset runs 2 steps end to end through main(argv), logs every step and saves a checkpoint."""
    out = tmp_path / method
    assert kdrl.main(_argv(pair, out, "--method", method, "--mu", "2", "--eval", str(pair / "train.jsonl"), "--eval-limit", "4")) == 0
    rows = _steps(out)
    assert [r["step"] for r in rows] == [0, 1]
    keys = {"grad_norm", "beta", "reward", "acc", "length", "truncated"} | ({"sft_loss"} if method == "sft" else {"pg_loss", "kd_loss", "entropy", "clip_frac", "ratio", "kd_frac"})
    assert keys <= set(rows[0])
    assert json.loads((out / "config.json").read_text())["method"] == method
    assert (out / "checkpoint" / "trainer_state.pt").exists()
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoint") is not None


def test_presets_and_flags_map_onto_config():
    """Every flag is a KDRLConfig field and back; explicit flags override the preset, the preset the defaults."""
    parser = kdrl.build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == {f.name for f in kdrl.dataclasses.fields(kdrl.KDRLConfig)}
    assert all("default:" in a.help for a in parser._actions if a.dest != "help")
    cfg = kdrl.config_from_args(["--method", "kdrl-anneal", "--beta-min", "2e-3"])
    assert (cfg.beta, cfg.beta_min, cfg.beta_decay_steps) == (5e-3, 2e-3, 80)
    assert kdrl.config_from_args(["--method", "rlad"]).trrd_alpha == 0.5
    for name, overrides in kdrl.METHODS.items():
        kdrl.validate_config(kdrl.KDRLConfig(method=name, **overrides))


def test_cli_subprocess(pair, tmp_path):
    """One real interpreter run of the documented command."""
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "kdrl.py", *_argv(pair, out, "--method", "kdrl")], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout and len(_steps(out)) == 2


def test_resume_is_exact(pair, tmp_path):
    """k steps, then --resume for k more, equals 2k uninterrupted steps: metrics and weights bit for bit."""
    flags = ("--method", "kdrl", "--seed", "3", "--mu", "2", "--minibatch-size", "4")
    a, b = tmp_path / "a", tmp_path / "b"
    assert kdrl.main(_argv(pair, a, *flags, "--steps", "4")) == 0
    assert kdrl.main(_argv(pair, b, *flags, "--steps", "2")) == 0
    assert kdrl.main(_argv(pair, b, *flags, "--steps", "4", "--resume")) == 0
    assert _steps(a) == _steps(b) and len(_steps(a)) == 4
    wa, wb = (AutoModelForCausalLM.from_pretrained(d / "checkpoint").state_dict() for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # and the run really trained: the weights moved away from the initial student
    w0 = AutoModelForCausalLM.from_pretrained(pair / "student").state_dict()
    assert not all(torch.equal(w0[k], wa[k]) for k in w0)


# --- bad input -------------------------------------------------------------------------------------


def _fails(argv, capsys, *needles):
    assert kdrl.main(argv) == 1
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_bad_inputs(pair, tmp_path, capsys):
    """Each bad input: a clear error naming the problem, exit code 1, no checkpoint written."""
    out = tmp_path / "o"
    _fails(_argv(pair, out, "--train", str(tmp_path / "nope.jsonl")), capsys, "nope.jsonl", "no such file")
    _fails(_argv(pair, out, "--student", str(tmp_path / "nomodel")), capsys, "--student", "no such directory")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": 2}\n{"prompt": "2+2=", "answer": 4\n')
    _fails(_argv(pair, out, "--train", str(bad)), capsys, "bad.jsonl, line 2", "malformed JSON")
    bad.write_text('{"prompt": "1+1=", "answer": 2}\n{"question": "2+2="}\n')
    _fails(_argv(pair, out, "--train", str(bad)), capsys, "line 2", '"prompt"')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _fails(_argv(pair, out, "--train", str(empty)), capsys, "empty dataset")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1+" * 40, "answer": 0}) + "\n")
    _fails(_argv(pair, out, "--train", str(long)), capsys, "line 1", "exceeds the context of 64")
    if not torch.cuda.is_available():
        _fails(_argv(pair, out, "--device", "cuda"), capsys, "CUDA is not available")
    assert not (out / "checkpoint").exists()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(pair, tmp_path, capsys):
    """A diverging run (absurd lr) stops with the step and the offending metric; the last good checkpoint stays."""
    out = tmp_path / "nan"
    err = _fails(_argv(pair, out, "--method", "kd", "--lr", "1e30", "--max-grad-norm", "0", "--save-every", "1", "--steps", "4"), capsys, "non-finite")
    step = int(re.search(r"at step (\d+)", err).group(1))
    assert step >= 1
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == step  # the checkpoint saved after the last good step
    assert not (out / ".checkpoint.tmp").exists()
    # a NaN reward reaches the loss: the error names the step and the offending metric
    cfg = kdrl.KDRLConfig(out=str(tmp_path / "nan2"), steps=2, group_size=2, prompts_per_step=2, max_new_tokens=4, progress=False)
    tok = char_tokenizer(CHARS)
    model = _tiny("llama", 24, 0)
    with pytest.raises(kdrl.KDRLError, match=r"non-finite loss at step 0 .*pg_loss"):
        kdrl.train(cfg, model, model, tok, [{"prompt": "1+1=", "answer": 2}], lambda p, c, ex: float("nan"))
    assert not (tmp_path / "nan2" / "checkpoint").exists()


def test_tokenizer_mismatch_is_refused(pair, tmp_path, capsys):
    """A teacher whose tokenizer differs only in its EOS id is refused, naming the difference."""
    other = char_tokenizer(CHARS)
    other.eos_token = "#"
    teacher = tmp_path / "teacher"
    _tiny("qwen2", 32, 1).save_pretrained(teacher)
    other.save_pretrained(teacher)
    _fails(_argv(pair, tmp_path / "o", "--teacher", str(teacher)), capsys, "eos_token_id")
    vocab = char_tokenizer(CHARS[::-1])  # same tokens, different ids
    vocab.save_pretrained(teacher)
    _fails(_argv(pair, tmp_path / "o", "--teacher", str(teacher)), capsys, "has id")


# --- sampling and log-probs ------------------------------------------------------------------------


class _Scripted(torch.nn.Module):
    """A fake causal LM: after position p it emits '5' while p < stop, then EOS (+100 logits)."""

    def __init__(self, tok, stop, width):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.five, self.eos, self.stop, self.width = tok.convert_tokens_to_ids("5"), tok.eos_token_id, stop, width

    def forward(self, input_ids, attention_mask, position_ids, **kw):
        B, L = input_ids.shape
        logits = torch.zeros(B, L, self.width)
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
    model = _Scripted(tok, stop=3, width=len(tok) + 3)
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
    logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=kdrl._positions(ro.attention_mask)).logits
    logp = torch.log_softmax(logits[:, -T - 1 : -1, :V].float() / temperature, -1)
    return logp.gather(2, ro.response_ids[..., None]).squeeze(-1) * ro.response_mask


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_token_logprobs_match_naive(kind, chunk):
    """Chunked, checkpointed log-probs equal log_softmax + gather, in value and gradient, at T = 0.7."""
    tok = char_tokenizer(CHARS)
    model = _tiny(kind, len(tok) + 5, seed=2)
    torch.manual_seed(0)
    ro = kdrl.sample_rollouts(model, tok, ["12+3=", "7=", "1+1+1="], 4, 24, temperature=0.7)
    # a quarter of the rows end before half-way, so the sampler has dropped finished rows from its KV cache
    assert (ro.response_mask.sum(1) < 12).float().mean() >= 0.25 and ro.response_mask.shape[1] > 12
    weights = torch.randn(ro.response_mask.shape)

    def grads(fn):
        model.zero_grad()
        out = fn()
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    ours, g1 = grads(lambda: kdrl.token_logprobs(model, ro.input_ids, ro.attention_mask, ro.response_mask, temperature=0.7, vocab_size=len(tok), chunk_size=chunk))
    ref, g2 = grads(lambda: _naive_logprobs(model, ro, len(tok), 0.7))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    for a, b in zip(g1, g2):
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
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, : len(tok)]
            ids.append(int(logits.argmax()))
            if ids[-1] == tok.eos_token_id:
                break
        n = len(ids) - len(tok(p)["input_ids"])
        assert ro.response_ids[i, :n].tolist() == ids[-n:] and int(ro.response_mask[i].sum()) == n


# --- rewards ---------------------------------------------------------------------------------------


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
    rewards, correct = kdrl.score_completions(kdrl.math_reward, examples, ["#### 3", "#### 2", "nothing"], 3, format_bonus=0.1)
    torch.testing.assert_close(rewards, torch.tensor([0.1, 1.1, 0.0]))
    assert correct.tolist() == [False, True, False]

    def broken(prompt, completion, example):
        raise KeyError("gold")

    with pytest.raises(kdrl.KDRLError, match=r"line 7 .*'1\+1='.*KeyError"):
        kdrl.score_completions(broken, examples, ["x"], 1)


def test_data_order_is_a_pure_function_of_seed_and_step():
    """Each epoch is a permutation: every example once per epoch; the same (seed, step) gives the same batch."""
    batches = [kdrl.batch_for_step(10, s, 5, seed=1) for s in range(4)]
    assert sorted(batches[0] + batches[1]) == list(range(10)) == sorted(batches[2] + batches[3])
    assert batches[0] == kdrl.batch_for_step(10, 0, 5, seed=1) != kdrl.batch_for_step(10, 0, 5, seed=2)
