"""Tests of train.py, train_trl.py, train_tiny.py and bench.py: the engine around kdrl.py's method.

The presets through the CLI, checkpoints and resume (bit-exact, refusals, across devices), bad input and its
errors, config validation and the method rules derived from METHODS, the progress lines, the demo and the benches,
and the same loss inside TRL (parity with kdrl.py, real steps, two processes). On tiny Llama and Qwen2 models and
a character tokenizer built in code and saved to temporary directories; nothing is downloaded. They run on CPU, or
on a GPU with `KDRL_TEST_DEVICE=cuda python -m pytest -q` (the few that only mean something on CPU say why they skip).
"""
import copy
import dataclasses
import multiprocessing
import os
import random
import threading
import io
import itertools
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

import bench
import kdrl
import train
import train_tiny
from test_kdrl import CHARS, DEVICE, _Scripted, _tiny
from train_tiny import char_tokenizer


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
    return ["--student", str(root / "student"), "--teacher", str(root / "teacher"),
            "--train", str(root / "train.jsonl"), "--out", str(out),
            "--steps", "2", "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "8",
            "--minibatch-size", "4", "--lr", "1e-3", "--no-progress", "--device", DEVICE, *extra]

def _steps(out: Path) -> list[dict]:
    """The per-step metric rows, wall times left out (they are the only thing allowed to differ)."""
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if not r.get("eval")]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]

@pytest.mark.parametrize("method", list(kdrl.METHODS))
def test_every_preset_trains(pair, tmp_path, method):
    """Each preset runs 2 steps end to end through main(argv), logs every step and saves a checkpoint; kd-then-grpo
    switches after the first, so both of its phases run."""
    out = tmp_path / method
    switch = ("--switch-step", "1") if method == "kd-then-grpo" else ()
    argv = _argv(pair, out, "--method", method, "--mu", "2", "--eval", str(pair / "train.jsonl"), "--eval-limit", "4",
                 *switch)
    assert train.main(argv) == 0
    rows = _steps(out)
    assert [r["step"] for r in rows] == [0, 1]
    assert [r.get("phase") for r in rows] == (["kd", "grpo"] if switch else [None, None])
    sft = method.startswith("sft")
    method_keys = {"sft_loss", "sft_kept"} if sft else {"pg_loss", "entropy", "clip_frac", "ratio", "kd_frac"}
    keys = {"grad_norm", "beta", "reward", "acc", "length", "truncated"} | method_keys
    teacher_keys = {"kd_loss", "kl_k1", "kl_k3"}  # logged only when the teacher was scored
    assert keys <= set(rows[0])
    no_teacher = method == "grpo" or sft
    assert (teacher_keys <= set(rows[0])) == (not no_teacher) and (teacher_keys & set(rows[0]) == set()) == no_teacher
    assert json.loads((out / "config.json").read_text())["method"] == method
    assert (out / "checkpoint" / "trainer_state.pt").exists()
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoint") is not None

def test_gradient_checkpointing_is_active_and_changes_nothing(pair, tmp_path):
    """cfg.gradient_checkpointing, through train.train as from the CLI, really checkpoints (HF only does so in train
    mode, so the update runs in train mode with dropout zeroed) and trains to the same weights as without it
    (float32, so the tolerance holds on a GPU too); set back to False on a model that checkpoints, it stops."""
    tok = char_tokenizer(CHARS)
    data = [{"prompt": f"{a}+1=", "answer": a + 1} for a in range(8)]
    weights, modes = [], []
    for gc in (False, True):
        model = AutoModelForCausalLM.from_pretrained(pair / "student").to(DEVICE)
        layer = model.model.layers[0]

        def record_mode(module, args, kwargs, gc=gc):  # gc bound now, not looked up when the hook runs
            modes.append((gc, module.training, torch.is_grad_enabled()))

        hook = layer.register_forward_pre_hook(record_mode, with_kwargs=True)
        cfg = kdrl.KDRLConfig(out=str(tmp_path / str(gc)), steps=2, group_size=2, prompts_per_step=2, max_new_tokens=6,
                              lr=1e-2, progress=False, dtype="float32", gradient_checkpointing=gc)
        train.train(cfg, model, _tiny("qwen2", 32, 1), tok, data, kdrl.math_reward)
        hook.remove()
        weights.append(model.state_dict())
        assert layer.gradient_checkpointing is gc
    train.set_activation_checkpointing(model, False)
    assert layer.gradient_checkpointing is False
    # the update's forwards
    assert {(gc, training) for gc, training, grad in modes if grad} == {(False, False), (True, True)}
    assert all(not training for gc, training, grad in modes if not grad)  # sampling and scoring: eval mode
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=1e-6)

def test_bfloat16_autocast_keeps_float32_master_weights(pair, tmp_path):
    """--dtype bfloat16 runs the forward passes under autocast; the student's weights and AdamW state stay float32."""
    out = tmp_path / "bf16"
    assert train.main(_argv(pair, out, "--dtype", "bfloat16")) == 0
    saved = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    rows = _steps(out)
    assert len(rows) == 2 and all(math.isfinite(r["pg_loss"]) and math.isfinite(r["kd_loss"]) for r in rows)

def test_presets_and_flags_map_onto_config():
    """Every flag is a KDRLConfig field and back; explicit flags override the preset, the preset the defaults."""
    parser = train.build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == {f.name for f in kdrl.dataclasses.fields(kdrl.KDRLConfig)}
    assert all("default:" in a.help for a in parser._actions if a.dest != "help")
    cfg = train.config_from_args(["--method", "kdrl-anneal", "--beta-min", "2e-3"])
    assert (cfg.beta, cfg.beta_min, cfg.beta_decay_steps) == (5e-3, 2e-3, 80)
    assert train.config_from_args(["--method", "rlad"]).trrd_alpha == 0.5
    for name, overrides in kdrl.METHODS.items():
        train.validate_config(kdrl.KDRLConfig(method=name, **overrides))

def test_cli_subprocess(pair, tmp_path):
    """One real interpreter run of the documented command."""
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "train.py", *_argv(pair, out, "--method", "kdrl")], capture_output=True,
                       text=True, cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout and len(_steps(out)) == 2

def test_resume_is_exact(pair, tmp_path):
    """k steps, then --resume for k more, equals 2k uninterrupted steps: metrics and weights bit for bit (on one
    device: on a GPU in its default bfloat16 autocast, deterministic kernels on)."""
    flags = ("--method", "kdrl", "--seed", "3", "--mu", "2", "--minibatch-size", "4")
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(_argv(pair, a, *flags, "--steps", "4")) == 0
    assert train.main(_argv(pair, b, *flags, "--steps", "2")) == 0
    assert train.main(_argv(pair, b, *flags, "--steps", "4", "--resume")) == 0
    assert _steps(a) == _steps(b) and len(_steps(a)) == 4
    wa, wb = (AutoModelForCausalLM.from_pretrained(d / "checkpoint").state_dict() for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # and the run really trained: the weights moved away from the initial student
    w0 = AutoModelForCausalLM.from_pretrained(pair / "student").state_dict()
    assert not all(torch.equal(w0[k], wa[k]) for k in w0)

def test_the_loop_learns_grpo_reward_and_kd_teacher(tmp_path):
    """End-to-end sign check of the loop (advantages aligned with their responses, loss signs): on a reward
    a random model can find (completion starts with '7'), GRPO raises the training accuracy from ~5% to over
    40% in 30 steps; and on-policy KD toward a different model lowers the KL to it by over half. Seeded and
    deterministic; a GPU draws other samples, and the margins are wide (observed on CPU: 77% accuracy, KL well below
    half)."""
    tok = char_tokenizer(CHARS)
    student, teacher = _tiny("llama", len(tok), 0), _tiny("llama", len(tok), 5)
    data = [{"prompt": f"{a}+{a}=", "answer": "7"} for a in range(10)]
    common = dict(steps=30, group_size=8, prompts_per_step=8, max_new_tokens=6, lr=3e-3, progress=False)
    cfg = kdrl.KDRLConfig.from_method("grpo", **common, out=str(tmp_path / "grpo"))
    train.train(cfg, copy.deepcopy(student), teacher, tok, data, lambda p, c, ex: float(c.startswith("7")))
    acc = [r["acc"] for r in _steps(tmp_path / "grpo")]
    assert sum(acc[:3]) / 3 < 0.15 and sum(acc[-3:]) / 3 > 0.4
    cfg = kdrl.KDRLConfig.from_method("kd", **common, out=str(tmp_path / "kd"))
    train.train(cfg, copy.deepcopy(student), teacher, tok, data, kdrl.math_reward)
    kl = [r["kl_k3"] for r in _steps(tmp_path / "kd")]
    assert sum(kl[-3:]) < 0.5 * sum(kl[:3])

def _fails(argv, capsys, *needles):
    assert train.main(argv) == 1
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
    assert not (out / "checkpoint").exists()

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(pair, tmp_path, capsys):
    _fails(_argv(pair, tmp_path / "o", "--device", "cuda"), capsys, "CUDA is not available")
    assert not (tmp_path / "o" / "checkpoint").exists()

def test_non_finite_loss_stops_and_keeps_last_checkpoint(pair, tmp_path, capsys):
    """A diverging run (absurd lr) stops with the step and the offending metric; the last good checkpoint stays."""
    out = tmp_path / "nan"
    argv = _argv(pair, out, "--method", "kd", "--lr", "1e30", "--max-grad-norm", "0", "--save-every", "1",
                 "--steps", "4")
    err = _fails(argv, capsys, "non-finite")
    step = int(re.search(r"at step (\d+)", err).group(1))
    assert step >= 1
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == step  # the checkpoint saved after the last good step
    assert not (out / ".checkpoint.tmp").exists()
    # a NaN reward reaches the loss: the error names the step and the offending metric
    cfg = kdrl.KDRLConfig(out=str(tmp_path / "nan2"), steps=2, group_size=2, prompts_per_step=2, max_new_tokens=4,
                          progress=False)
    tok = char_tokenizer(CHARS)
    model = _tiny("llama", 24, 0)
    with pytest.raises(kdrl.KDRLError, match=r"non-finite loss at step 0 .*pg_loss"):
        train.train(cfg, model, model, tok, [{"prompt": "1+1=", "answer": 2}], lambda p, c, ex: float("nan"))
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
    assert not (tmp_path / "o" / "checkpoint").exists()  # refused before any training or checkpoint

def test_data_order_is_a_pure_function_of_seed_and_step():
    """Each epoch is a permutation: every example once per epoch; the same (seed, step) gives the same batch."""
    batches = [train.batch_for_step(10, s, 5, seed=1) for s in range(4)]
    assert sorted(batches[0] + batches[1]) == list(range(10)) == sorted(batches[2] + batches[3])
    assert batches[0] == train.batch_for_step(10, 0, 5, seed=1) != train.batch_for_step(10, 0, 5, seed=2)

def test_demo_smoke_runs_every_arm(tmp_path):
    """`train_tiny.py --preset smoke --methods all` runs every METHODS preset and writes the table, the
    preregistered section, the JSON, the curves and one metrics.jsonl per run. No accuracy is asserted: the smoke
    preset checks the plumbing only (and its positive control fails, which the report must say)."""
    result = train_tiny.main(["--preset", "smoke", "--out", str(tmp_path), "--device", DEVICE, "--methods", "all"])
    arms = list(kdrl.METHODS)
    assert {r["method"] for r in result["rows"]} == {"teacher", "student (start)", *arms}
    report = (tmp_path / "results.md").read_text()
    for name in ("teacher", "student (start)", *arms):
        assert f"| {name} | 1 |" in report
    assert report.count("| P") == 4 and "no power (the control failed)" in report and not result["control"]["passed"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["preset"] == "smoke" and len(saved["rows"]) == 2 + len(arms) and saved["device"] == DEVICE
    for m in arms:
        assert len(_steps(tmp_path / f"{m}-seed0")) == train_tiny.PRESETS["smoke"].rl["steps"]
    phases = [r["phase"] for r in _steps(tmp_path / "kd-then-grpo-seed0")]  # KD, then GRPO from its switch on
    switch = next(r["switch_step"] for r in result["rows"] if r["method"] == "kd-then-grpo")
    assert phases == ["kd"] * switch + ["grpo"] * (len(phases) - switch) and 0 < switch < len(phases)

def test_demo_runs_fewer_steps_than_curve_points(tmp_path):
    """--steps below the preset's number of curve evaluations still runs (each segment at least one step)."""
    result = train_tiny.main(["--preset", "smoke", "--out", str(tmp_path), "--methods", "grpo,kd-then-grpo",
                              "--steps", "1", "--device", DEVICE])
    runs = [row for row in result["rows"] if row["method"] in ("grpo", "kd-then-grpo")]
    assert [point["step"] for point in runs[0]["curve"]] == [0, 1] and all(len(run["curve"]) == 2 for run in runs)

def test_demo_refuses_counts_below_one(tmp_path, capsys):
    """--seeds, --steps and --workers below 1 are refused by name, before anything runs or is written."""
    for flag in ("--seeds", "--steps", "--workers"):
        with pytest.raises(SystemExit):
            train_tiny.main(["--preset", "smoke", "--out", str(tmp_path / "o"), flag, "0"])
        assert f"{flag} 0: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

def test_area_under_the_curve_against_hand_computed_values():
    """area: the trapezoid mean of the curve over the run's steps."""
    curve = [dict(step=0, acc=0.2), dict(step=10, acc=0.25), dict(step=20, acc=0.35), dict(step=30, acc=0.31)]
    assert train_tiny.area(curve, "acc") == pytest.approx((2.25 + 3.0 + 3.3) / 30)
    assert train_tiny.area(curve[:2], "acc") == pytest.approx(0.225)

def test_demo_is_deterministic_on_one_machine(tmp_path):
    """The README's reproducibility claim, and no more: the same command on the same machine (same torch, same thread
    count; on a GPU, deterministic kernels, as this module sets) gives the same numbers; wall times aside. Across
    machines BLAS kernels differ, which it does not claim."""
    def numbers(out):
        result = train_tiny.main(["--preset", "smoke", "--out", str(out), "--methods", "grpo,kdrl,sft", "--device",
                                  DEVICE])
        drop = ("wall_s", "eval_s")
        rows = [{k: (v if k != "curve" else [{c: x for c, x in point.items() if c not in drop} for point in v])
                 for k, v in row.items() if k not in drop} for row in result["rows"]]
        return rows, [_steps(out / f"{m}-seed0") for m in ("grpo", "kdrl", "sft")]  # losses, KL, rewards per step

    (rows_a, steps_a), (rows_b, steps_b) = numbers(tmp_path / "a"), numbers(tmp_path / "b")
    assert rows_a == rows_b and len(rows_a) == 5
    assert steps_a == steps_b and all(math.isfinite(r["pg_loss"]) for r in steps_a[0])

def test_demo_splits_are_disjoint_and_the_teacher_data_has_its_designed_bug():
    """Train / val / test / OOD are disjoint and cover every 2-digit problem; OOD is every equal-tens problem (900).
    The teacher's solutions differ from the correct ones exactly in region B (both tens digits ≥ 5), where they drop
    the hundreds digit of the answer and nothing else, so its carries are right everywhere; OOD problems with a carry
    are the ones that need a step never seen in training."""
    p = train_tiny.PRESETS["cpu"]
    data = train_tiny.make_splits(p)
    keys = {name: {ex["prompt"] for ex in rows} for name, rows in data.items()}
    assert [len(keys[k]) for k in ("train", "val", "test", "ood")] == [p.n_train, p.n_val, p.n_test, 900]
    assert sum(map(len, keys.values())) == 90 * 90
    assert all(not (keys[x] & keys[y]) for x, y in itertools.combinations(keys, 2))
    tens_steps = set()
    for ex in data["train"]:
        a, b = map(int, ex["prompt"][:-1].split("+"))
        assert ex["solution"].endswith(f"#### {a + b}")
        bug = a // 10 >= 5 and b // 10 >= 5
        assert (ex["region"] == "B") == bug and (ex["teacher_solution"] != ex["solution"]) == bug
        assert int(ex["teacher_answer"]) == a + b - 100 * bug and ex["carry"] == (a % 10 + b % 10 >= 10)
        assert ex["teacher_solution"].split("####")[0] == ex["solution"].split("####")[0]  # the working is right
        assert kdrl.math_reward(ex["prompt"], ex["teacher_solution"], ex) == float(not bug)
        tens_steps.add(ex["solution"].split("|")[1])
    steps_anywhere = {step for ex in data["train"] for step in ex["solution"].split("|")[:-1]}
    for ex in data["ood"]:
        tens = ex["solution"].split("|")[1]
        assert tens not in tens_steps and (tens in steps_anywhere) == (not ex["carry"])
    assert sum(ex["region"] == "B" for ex in data["test"]) / p.n_test == pytest.approx(2000 / 7200, abs=0.02)
    pops = train_tiny.populations(data["test"])
    assert sum(map(len, pops.values())) == p.n_test and all(ex["carry"] for ex in pops["carry"])

def test_paired_test_holm_and_power_against_hand_computed_values():
    """The preregistered test: t on n − 1 df (a hand-computed t and the t distribution's value), the exact sign-flip
    p (all 2^n patterns: 2 / 2^n at best), Holm's step-down, and EXPERIMENTS.md's seed count."""
    result = train_tiny.paired_test([1.0, 2.0, 3.0])  # mean 2, sd 1, se 1/√3, t = 2√3 on 2 df
    assert result["mean"] == 2.0 and result["se"] == pytest.approx(1 / math.sqrt(3))
    assert result["p_t"] == pytest.approx(0.0742, abs=1e-4)  # 2 · (1 − F_t,2(3.4641))
    assert result["p_sign"] == pytest.approx(2 / 8)  # only the all-plus and all-minus patterns reach |6|
    assert train_tiny.paired_test([1.0, -1.0, 2.0, 0.5])["p_sign"] == pytest.approx(8 / 16)
    assert train_tiny.paired_test([0.3] * 4)["p_t"] == 0.0 and train_tiny.paired_test([0.0, 0.0])["p_t"] == 1.0
    assert train_tiny.holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]  # 0.005 ≤ .0125, .01 ≤ .0167,
    assert train_tiny.holm([0.001, 0.02, 0.02, 0.02]) == [True, False, False, False]  # .02 > .05 / 3
    assert train_tiny.holm([0.04, 0.001, 0.02, 0.01]) == [True] * 4  # ≤ .0125, .0167, .025, .05 in turn
    assert train_tiny.holm([math.nan, 0.001]) == [False, True]
    assert train_tiny.seeds_needed(sd=3.6, delta=5.0) == 8  # ((2.498 + 0.842) · 0.72)² + 2 = 7.8
    assert [train_tiny.seeds_needed(r["sd"], r["delta"]) for r in train_tiny.PRIMARIES] == [12, 10, 11, 12]
    assert train_tiny.seeds_needed(sd=1.0, delta=10.0, k=1) == 3

def test_primaries_verdicts_and_the_positive_control():
    """Each primary's verdict: held when Holm rejects and the difference goes the papers' way, reversed when it
    goes the other way, not shown otherwise; all "no power" when the positive control misses its threshold."""
    def row(method, seed, **values):
        base = dict(id=0.5, id_B=0.5, area_carry=0.1, gain_carry=0.3)  # control: +30 points
        return dict(method=method, seed=seed, **{**base, **values})

    noise = [0.001, -0.002, 0.0015, -0.001, 0.002, 0.0005]
    rows = [row("grpo", s) for s in range(6)] + [row("sft", s) for s in range(6)]
    rows += [row("kd", s, area_carry=0.1 + 0.05 + noise[s], id_B=0.5) for s in range(6)]  # P1 held
    rows += [row("kdrl", s, id_B=0.5 - 0.1 + noise[s], id=0.5 + noise[s]) for s in range(6)]  # P2 reversed, P3 not
    rows += [row("kd-then-grpo", s, id=0.5 + 0.03 + noise[s]) for s in range(6)]  # P4 held
    results, control = train_tiny.primaries(rows)
    assert control["passed"] and control["mean"] == pytest.approx(30.0)
    assert [r["verdict"] for r in results] == ["held", "reversed", "not shown", "held"]
    assert results[0]["mean"] == pytest.approx(5.0 + 100 * statistics.mean(noise)) and results[0]["n"] == 6
    weak = [dict(r, gain_carry=0.09) if r["method"] == "sft" else r for r in rows]  # +9 < the threshold
    assert {r["verdict"] for r in train_tiny.primaries(weak)[0]} == {"no power (the control failed)"}
    report = train_tiny.report_primaries(results, control)  # 6 seeds: fewer than any primary needs
    assert report.count("(this run: too few)") == 4 and f"| {results[0]['p_t']:.2g} |" in report
    assert results[0]["p_t"] < 1e-4 and "| 0.000 |" not in report  # a small p is printed, not rounded to 0


def test_tuned_settings_are_the_grids_and_each_arm_runs_at_its_own():
    """tiny_settings.json, written by --tune, names the command that chose it and one setting from GRID per arm, and
    arm_config gives each arm its own lr (and β for KDRL, which balances KD against the reward); an arm without a
    tuned setting takes its FALLBACK's or kdrl's."""
    record = json.loads(train_tiny.SETTINGS.read_text())
    assert record["command"].startswith("python train_tiny.py --tune") and set(record["chosen"]) == set(train_tiny.GRID)
    for arm, setting in record["chosen"].items():
        assert setting in train_tiny.GRID[arm]
        cfg = train_tiny.arm_config(arm, train_tiny.PRESETS["cpu"], 0, Path("x"), record["chosen"])
        assert cfg.lr == setting["lr"] and ("beta" not in setting or cfg.beta == setting["beta"])
    cfg = train_tiny.arm_config("kdrl-anneal", train_tiny.PRESETS["cpu"], 0, Path("x"), record["chosen"])
    assert cfg.beta == record["chosen"]["kdrl"]["beta"] and cfg.beta_min == cfg.beta / 5
    assert train_tiny.arm_config("rlad", train_tiny.PRESETS["cpu"], 0, Path("x"), record["chosen"]).lr == \
        record["chosen"]["grpo"]["lr"]

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_check_gpu_refuses_without_cuda(capsys):
    import bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--check-gpu"])
    assert e.value.code == 2 and "--check-gpu needs a CUDA GPU, and torch" in capsys.readouterr().err


def test_train_tiny_estimates_its_time_only_where_it_was_measured():
    """The estimate printed first comes from this project's CPU machine; on CUDA, which no one has measured, none."""
    p = train_tiny.PRESETS["cpu"]
    assert train_tiny.expected(p, list(train_tiny.ARMS), torch.device("cpu")).startswith("expected on 2 CPU cores")
    assert "no estimate" in train_tiny.expected(p, list(train_tiny.ARMS), torch.device("cuda"))


def test_train_tiny_no_longer_takes_the_bench_flags(capsys):
    """The benches and tools moved to bench.py: train_tiny.py refuses their old flags (argparse, exit 2)."""
    for flag in ("--bench", "--bench-trl", "--bench-memory", "--check-gpu"):
        with pytest.raises(SystemExit) as e:
            train_tiny.main([flag])
        assert e.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err

class _ScriptedProcess:
    """subprocess.Popen for one part of check_gpu: prints a scripted output, then exits with a scripted status."""

    def __init__(self, output: str, returncode: int):
        self.stdout, self.returncode = io.BytesIO(output.encode()), returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

def test_check_gpu_runs_the_tests_the_smoke_preset_and_the_bench_on_cuda(monkeypatch, capsys):
    """--check-gpu, seen from a CUDA machine (torch.cuda stubbed, each part's process scripted): the test suite with
    KDRL_TEST_DEVICE=cuda, then the smoke preset and the bench with --device cuda; the summary names the GPU and the
    versions and gives the tests' count, the bench's step times and peak memory; a failed part is named, exit 1."""
    import transformers

    import bench

    bench_out = ("bench: 6,304,000 parameters on cuda (Fake GPU), bfloat16 autocast over float32 weights\n"
                 "bench grpo median_step_s=0.50 peak_mib=120\nbench kdrl median_step_s=0.60 peak_mib=150\n")
    outputs = {"pytest": "....s.\n\n250 passed, 3 skipped in 150.00s\n", "bench.py": bench_out,
               "--preset": "teacher:  50%|#####     | 1/2\rteacher: 100%|##########| 2/2\n"
                           "# Results: preset `smoke`, device cuda, 1 seed(s) [0], total 12s\n| kdrl | 1 | ...\n"}
    failing, runs = set(), []

    def scripted_popen(command, cwd, env, **kwargs):
        (part,) = [key for key in outputs if key in command or Path(command[1]).name == key]
        runs.append((part, command, env.get("KDRL_TEST_DEVICE")))
        return _ScriptedProcess(outputs[part], 1 if part in failing else 0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Fake GPU")
    monkeypatch.setattr(subprocess, "Popen", scripted_popen)
    result = bench.check_gpu()
    assert [part for part, _, _ in runs] == ["pytest", "--preset", "bench.py"] and result["ok"]
    assert all(device == "cuda" for _, _, device in runs)  # the tests read it; the CLI runs say --device cuda
    assert runs[1][1][-4:-2] == ["--device", "cuda"] and runs[2][1][-2:] == ["--device", "cuda"]
    assert runs[1][1][2:4] == ["--preset", "smoke"] and runs[0][1][1:] == ["-m", "pytest", "-q"]
    summary = capsys.readouterr().out.split("\ncheck-gpu: Fake GPU")[-1].splitlines()
    versions = f" | torch {torch.__version__} (CUDA {torch.version.cuda}) | transformers {transformers.__version__}"
    assert summary[0] == versions
    assert summary[1].startswith("  tests  ok") and summary[1].endswith("| 250 passed, 3 skipped in 150.00s")
    assert summary[2].endswith("| # Results: preset `smoke`, device cuda, 1 seed(s) [0], total 12s")
    assert summary[3].endswith("| " + bench_out.strip().replace("\n", " | ")) and "peak_mib=150" in summary[3]
    assert summary[4].startswith("check-gpu: all passed in ")
    failing.add("bench.py")
    with pytest.raises(SystemExit) as e:
        bench.main(["--check-gpu"])
    assert e.value.code == 1 and "check-gpu: FAILED: bench in " in capsys.readouterr().out

def test_results_table_pairs_each_method_with_grpo_by_seed():
    """The paired columns' errors are those of the per-seed differences from grpo (here 10 and 20 points: ± 5.0),
    not the combined error of two means (± 18.0), since both methods start from the same student in each seed."""
    def row(method, seed, acc, b):
        return dict(method=method, seed=seed, id=acc, id_carry=acc, id_nocarry=acc, id_B=b, ood_seen=0.5,
                    ood_unseen=0.5, area_carry=acc, wall_s=3.0, zero_adv=[0.5])

    rows = [row("grpo", 0, 0.2, 0.1), row("grpo", 1, 0.4, 0.3), row("kd", 0, 0.3, 0.0), row("kd", 1, 0.6, 0.2)]
    lines = train_tiny.table(rows, ["grpo", "kd"]).splitlines()
    assert lines[0].endswith("| ID − grpo | B − grpo |")
    assert lines[2].startswith("| grpo | 2 | 30.0 ± 10.0 | 30.0 ± 10.0 | 30.0 ± 10.0 | 20.0 ± 10.0 |")
    assert lines[3].endswith("| — | — | 0.50 ± 0.0 | 3 ± 0.0 | +15.0 ± 5.0 | -10.0 ± 0.0 |")

def test_bench_prints_one_machine_readable_line_per_method(pair, capsys):
    """`bench.py --model DIR --device D` names the device and the dtype it runs in, then ends with a
    `bench <method> key=value ...` line for grpo and kdrl; on CUDA each also gives the peak allocated memory."""
    import bench

    bench.main(["--model", str(pair / "student"), "--device", DEVICE])
    printed = capsys.readouterr().out.strip().splitlines()
    (header,) = [line for line in printed if line.startswith("bench: ")]
    dtype = "bfloat16 autocast over float32 weights" if DEVICE == "cuda" else "float32"
    assert f" parameters on {DEVICE} (" in header and header.endswith(f", {dtype}"), header
    lines = printed[-2:]
    peak = r" peak_mib=\d+" if DEVICE == "cuda" else ""
    pattern = (r"bench {} median_step_s=\d+\.\d\d sampling_s=\d+\.\d\d teacher_s=\d+\.\d\d update_s=\d+\.\d\d"
               r" tokens_per_s=\d+ mean_len=\d+\.\d" + peak)
    assert re.fullmatch(pattern.format("grpo"), lines[0]) and re.fullmatch(pattern.format("kdrl"), lines[1]), lines

@pytest.mark.parametrize("method, reward, kept", [("sft", 1.0, 0.5), ("sft", 0.0, 0.0), ("sft-all", 0.0, 0.5)])
def test_sft_trains_only_on_ended_teacher_samples(tmp_path, method, reward, kept):
    """SFT keeps the teacher samples that ended (an end token within max_new_tokens) and, unless sft-all, were
    correct: a truncated sample that the reward calls correct is not trained on. sft_kept is that fraction."""
    tok = char_tokenizer(CHARS)
    teacher = _Scripted(tok, stop=3, width=len(tok) + 1).to(DEVICE)  # '5' until position 3, then EOS
    cfg = kdrl.KDRLConfig.from_method(method, out=str(tmp_path / method), steps=1, group_size=2, prompts_per_step=2,
                                      max_new_tokens=3, temperature=1.0, progress=False)
    data = [{"prompt": "1", "answer": 0}, {"prompt": "12", "answer": 0}]  # "1": 3 × '5', truncated; "12": ended

    def constant_reward(prompt, completion, example):
        return reward

    student = _tiny("llama", len(tok), 0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    train.train(cfg, student, teacher, tok, data, constant_reward)
    (row,) = _steps(tmp_path / method)
    assert row["sft_kept"] == kept and row["truncated"] == 0.5 and "zero_adv_frac" not in row
    moved = any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert moved == (kept > 0)  # nothing kept: no optimizer step at all (AdamW would still move the weights)

@pytest.mark.parametrize("rewards, expected",
                         [((1.0, 1.0, 0.0, 1.0), 0.5), ((0.0, 1.0, 1.0, 0.0), 0.0), ((1.0,) * 4, 1.0)])
def test_zero_adv_frac_counts_groups_without_a_policy_gradient(tmp_path, rewards, expected):
    """zero_adv_frac is the share of groups whose rewards are all equal (advantage exactly 0)."""
    tok = char_tokenizer(CHARS)
    cfg = kdrl.KDRLConfig.from_method("grpo", out=str(tmp_path / "z"), steps=1, group_size=2, prompts_per_step=2,
                                      max_new_tokens=3, progress=False)
    calls = iter(rewards)

    def scripted_reward(prompt, completion, example):
        return next(calls)

    student, teacher = _tiny("llama", len(tok), 0), _tiny("llama", len(tok), 1)
    train.train(cfg, student, teacher, tok, [{"prompt": "1", "answer": 0}], scripted_reward)
    (row,) = _steps(tmp_path / "z")
    assert row["zero_adv_frac"] == expected

@pytest.fixture(scope="module")
def large_pair(tmp_path_factory):
    """The real-vocabulary fixture: 151,665 tokens with a ChatML template, Qwen2 student and teacher with logits
    151,936 and 152,064 wide, generation configs listing <|im_end|> and <|endoftext|>."""
    from bench import save_large_vocab_pair

    return save_large_vocab_pair(tmp_path_factory.mktemp("large"), hidden_size=16, layers=1)

def test_large_vocab_fixture_is_what_it_claims(large_pair):
    from transformers import AutoTokenizer

    tok = train.load_tokenizer(str(large_pair / "student"), "student")
    assert len(tok) == 151_665 and tok.chat_template
    widths = [AutoModelForCausalLM.from_pretrained(large_pair / n).config.vocab_size for n in ("student", "teacher")]
    assert widths == [151_936, 152_064]
    student = AutoModelForCausalLM.from_pretrained(large_pair / "student")
    assert kdrl.end_token_ids(tok, student) == [151_643, 151_645]
    prompt = kdrl.format_prompt(tok, "12+3=")
    assert prompt == "<|im_start|>user\n12+3=<|im_end|>\n<|im_start|>assistant\n"
    assert AutoTokenizer.from_pretrained(large_pair / "teacher").convert_tokens_to_ids("<|im_start|>") == 151_644

@pytest.mark.parametrize("method", list(kdrl.METHODS))
def test_every_preset_runs_on_a_real_vocabulary(large_pair, tmp_path, method):
    """Each preset, 2 steps through main() on the 151,665-token pair; the checkpoint loads in plain
    AutoModelForCausalLM, and its tokenizer still renders the chat template."""
    from transformers import AutoTokenizer

    out = tmp_path / method
    argv = ["--student", str(large_pair / "student"), "--teacher", str(large_pair / "teacher"), "--train",
            str(large_pair / "train.jsonl"), "--out", str(out), "--method", method, "--steps", "2", "--group-size", "2",
            "--prompts-per-step", "2", "--max-new-tokens", "6", "--logprob-chunk", "4", "--no-progress",
            "--device", DEVICE, *(("--switch-step", "1") if method == "kd-then-grpo" else ())]
    assert train.main(argv) == 0
    rows = _steps(out)
    assert method != "kd-then-grpo" or [r["phase"] for r in rows] == ["kd", "grpo"]
    assert [r["step"] for r in rows] == [0, 1] and all(math.isfinite(r.get("pg_loss", r.get("sft_loss"))) for r in rows)
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    assert model.config.vocab_size == 151_936
    tok = AutoTokenizer.from_pretrained(out / "checkpoint")
    chat = [{"role": "user", "content": "1+1="}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True).endswith("<|im_start|>assistant\n")

@pytest.mark.parametrize("field, value, needle", [
    ("beta", -0.1, "beta=-0.1: must be >= 0"),
    ("beta", float("nan"), "beta=nan"),
    ("beta_min", 0.01, "beta_min=0.01: must be in [0, beta=0.005]"),
    ("clip_eps_low", 1.0, "clip_eps_low=1.0: must be in [0, 1)"),
    ("clip_eps_high", -0.1, "clip_eps_high=-0.1"),
    ("lr", 0.0, "lr=0.0: must be > 0"),
    ("adv_eps", -1e-6, "adv_eps=-1e-06: must be >= 0"),
    ("trrd_clamp", 0.0, "trrd_clamp=0.0: must be > 0"),
    ("kd_gamma", 1.5, "kd_gamma=1.5: must be in [0, 1]"),
    ("max_grad_norm", -1.0, "max_grad_norm=-1.0"),
])
def test_config_validation_names_the_field(field, value, needle):
    with pytest.raises(kdrl.KDRLError) as e:
        train.validate_config(kdrl.KDRLConfig(**{field: value}))
    assert needle in str(e.value)

def test_full_kl_is_refused_in_reward_mode_and_without_a_kd_term():
    with pytest.raises(kdrl.KDRLError, match="kd_kind='full' needs kd_mode='loss'"):
        train.validate_config(kdrl.KDRLConfig.from_method("kdrl-seq", kd_kind="full"))
    # β = 0: nothing to compute (it used to crash in the loss, or run the KL for nothing)
    for method in ("grpo", "rlad"):
        with pytest.raises(kdrl.KDRLError, match="kd_kind='full' with beta=0"):
            train.validate_config(kdrl.KDRLConfig.from_method(method, kd_kind="full"))

def test_method_presets_are_one_entry_point_and_contradictions_are_refused(pair, tmp_path, capsys):
    """KDRLConfig.from_method applies the preset; a config whose fields contradict its method is refused by
    validate_config and so by train() (KDRLConfig(method="grpo") would otherwise train KDRL); knobs may be tuned."""
    for name in kdrl.METHODS:
        train.validate_config(kdrl.KDRLConfig.from_method(name))
    refused = [
        (dict(method="grpo"), "beta=0.005 contradicts method='grpo'"),
        (dict(method="rlad"), "trrd_alpha=None contradicts method='rlad'"),
        (dict(method="sft"), "sft=False contradicts method='sft'"),
        (dict(method="kdrl", trrd_alpha=0.5), "trrd_alpha=0.5 contradicts method='kdrl'"),
        (dict(method="kdrl", beta=0.0), "beta=0.0 contradicts method='kdrl', which needs beta > 0"),
        (dict(method="kdrl", kd_mask="response"), "kd_mask='response' contradicts method='kdrl'"),
        (dict(method="kdrl-mask", kd_mask="none"), "kd_mask='none' contradicts method='kdrl-mask'"),
        (dict(method="kdrl-seq", kd_mode="loss"), "kd_mode='loss' contradicts method='kdrl-seq'"),
        (dict(method="kdrl-full", kd_kind="k2"), "kd_kind='k2' contradicts method='kdrl-full'"),
        (dict(method="kd", use_reward=True, beta=1.0), "use_reward=True contradicts method='kd'"),
        (dict(method="kd", switch_step=10), "switch_step=10 contradicts method='kd'"),
        (dict(method="kd-then-grpo", switch_step=0), "switch_step=0 contradicts method='kd-then-grpo'"),
        (dict(method="kd-then-grpo", use_reward=True), "use_reward=True contradicts method='kd-then-grpo'"),
        (dict(method="grpo", beta=0.0, switch_patience=2), "switch_patience=2 contradicts method='grpo'"),
    ]
    for fields, needle in refused:
        method = fields.pop("method")
        cfg = kdrl.KDRLConfig.from_method(method, **fields) if fields else kdrl.KDRLConfig(method=method)
        with pytest.raises(kdrl.KDRLError) as e:
            train.validate_config(cfg)
        assert needle in str(e.value), str(e.value)
    tuned = [("kd", dict(beta=0.5)), ("kdrl", dict(kd_kind="k3")), ("kdrl-mask", dict(kd_mask="group")),
             ("kdrl-anneal", dict(beta_decay_steps=200)), ("rlad", dict(trrd_alpha=0.3)),
             ("kdrl-seq", dict(kd_gamma=0.5)), ("kd-then-grpo", dict(switch_step=7, switch_patience=2))]
    for method, knobs in tuned:
        train.validate_config(kdrl.KDRLConfig.from_method(method, **knobs))
    with pytest.raises(kdrl.KDRLError, match="contradicts method='grpo'"):
        cfg = kdrl.KDRLConfig(method="grpo", out=str(tmp_path / "x"))
        train.train(cfg, None, None, None, [{"prompt": "1", "answer": 1}], kdrl.math_reward)
    assert not (tmp_path / "x").exists()
    # the CLI: a flag that contradicts the method is refused; one that tunes a preset value says it won
    _fails(_argv(pair, tmp_path / "y", "--method", "grpo", "--beta", "0.01"), capsys,
           "beta=0.01 contradicts method='grpo'")
    cfg = train.config_from_args(["--method", "kd", "--beta", "0.5"])
    assert cfg.beta == 0.5 and "--beta 0.5 overrides --method kd's beta=1.0" in capsys.readouterr().err
    assert train.config_from_args(["--method", "rlad", "--trrd-alpha", "none", "--beta-min", "none"]).trrd_alpha is None

def test_stopped_improving_is_early_stopping():
    """The patience rule: none of the last `patience` scores beats the best before them (a tie does not beat)."""
    cases = [([], 1, False), ([0.3], 1, False), ([0.1, 0.2], 1, False), ([0.2, 0.2], 1, True), ([0.2, 0.1], 1, True),
             ([0.1, 0.3, 0.2, 0.2], 2, True), ([0.1, 0.3, 0.2, 0.2], 3, False), ([0.1, 0.3, 0.2, 0.4], 2, False),
             ([0.5, 0.1, 0.1], 0, False)]
    for scores, patience, want in cases:
        assert train.stopped_improving(scores, patience) is want, (scores, patience)

def test_kd_then_grpo_trains_as_kd_then_grpo_and_resumes_exactly_across_the_switch(pair, tmp_path):
    """Through main(): the steps before switch_step are the kd preset's run bit for bit (same seed, same batches);
    from it on the rows are GRPO's (β = 0, no teacher scored, AdamW restarted). Stopping before the switch, at it or
    after it and resuming gives the unbroken run's metrics and weights, bit for bit."""
    flags = ("--seed", "3", "--mu", "2")
    seq = (*flags, "--method", "kd-then-grpo", "--switch-step", "2")
    full, kd = tmp_path / "full", tmp_path / "kd"
    assert train.main(_argv(pair, full, *seq, "--steps", "4")) == 0
    assert train.main(_argv(pair, kd, *flags, "--method", "kd", "--steps", "2")) == 0
    rows = _steps(full)
    assert [r["phase"] for r in rows] == ["kd", "kd", "grpo", "grpo"]
    assert [{k: v for k, v in r.items() if k != "phase"} for r in rows[:2]] == _steps(kd)
    assert all(r["beta"] == 0 and "kl_k1" not in r and "zero_adv_frac" in r for r in rows[2:])
    # AdamW restarted at the switch: 2 GRPO steps × μ = 2 optimizer steps since, not 8 since the start
    adam = torch.load(full / "checkpoint" / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert adam and {float(state["step"]) for state in adam.values()} == {4.0}
    for stop in (1, 2, 3):  # checkpoints before the switch, at it, after it
        out = tmp_path / f"stop{stop}"
        assert train.main(_argv(pair, out, *seq, "--steps", str(stop))) == 0
        assert train.main(_argv(pair, out, *seq, "--steps", "4", "--resume")) == 0
        assert _steps(out) == rows
        wa, wb = (AutoModelForCausalLM.from_pretrained(d / "checkpoint").state_dict() for d in (full, out))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)

def _teacher_first_chars(teacher, tok, rows: list[dict]) -> list[dict]:
    """rows with "target": the first two characters of the teacher's greedy response to each prompt."""
    ro = kdrl.sample_rollouts(teacher, tok, [row["prompt"] for row in rows], 1, 2, 0.0)
    return [dict(row, target=text) for row, text in zip(rows, kdrl.decode(tok, ro), strict=True)]


def _starts_like_the_teacher(prompt: str, completion: str, example: dict) -> float:
    """A reward a tiny student earns by distillation: its response starts as the teacher's greedy one does."""
    return float(completion[:2] == example["target"])


def test_kd_then_grpo_patience_switches_where_the_rule_says_and_resumes_exactly(pair, tmp_path):
    """With switch_patience and an eval set, the first GRPO step is the one after the first evaluation at which
    stopped_improving holds, read back from the logged accuracies, which here move (the reward is to start as the
    teacher does, which KD teaches), so the rule decides, not a row of zeros; a run stopped before that evaluation,
    or at the switch, and resumed switches at the same step, bit for bit."""
    tok = char_tokenizer(CHARS)
    teacher = _tiny("qwen2", 32, 1)
    data = _teacher_first_chars(teacher, tok, [{"prompt": f"{a}+{b}=", "answer": a + b} for a in range(1, 9)
                                               for b in range(1, 4)])

    def run(out, steps, seed, resume=False):
        cfg = kdrl.KDRLConfig.from_method("kd-then-grpo", out=str(out), steps=steps, seed=seed, switch_step=8,
                                          switch_patience=2, eval_every=1, eval_limit=12, group_size=4,
                                          prompts_per_step=2, max_new_tokens=6, lr=3e-2, minibatch_size=4,
                                          progress=False, resume=resume)
        model = AutoModelForCausalLM.from_pretrained(pair / "student").to(DEVICE)
        if resume:
            model = AutoModelForCausalLM.from_pretrained(out / "checkpoint").to(DEVICE)
        train.train(cfg, model, teacher, tok, data, _starts_like_the_teacher, eval_set=data[::2])
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        scores = [row["acc_greedy"] for row in logged if row.get("eval") and not row.get("final")]
        return scores, _steps(out)

    for seed in range(8):  # the first seed whose accuracies move before the switch (premise, on any device)
        scores, rows = run(tmp_path / f"full{seed}", 7, seed)
        first_grpo = next(i + 1 for i in range(len(scores)) if train.stopped_improving(scores[: i + 1], 2))
        if len(set(scores[:first_grpo])) > 1 and 3 < first_grpo < 7:
            break
    assert len(set(scores[:first_grpo])) > 1 and 3 < first_grpo < 7, scores  # the premise held for some seed
    assert [r["phase"] for r in rows] == ["kd"] * first_grpo + ["grpo"] * (7 - first_grpo)
    for stop in (first_grpo - 1, first_grpo):  # before the evaluation that switches, and at the switch
        out = tmp_path / f"stop{stop}"
        run(out, stop, seed)
        assert run(out, 7, seed, resume=True)[1] == rows


def test_kd_then_grpo_patience_refusals(pair, tmp_path, capsys):
    """switch_patience without an eval set is refused before anything is written; until the switch, the evaluations
    that steer it may not change on resume; after it, or at a checkpoint written at the fixed switch_step, no eval set
    is needed."""
    base = ("--seed", "1", "--lr", "3e-2", "--method", "kd-then-grpo", "--switch-step", "5", "--switch-patience", "1")
    flags = (*base, "--eval", str(pair / "train.jsonl"), "--eval-every", "1", "--eval-limit", "6")
    _fails(_argv(pair, tmp_path / "x", *base, "--steps", "2"), capsys, "switch_patience needs an eval set")
    assert not (tmp_path / "x").exists()  # refused before anything is written
    early = tmp_path / "early"
    patient = (*base[:-1], "9")  # patience 9: it cannot fire within these steps
    assert train.main(_argv(pair, early, *patient, *flags[len(base):], "--steps", "1")) == 0
    _fails(_argv(pair, early, *patient, *flags[len(base):-2], "--eval-limit", "5", "--steps", "3", "--resume"),
           capsys, "has not switched yet", "eval_limit (checkpoint 6, now 5)")
    switched = tmp_path / "switched"
    assert train.main(_argv(pair, switched, *flags, "--switch-step", "2", "--steps", "3")) == 0
    assert train.main(_argv(pair, switched, *base, "--switch-step", "2", "--steps", "4", "--resume")) == 0
    assert len(_steps(switched)) == 4  # switched: no eval set needed
    at_switch = tmp_path / "at_switch"  # a checkpoint at the fixed switch_step, the patience rule never fired
    assert train.main(_argv(pair, at_switch, *patient, *flags[len(base):], "--steps", "5")) == 0
    assert train.main(_argv(pair, at_switch, *patient, "--steps", "7", "--resume")) == 0
    assert [r["phase"] for r in _steps(at_switch)] == ["kd"] * 5 + ["grpo"] * 2


@pytest.fixture(scope="module")
def one_step_run(pair, tmp_path_factory):
    """A 1-step kdrl run with a checkpoint, copied by each resume test."""
    out = tmp_path_factory.mktemp("resume") / "run"
    assert train.main(_argv(pair, out, "--method", "kdrl", "--steps", "1")) == 0
    return out

@pytest.mark.parametrize("flags, field", [
    (("--beta", "0.01"), "beta"),
    (("--kd-kind", "k3"), "kd_kind"),
    (("--method", "kdrl-mask"), "method"),
    (("--group-size", "2"), "group_size"),
    (("--lr", "2e-3"), "lr"),
    (("--seed", "7"), "seed"),
    (("--temperature", "0.5"), "temperature"),
    (("--mu", "2"), "mu"),
    (("--train", "OTHER"), "train"),
])
def test_resume_refuses_a_config_that_changes_the_math(pair, one_step_run, tmp_path, capsys, flags, field):
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    if flags[1] == "OTHER":
        other = tmp_path / "other.jsonl"
        shutil.copy(pair / "train.jsonl", other)
        flags = (flags[0], str(other))
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    argv = _argv(pair, out, "--method", "kdrl", "--steps", "2", "--resume", *flags)
    err = _fails(argv, capsys, "--resume", f"{field} (checkpoint ")
    assert "--" + field.replace("_", "-") in err
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before  # untouched
    assert len(_steps(out)) == 1

def test_resume_allows_what_leaves_the_math_alone_and_refuses_fewer_steps(pair, tmp_path, capsys):
    """A resume may not shorten the run (a 2-step checkpoint, --steps 1: refused by that rule, not by validation); it
    may change the fields of RESUME_BIT_EXACT and RESUME_OTHER_ROUNDING. Changing one of the second kind (here the
    minibatch and chunk sizes) computes the same maths in another order: a note says the run is not bit for bit,
    and its weights stay within float32 rounding of the unbroken run's."""
    out, unbroken = tmp_path / "run", tmp_path / "unbroken"
    assert train.main(_argv(pair, out, "--method", "kdrl", "--steps", "2")) == 0
    _fails(_argv(pair, out, "--method", "kdrl", "--steps", "1", "--resume"), capsys,
           "steps=1 is below the checkpoint's step 2", "it may only grow")
    assert train.main(_argv(pair, unbroken, "--method", "kdrl", "--steps", "4")) == 0
    argv = _argv(pair, out, "--method", "kdrl", "--steps", "4", "--resume", "--minibatch-size", "2",
                 "--logprob-chunk", "3", "--save-every", "1", "--eval-limit", "2")
    capsys.readouterr()
    assert train.main(argv) == 0 and len(_steps(out)) == 4
    err = capsys.readouterr().err
    assert "note: --resume with another minibatch_size (4 → 2), logprob_chunk (256 → 3)" in err
    assert "not bit for bit" in err
    wa, wb = (AutoModelForCausalLM.from_pretrained(d / "checkpoint").state_dict() for d in (out, unbroken))
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5) for k in wa)

def _step_lines(text: str) -> list[dict]:
    """The `|`-separated per-step lines in printed output, each as {field: value}."""
    lines = [line for line in text.splitlines() if line.startswith("step ") and " | " in line]
    return [dict(field.split(" ", 1) for field in line.split(" | ")) for line in lines]

def test_step_lines_every_step_without_a_bar_and_every_log_every_steps_with_one(pair, tmp_path, capsys):
    """--no-progress prints one `|` line per step, with that step's numbers as metrics.jsonl has them; with the
    progress bar, one line every --log-every steps."""
    out = tmp_path / "plain"
    assert train.main(_argv(pair, out, "--method", "kdrl", "--steps", "3")) == 0
    lines = _step_lines(capsys.readouterr().out)
    assert [line["step"] for line in lines] == ["1/3", "2/3", "3/3"]
    for line, row in zip(lines, _steps(out), strict=True):
        assert line["reward"] == f"{row['reward']:.3f}" and line["kl"] == f"{row['kl_k1']:.4f}"
        assert line["pg_loss"] == f"{row['pg_loss']:.4f}" and line["len"] == f"{row['length']:.0f}"
    argv = [arg for arg in _argv(pair, tmp_path / "bar", "--method", "grpo", "--steps", "3") if arg != "--no-progress"]
    assert train.main([*argv, "--log-every", "2"]) == 0
    lines = _step_lines(capsys.readouterr().out)
    assert [line["step"] for line in lines] == ["2/3"] and "kl" not in lines[0]  # grpo scores no teacher

def test_resume_refuses_a_checkpoint_missing_a_field(pair, one_step_run, tmp_path, capsys):
    """A checkpoint written before a field existed (here kd_baseline, whose new default changes kdrl-seq's math) is
    refused rather than resumed with the new default."""
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    path = out / "checkpoint" / "kdrl_config.json"
    saved = json.loads(path.read_text())
    del saved["kd_baseline"]
    path.write_text(json.dumps(saved))
    err = _fails(_argv(pair, out, "--method", "kdrl", "--steps", "2", "--resume"), capsys, "--resume")
    assert "kd_baseline (absent from the checkpoint" in err and len(_steps(out)) == 1

def test_resume_loads_no_pickled_code(pair, one_step_run, tmp_path, capsys):
    """trainer_state.pt loads with weights_only=True: a pickled object in it is refused, not run."""
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    # a class: needs unpickling code
    torch.save(dict(state, payload=_Scripted), out / "checkpoint" / "trainer_state.pt")
    err = _fails(_argv(pair, out, "--method", "kdrl", "--steps", "2", "--resume"), capsys, "--resume")
    assert "cannot read the checkpoint" in err and "UnpicklingError" in err

def test_resume_with_other_eval_every_is_exact_and_drops_the_final_eval(pair, tmp_path):
    """Evaluation runs on its own RNG stream, so a run resumed with evaluations every step trains exactly as one
    without; the shorter run's final-eval line does not stay behind as if it were an intermediate one."""
    data = ("--eval", str(pair / "train.jsonl"), "--eval-limit", "3", "--seed", "2")
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(_argv(pair, a, "--method", "kdrl", "--steps", "3", *data)) == 0
    assert train.main(_argv(pair, b, "--method", "kdrl", "--steps", "1", *data)) == 0
    assert train.main(_argv(pair, b, "--method", "kdrl", "--steps", "3", "--eval-every", "1", "--resume", *data)) == 0
    assert _steps(a) == _steps(b)
    evals = [r for r in map(json.loads, (b / "metrics.jsonl").read_text().splitlines()) if r.get("eval")]
    assert [(r["step"], r.get("final", False)) for r in evals] == [(1, False), (2, True)]

def test_interrupted_save_keeps_a_good_checkpoint(pair, one_step_run, tmp_path, monkeypatch):
    """A save interrupted between its two renames leaves only .checkpoint.old; the next save must not delete it
    before its own checkpoint is in place (here that save is interrupted too, at its last rename)."""
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    (out / "checkpoint").rename(out / ".checkpoint.old")
    model = AutoModelForCausalLM.from_pretrained(out / ".checkpoint.old")
    optimizer = torch.optim.AdamW(model.parameters())
    rename = Path.rename

    def interrupted(self, target):
        if self.name == ".checkpoint.tmp":
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(out, 2, model, char_tokenizer(CHARS), optimizer, kdrl.KDRLConfig())
    monkeypatch.undo()
    state = train.read_checkpoint(out / "checkpoint")
    train.restore_checkpoint(state, model, optimizer)
    assert state["step"] == 1  # the good one, step 1, survived

TRL_METHODS = [m for m in kdrl.METHODS if m not in ("sft", "sft-all", "kdrl-full", "kd-then-grpo")]

@pytest.fixture(scope="module")
def train_trl():
    return pytest.importorskip("train_trl")

def _fixed_rollouts(prompts, trainer):
    """A deterministic rollout_func for TRL: completion g of the global batch depends on g and its prompt only,
    so 1 and 2 processes see the same global batch. Mixes right and wrong answers, EOS and truncation."""
    tok = trainer.processing_class
    rank, n = trainer.accelerator.process_index, len(prompts)
    completions = []
    for i, prompt in enumerate(prompts):
        g = rank * n + i
        a, b = prompt.rstrip("=").split("+")
        text = f"#### {int(a) + int(b) if g % 3 else 0}"[: 3 + g % 5]
        eos = [tok.eos_token_id] if g % 4 else []
        completions.append(tok(text, add_special_tokens=False)["input_ids"] + eos)
    return dict(prompt_ids=tok(text=prompts)["input_ids"], completion_ids=completions, logprobs=None)

def _trl_trainer(train_trl, pair, tmp_path, method, **overrides):
    cfg = kdrl.KDRLConfig.from_method(method, **{**dict(
        student=str(pair / "student"), teacher=str(pair / "teacher"), train=str(pair / "train.jsonl"),
        out=str(tmp_path / method), steps=2, group_size=4, prompts_per_step=2, max_new_tokens=8, minibatch_size=8,
        lr=1e-3, progress=False, device=DEVICE, temperature=0.7), **overrides})
    tok = train.load_tokenizer(cfg.student, "student")
    examples = train.load_jsonl(cfg.train)
    student = train.load_model(cfg.student, torch.device("cpu"), torch.float32, "student")  # TRL moves it to DEVICE
    trainer = train_trl.KDRLTrainer(cfg, student, cfg.teacher, kdrl.math_reward, examples,
                                   args=train_trl.grpo_config(cfg, 1),
                                   train_dataset=train_trl.dataset_for(tok, examples),
                                   processing_class=tok, rollout_func=_fixed_rollouts)
    return trainer, cfg, tok, examples

@pytest.mark.parametrize("method", TRL_METHODS)
def test_trl_loss_and_gradient_equal_kdrl(train_trl, pair, tmp_path, method, monkeypatch):
    """The subclass's whole path (rewards, advantages, KD masks, teacher log-probs, the loss) against kdrl.py's own
    functions on the same completions: equal rewards and advantages, and equal loss and gradient in float32 (on a GPU
    too: dtype float32, no bfloat16 autocast), with μ = 2 (old log-probs ≠ current), a vLLM-style importance weight,
    and β at the annealing's kdrl step."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    overrides = dict(mu=2, kd_mask="group", dtype="float32") if method == "kdrl-mask" else dict(mu=2, dtype="float32")
    if method == "kdrl-seq":
        overrides["kd_baseline"] = "none"  # the leave-one-out baseline needs whole groups: refused in TRL
    trainer, cfg, tok, examples = _trl_trainer(train_trl, pair, tmp_path, method, **overrides)
    G, index = cfg.group_size, (0, 5)
    inputs = [dict(prompt=examples[i]["prompt"], kdrl_index=i) for i in index for _ in range(G)]
    batch = trainer._generate_and_score_completions(inputs)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    mask = batch["completion_mask"].bool()
    B, T = mask.shape
    g = torch.Generator().manual_seed(0)
    # kdrl.py's own pipeline on the same completions
    truncated = ~(batch["completion_ids"] == tok.eos_token_id).any(1)
    ro = kdrl.Rollouts(ids, attn, mask, torch.zeros(B, T, device=DEVICE), truncated)
    rewards, correct = kdrl.score_completions(kdrl.math_reward, [examples[i] for i in index], kdrl.decode(tok, ro), G)
    rewards, correct = rewards.to(DEVICE), correct.to(DEVICE)
    prompts = [examples[i]["prompt"] for i in index for _ in range(G)]
    assert 0 < correct.sum() < B and (
        mask.sum(1).tolist() == [len(c) for c in _fixed_rollouts(prompts, trainer)["completion_ids"]]
    )
    adv = torch.zeros(B, device=DEVICE)
    if cfg.use_reward:
        adv = kdrl.grpo_advantages(rewards, G, cfg.scale_adv_by_std, cfg.adv_eps)
    torch.testing.assert_close(batch["advantages"], adv, rtol=0, atol=0)
    assert torch.equal(batch["kd_keep"], kdrl.kd_response_mask(correct, cfg.kd_mask, G))
    V, temp = len(tok), cfg.temperature
    teacher = AutoModelForCausalLM.from_pretrained(pair / "teacher").eval().to(DEVICE)
    with torch.no_grad():
        teacher_logp = kdrl.token_logprobs(teacher, ids, attn, mask, temperature=temp, vocab_size=V)
    if trainer.needs_teacher:
        torch.testing.assert_close(batch["teacher_logps"], teacher_logp)
    reference = AutoModelForCausalLM.from_pretrained(pair / "student").eval().to(DEVICE)
    logp = kdrl.token_logprobs(reference, ids, attn, mask, temperature=temp, vocab_size=V)
    noise = torch.rand(B, T, generator=g).to(DEVICE)  # (B, T), drawn on CPU: the same numbers on every device
    old = torch.where(mask, logp.detach() + 0.3 * (noise - 0.5), 0.0)
    weight = torch.exp(0.2 * (torch.rand(B, T, generator=g).to(DEVICE) - 0.5))
    trainer.state.global_step = 3  # μ = 2: kdrl step 1
    beta = kdrl.beta_schedule(1, cfg.beta, cfg.beta_min, cfg.beta_decay_steps)
    loss_ref, _ = kdrl.kdrl_loss(logp, old, teacher_logp, adv, mask, correct, cfg, beta, num_tokens=mask.sum().item(),
                                 num_seqs=B, sampler_weight=weight)
    batch.update(old_per_token_logps=old, importance_sampling_ratio=weight)
    loss = trainer._compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss, loss_ref)
    names = [n for n, _ in reference.named_parameters()]
    grads_ref = torch.autograd.grad(loss_ref, list(reference.parameters()), allow_unused=True)
    grads = torch.autograd.grad(loss, list(trainer.model.parameters()), allow_unused=True)
    assert loss_ref.abs().item() > 0 and any(gr is not None and gr.abs().max() > 0 for gr in grads_ref)
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(a, b, msg=name)

def _trl_argv(root: Path, out: Path, *extra):
    """_argv pinned to CPU, for the tests of refusals and of 2 processes over gloo, which run on CPU anywhere."""
    return [*_argv(root, out, *extra), "--device", "cpu"]

@pytest.mark.parametrize("method", ["grpo", "kdrl", "kdrl-mask", "kdrl-seq", "rlad"])
def test_trl_two_real_steps(train_trl, pair, tmp_path, method, capsys):
    """Two steps through TRL with its own sampler, on DEVICE (a GPU: TRL's bf16 mixed precision, from dtype auto); one
    metrics line per step; a checkpoint plain transformers loads."""
    out = tmp_path / method
    seq = ("--kd-baseline", "none") if method == "kdrl-seq" else ()
    assert train_trl.main(_argv(pair, out, "--method", method, *seq)) == 0
    assert "tokens/s" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert {"pg_loss", "clip_frac", "ratio", "kd_frac", "beta", "reward"} <= set(rows[0])
    assert ({"kd_loss", "kl_k1"} <= set(rows[0])) == (method != "grpo")  # grpo scores no teacher: no KL metrics
    assert rows[0]["beta"] == kdrl.METHODS[method].get("beta", kdrl.KDRLConfig.beta)
    saved = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    assert json.loads((out / "checkpoint" / "kdrl_config.json").read_text())["method"] == method
    if method in ("kdrl", "kdrl-mask", "kdrl-seq"):  # a teacher term moves the weights even when every reward is 0
        w0 = AutoModelForCausalLM.from_pretrained(pair / "student").state_dict()
        assert not all(torch.equal(w0[k], v) for k, v in saved.state_dict().items())

def test_trl_refuses_bad_input_like_kdrl(train_trl, pair, tmp_path, capsys):
    """The same clear errors as kdrl.py, exit code 1, nothing saved: another tokenizer, malformed JSONL, a missing
    path, and the two presets this integration cannot run exactly."""
    out = tmp_path / "o"

    def fails(argv, *needles):
        assert train_trl.main(argv) == 1
        err = capsys.readouterr().err
        assert all(n in err for n in needles), err

    other = char_tokenizer(CHARS)
    other.eos_token = "#"
    teacher = tmp_path / "teacher"
    _tiny("qwen2", 32, 1).save_pretrained(teacher)
    other.save_pretrained(teacher)
    fails(_trl_argv(pair, out, "--teacher", str(teacher)), "tokenizers differ", "eos_token_id")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": 2}\n{"prompt": "2+2=", "answer": 4\n')
    fails(_trl_argv(pair, out, "--train", str(bad)), "bad.jsonl, line 2", "malformed JSON")
    fails(_trl_argv(pair, out, "--student", str(tmp_path / "nomodel")), "--student", "no such directory")
    fails(_trl_argv(pair, out, "--method", "sft"), "SFTTrainer")
    fails(_trl_argv(pair, out, "--method", "kdrl-full"), "kdrl-full", "run it with train.py")
    fails(_trl_argv(pair, out, "--method", "kd-then-grpo"), "kd-then-grpo", "run it with train.py")
    fails(_trl_argv(pair, out, "--method", "kdrl-seq"), "--kd-baseline none")
    assert not (out / "checkpoint").exists()
    with pytest.raises(kdrl.KDRLError, match="9 responses do not split over 2 processes"):
        train_trl.grpo_config(kdrl.KDRLConfig(prompts_per_step=3, group_size=3), 2)

class _RecordingTrainer:
    """GRPOTrainer or KDRLTrainer as bench_trl sees it, with no model call: each of args.max_steps steps calls the
    callbacks as Trainer does, and every mean completion length is 5."""

    def __init__(self, *positional, args, callbacks, **kwargs):
        self.args, self.callbacks = args, list(callbacks)
        self._metrics = {"train": {"completions/mean_length": [5.0]}}

    def add_callback(self, callback):
        self.callbacks.append(callback)

    def train(self):
        for _ in range(self.args.max_steps):
            for hook in ("on_step_begin", "on_step_end"):
                for callback in self.callbacks:
                    getattr(callback, hook)(self.args, None, None)

def test_bench_trl_runs_trl_and_kdrl_on_one_device_and_dtype(train_trl, pair, monkeypatch, capsys):
    """bench_trl compares like with like: the three TRL runs and kdrl.py's bench() get the same device and dtype,
    the one its first line names. Seen from a CUDA machine (torch.cuda stubbed, the trainers and bench() recorded),
    where "auto" is cuda and bfloat16 autocast: the TRL runs used to be pinned to CPU while bench() took the GPU."""
    import trl

    import bench

    trl_sides, kdrl_side = [], []

    def recording_grpo_config(cfg, processes, **options):
        trl_sides.append((cfg.device, cfg.dtype))
        return types.SimpleNamespace(max_steps=cfg.steps * cfg.mu)

    def recording_bench(model_dir, steps, warmup, device="auto", dtype="auto"):
        kdrl_side.append((device, dtype))
        return ["bench kdrl ..."]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: 3 * 2**20)
    monkeypatch.setattr(train_trl, "grpo_config", recording_grpo_config)
    monkeypatch.setattr(train_trl, "KDRLTrainer", _RecordingTrainer)
    monkeypatch.setattr(trl, "GRPOTrainer", _RecordingTrainer)
    monkeypatch.setattr(bench, "bench", recording_bench)
    lines = bench.bench_trl(str(pair / "student"), steps=2, warmup=1)
    assert trl_sides == [("cuda", "auto")] * 3 and kdrl_side == [("cuda", "auto")]
    printed = capsys.readouterr().out
    assert "all on cuda, bfloat16 autocast over float32 weights" in printed.splitlines()[0]
    assert [line.split()[1] for line in lines] == ["trl-grpo", "train_trl-grpo", "train_trl-kdrl", "kdrl"]
    assert all(line.endswith("mean_len=5.0 peak_mib=3") for line in lines[:3]), lines

_DDP_DRIVER = """
import sys, torch
sys.path.insert(0, {repo!r})
import train_trl, test_train
cfg, options = train_trl.parse(sys.argv[1:])
# Adam's first step is lr·g/(|g| + eps): with eps = 1 it is ≈ lr·g, so the weights compare the gradients linearly
# (with eps = 1e-8 it is ≈ lr·sign(g), which turns float rounding in near-zero gradients into whole steps)
trainer = train_trl.run(cfg, dict(options, adam_epsilon=1.0), rollout_func=test_train._fixed_rollouts)
model = trainer.accelerator.unwrap_model(trainer.model)
state = {{k: v.detach().clone() for k, v in model.state_dict().items()}}
torch.save(state, f"{{cfg.out}}/rank{{trainer.accelerator.process_index}}.pt")
del trainer, model  # what holds the process group, freed before it is destroyed
train_trl.shutdown()
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="2 processes over gloo: a CPU test, run by the CPU suite")
def test_trl_two_processes_equal_one(train_trl, pair, tmp_path):
    """Data parallel over gloo: 2 processes (torchrun, ACCELERATE_USE_CPU=1) on a fixed global batch end one step with
    the same weights as 1 process (to float32 rounding), and identical weights on both ranks. kdrl-seq's seq-mean
    and kdrl's token-mean normalisers both have to be right for this to hold."""
    repo = Path(__file__).parent
    driver = tmp_path / "driver.py"
    driver.write_text(_DDP_DRIVER.format(repo=str(repo)))
    env = {**__import__("os").environ, "ACCELERATE_USE_CPU": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "OMP_NUM_THREADS": "1"}
    for method, agg in (("kdrl", "token-mean"), ("kdrl-seq", "seq-mean")):
        flags = ("--method", method, "--loss-agg", agg, "--kd-baseline", "none", "--steps", "1",
                 "--prompts-per-step", "4", "--lr", "1e-2", "--beta", "0.5")
        one, two = tmp_path / f"{method}-1", tmp_path / f"{method}-2"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        for out, launcher in ((one, [sys.executable]), (two, torchrun)):
            r = subprocess.run([*launcher, str(driver), *_trl_argv(pair, out, *flags)], capture_output=True, text=True,
                               env=env, cwd=repo)
            assert r.returncode == 0, r.stderr[-3000:]
        a, b, c = (torch.load(p) for p in (one / "rank0.pt", two / "rank0.pt", two / "rank1.pt"))
        w0 = AutoModelForCausalLM.from_pretrained(pair / "student").state_dict()
        assert max((a[k] - w0[k]).abs().max().item() for k in a) > 1e-4  # the step moved the weights
        assert all(torch.equal(b[k], c[k]) for k in b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-7, msg=k)
        # The logged metrics too: the 2-process pg_loss and kd_loss are the 1-process (full-batch) ones, and TRL's
        # own loss is pg_loss + β·kd_loss (kdrl-seq's KD is a reward, inside pg_loss)
        rows = [json.loads((out / "metrics.jsonl").read_text()) for out in (one, two)]
        assert rows[0]["kd_loss"] > 1e-3
        for key in ("pg_loss", "kd_loss"):
            assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-6, abs=1e-7), (key, rows)
        for row in rows:
            kd_term = row["beta"] * row["kd_loss"] if method == "kdrl" else 0.0
            assert row["loss"] == pytest.approx(row["pg_loss"] + kd_term, rel=1e-6, abs=1e-7), row

def test_readme_maps_every_config_field_to_trl(train_trl):
    """docs/trl.md's field table has a row for every KDRLConfig field, so it cannot drift silently."""
    section = (Path(__file__).parent / "docs" / "trl.md").read_text()
    for f in dataclasses.fields(kdrl.KDRLConfig):
        assert f"| `{f.name}` |" in section, f.name
    assert train_trl.LOSS_TYPE == {"token-mean": "dapo", "seq-mean": "grpo", "constant": "dr_grpo"}


# --- every number in the config must be finite ----------------------------------------------------------------

_FLOAT_FIELDS = [f.name for f in dataclasses.fields(kdrl.KDRLConfig) if f.type in ("float", "Optional[float]")]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", _FLOAT_FIELDS)
def test_validate_config_refuses_every_non_finite_float(field, value):
    """NaN and ±inf in any float field are refused by name, before any range check can let them through (inf
    passes `x >= 0`; a NaN temperature used to surface only later, as "weights diverged"). _FLOAT_FIELDS is read
    from the dataclass, so a new float knob joins the parametrisation by itself."""
    assert len(_FLOAT_FIELDS) == 13 and {"temperature", "format_bonus", "lr", "trrd_clamp"} < {*_FLOAT_FIELDS}
    with pytest.raises(kdrl.KDRLError) as e:
        train.validate_config(kdrl.KDRLConfig.from_method("kdrl", **{field: value}))
    assert f"config field {field}={value}: must be a finite number" in str(e.value)


@pytest.mark.parametrize("value", [np.float32("nan"), np.float64("inf"), torch.tensor(math.inf),
                                   torch.tensor(-math.inf, dtype=torch.float64), torch.tensor([math.nan])])
def test_validate_config_refuses_non_finite_reals_of_any_type(value):
    """A NaN or inf is refused as such whatever its type: a numpy scalar, a 0-d or one-element tensor."""
    with pytest.raises(kdrl.KDRLError, match=r"config field beta=.*: must be a finite number"):
        train.validate_config(kdrl.KDRLConfig.from_method("kdrl", beta=value))


@pytest.mark.parametrize("field, value, needle", [
    ("beta", "0.1", "beta='0.1': must be a number (int or float), not str"),
    ("beta", np.float32(0.1), "not float32"),
    ("lr", torch.tensor(1e-3), "not Tensor"),
    ("beta", True, "not bool"),
    ("steps", 2.0, "steps=2.0: must be an int, not float"),
    ("group_size", np.int64(4), "must be an int, not int64"),
])
def test_validate_config_refuses_numbers_config_json_cannot_hold(field, value, needle):
    """A numeric field holds a Python int or float (a float field may hold an int; np.float64 is a float): anything
    else is refused by name, rather than failing later when config.json is written or the step count is used."""
    with pytest.raises(kdrl.KDRLError) as e:
        train.validate_config(kdrl.KDRLConfig.from_method("kdrl", **{field: value}))
    assert needle in str(e.value)
    train.validate_config(kdrl.KDRLConfig.from_method("kdrl", beta=np.float64(0.1), lr=1))


def test_a_group_of_one_is_refused_where_a_reward_would_teach_nothing():
    """G = 1 with a reward gives every advantage exactly 0 (grpo_advantages: a constant group), so GRPO, KDRL's reward
    half, RLAD and kd-then-grpo's GRPO phase would learn nothing from it, silently: refused. Without a reward (kd) or
    for SFT, where G counts the teacher's samples, one is enough."""
    assert torch.equal(kdrl.grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), 1), torch.zeros(3))
    for method in ("grpo", "kdrl", "kdrl-mask", "kdrl-seq", "rlad", "kd-then-grpo"):
        with pytest.raises(kdrl.KDRLError, match="group_size=1: .*a group of one gives every advantage exactly 0"):
            train.validate_config(kdrl.KDRLConfig.from_method(method, group_size=1, kd_baseline="none"))
    for method in ("kd", "sft", "sft-all"):
        train.validate_config(kdrl.KDRLConfig.from_method(method, group_size=1))


def _first_char_is_one(prompt: str, completion: str, example: dict) -> float:
    """A reward tiny random models can earn: 1 when the response starts with "1"."""
    return float(completion.startswith("1"))


def test_patience_refusal_leaves_the_callers_model_untouched(pair, tmp_path):
    """Resuming a kd-then-grpo run that has not switched, with switch_patience but no eval set, is refused before
    anything is touched: the caller's model keeps its weights, the run's files stay as they were."""
    tok = char_tokenizer(CHARS)
    data = [{"prompt": f"{a}+1=", "answer": a + 1} for a in range(8)]
    cfg = kdrl.KDRLConfig.from_method("kd-then-grpo", out=str(tmp_path / "run"), steps=1, switch_step=5,
                                      switch_patience=1, eval_every=1, group_size=2, prompts_per_step=2,
                                      max_new_tokens=6, lr=1e-2, progress=False)
    model = AutoModelForCausalLM.from_pretrained(pair / "student").to(DEVICE)
    train.train(cfg, model, _tiny("qwen2", 32, 1), tok, data, kdrl.math_reward, eval_set=data[:2])
    fresh = AutoModelForCausalLM.from_pretrained(pair / "student").to(DEVICE)
    before = copy.deepcopy(fresh.state_dict())
    files = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "run").iterdir())
    resumed = dataclasses.replace(cfg, steps=3, resume=True)
    with pytest.raises(kdrl.KDRLError, match="switch_patience needs an eval set"):
        train.train(resumed, fresh, _tiny("qwen2", 32, 1), tok, data, kdrl.math_reward)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "run").iterdir()) == files


def test_the_last_step_is_evaluated_once(pair, tmp_path, monkeypatch):
    """When the loop evaluates the last step (kd-then-grpo's patience rule does, every eval_every steps), the final
    evaluation reuses it (same seed, same model, so the same numbers) instead of running it again."""
    calls = []
    evaluate = train.evaluate

    def counted(*args, **kwargs):
        calls.append(1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", counted)
    tok = char_tokenizer(CHARS)
    data = [{"prompt": f"{a}+1=", "answer": a + 1} for a in range(8)]
    cfg = kdrl.KDRLConfig.from_method("kd-then-grpo", out=str(tmp_path / "run"), steps=2, switch_step=9,
                                      switch_patience=3, eval_every=1, group_size=2, prompts_per_step=2,
                                      max_new_tokens=6, lr=1e-2, progress=False)
    model = AutoModelForCausalLM.from_pretrained(pair / "student").to(DEVICE)
    summary = train.train(cfg, model, _tiny("qwen2", 32, 1), tok, data, kdrl.math_reward, eval_set=data[:2])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if row.get("eval")]
    assert len(calls) == 2 and [(row["step"], row.get("final", False)) for row in evals] == [(0, False), (1, False),
                                                                                             (1, True)]
    assert {k: v for k, v in evals[2].items() if k != "final"} == evals[1] and summary["eval"]["length"] > 0


def test_a_sequential_run_that_does_not_switch_says_so(pair, tmp_path, capsys):
    """kd-then-grpo whose switch_step is not within the run's steps trains KD only: it says so when it starts and
    when it ends (the rows carry phase "kd"), and its summary says it has not switched."""
    out = tmp_path / "run"
    assert train.main(_argv(pair, out, "--method", "kd-then-grpo", "--steps", "2")) == 0
    err = capsys.readouterr().err
    assert "note: kd-then-grpo switches to GRPO at step 50, after these 2 steps: all KD" in err
    assert "note: kd-then-grpo has not switched to GRPO in its 2 steps: every step was KD" in err
    assert [row["phase"] for row in _steps(out)] == ["kd", "kd"]


# --- resume across devices ---------------------------------------------------------------------------------------

_FAKE_CUDA_RNG = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # two devices' states


def _cuda_tag(obj):
    return "cuda:0"


def _no_restore(obj, location):
    return None


def test_resume_reads_a_cuda_checkpoint_on_a_cpu_machine(pair, one_step_run, tmp_path, capsys, monkeypatch):
    """A checkpoint written on 2 GPUs (every tensor of trainer_state.pt tagged cuda:0, two CUDA RNG states, device
    "cuda") resumes on this CPU-only machine: the optimizer and the CPU and Python RNG are restored, so here (its
    numbers are really a CPU run's) the run equals the uninterrupted CPU one bit for bit, and one note says the run
    moved devices, so that in general it is not bit-exact."""
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    path = out / "checkpoint" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    assert state["rng"]["device"] == "cpu" and "cuda" not in state["rng"]  # a CPU run keeps no CUDA RNG state
    state["rng"].update(cuda=_FAKE_CUDA_RNG, device="cuda")
    registry = list(torch.serialization._package_registry)
    monkeypatch.setattr(torch.serialization, "_package_registry", registry)
    torch.serialization.register_package(0, _cuda_tag, _no_restore)  # outranks the cpu tagger (priority 10)
    torch.save(state, path)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="CUDA device"):  # what a plain torch.load makes of it here
        torch.load(path, weights_only=True)
    assert train.main(_argv(pair, out, "--method", "kdrl", "--steps", "2", "--resume")) == 0
    err = capsys.readouterr().err
    note = "note: --resume: the run trained on cuda resumes on cpu; resuming across devices is not bit-exact"
    assert note in err, err
    assert len([line for line in err.splitlines() if line.startswith("note: --resume")]) == 1
    uninterrupted = tmp_path / "a"
    assert train.main(_argv(pair, uninterrupted, "--method", "kdrl", "--steps", "2")) == 0
    assert _steps(out) == _steps(uninterrupted) and len(_steps(out)) == 2


class _FakeCuda:
    """torch.cuda as seen by _set_rng_state, with `count` devices: records each set_rng_state(state, device)."""

    def __init__(self, monkeypatch, count: int):
        self.calls = []
        monkeypatch.setattr(torch.cuda, "is_available", self.is_available)
        monkeypatch.setattr(torch.cuda, "device_count", self.device_count)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_rng_state_all)
        self.count = count

    def is_available(self):
        return self.count > 0

    def device_count(self):
        return self.count

    def set_rng_state(self, state, device: int):
        if device >= self.count:
            raise IndexError(f"device {device} of {self.count}")
        self.calls.append((int(state[0]), device))

    def set_rng_state_all(self, states):
        for i, state in enumerate(states):
            self.set_rng_state(state, i)


@pytest.mark.parametrize("count, restored, note", [
    (0, [], "the run trained on cuda resumes on cpu"),
    (1, [(0, 0)], "the checkpoint's CUDA RNG state (2 devices) was restored for the first 1 only"),
    (2, [(0, 0), (1, 1)], None),
    (3, [(0, 0), (1, 1)], None),  # the third device was not part of the run
])
def test_set_rng_state_restores_what_the_visible_devices_allow(monkeypatch, count, restored, note):
    """A run trained on 2 GPUs: with fewer GPUs the first ones are restored (a single-GPU run uses device 0), the rest
    named in the note; with none it runs on the CPU, which the note names. The CPU and Python states always come
    back."""
    fake = _FakeCuda(monkeypatch, count)
    cpu = torch.get_rng_state()
    state = dict(torch=cpu, python=random.getstate(), cuda=_FAKE_CUDA_RNG, device="cuda")
    torch.manual_seed(123)
    assert train._set_rng_state(state, torch.device("cuda" if count else "cpu")) == note
    assert fake.calls == restored and torch.equal(torch.get_rng_state(), cpu)


def test_set_rng_state_notes_only_what_applies(monkeypatch):
    """A CPU run resumed on the CPU draws on the CPU generator alone: no note, even when its checkpoint (written by an
    older kdrl on a machine with a GPU) holds CUDA RNG states. A checkpoint without CUDA states resumed on a GPU: its
    CUDA draws restart from the seed, and the note says so, naming the move when the checkpoint says where it ran."""
    fake = _FakeCuda(monkeypatch, 1)
    base = dict(torch=torch.get_rng_state(), python=random.getstate())
    assert train._set_rng_state(dict(base, cuda=_FAKE_CUDA_RNG, device="cpu"), torch.device("cpu")) is None
    assert train._set_rng_state(dict(base, cuda=_FAKE_CUDA_RNG), torch.device("cpu")) is None
    assert train._set_rng_state(base, torch.device("cuda")) == ("the checkpoint holds no CUDA RNG state: CUDA draws "
                                                                "restart from the seed")
    note = train._set_rng_state(dict(base, device="cpu"), torch.device("cuda"))
    assert note == "the run trained on cpu resumes on cuda: CUDA draws restart from the seed"
    assert fake.calls == []


# --- knobs that silently turn a method into another -------------------------------------------------------------


@pytest.mark.parametrize("method, knobs, needles", [
    *[(m, dict(kd_kind="k1"), (f"kd_kind='k1' contradicts method='{m}'", "zero expected gradient"))
      for m in ("kd", "kdrl", "kdrl-anneal", "kdrl-mask")],
    ("rlad", dict(trrd_alpha=1.0), ("trrd_alpha=1.0 contradicts method='rlad'", "exactly grpo")),
    ("sft", dict(beta=0.01), ("beta=0.01 contradicts method='sft'", "no KD term")),
    ("sft-all", dict(beta=1.0), ("beta=1.0 contradicts method='sft-all'", "no KD term")),
    ("sft", dict(beta=0.0, beta_min=0.0, beta_decay_steps=5), ("beta_min=0.0 contradicts method='sft'",)),
])
def test_knobs_that_turn_a_method_into_another_are_refused(method, knobs, needles):
    cfg = kdrl.KDRLConfig.from_method(method, **knobs)
    assert len(train.method_conflicts(cfg)) == 1
    with pytest.raises(kdrl.KDRLError) as e:
        train.validate_config(cfg)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_sft_beta_is_refused_on_the_cli_and_the_valid_neighbours_are_accepted(pair, tmp_path, capsys):
    """--beta used to be ignored by sft after a note that it overrides the preset; now it is refused, with no note.
    The neighbours of each refused knob stay valid."""
    err = _fails(_argv(pair, tmp_path / "o", "--method", "sft", "--beta", "0.01"), capsys,
                 "beta=0.01 contradicts method='sft'")
    assert "overrides" not in err and not (tmp_path / "o").exists()
    train.config_from_args(["--method", "kd", "--beta", "0.5"])  # a knob that is tuned still says so
    assert "--beta 0.5 overrides --method kd's beta=1.0" in capsys.readouterr().err
    neighbours = [
        ("kdrl-seq", dict(kd_kind="k1")),  # reward mode: k1 in the reward-to-go estimates the sequence-level KL
        ("kdrl", dict(kd_kind="k3")),
        ("kd", dict(kd_kind="k3")),
        ("rlad", dict(trrd_alpha=0.99)),
        ("rlad", dict(trrd_alpha=0.0)),
        ("grpo", dict(kd_kind="k1")),  # no KD term: the estimator is never used
        ("sft", dict(beta=0.0)),
        ("sft-all", dict(lr=1e-3)),
    ]
    for method, knobs in neighbours:
        train.validate_config(kdrl.KDRLConfig.from_method(method, **knobs))


# --- bench_memory survives a child that dies ---------------------------------------------------------------------


def _dying_case(pair_dir: str, method: str, batch: int, length: int, queue) -> None:
    """Stands in for bench._memory_case in the child: "dies" exits as an OOM kill would, before reporting;
    any other method reports fixed figures."""
    if method == "dies":
        os._exit(3)
    queue.put((1.0, 2.0, 0.25, 0.5))


def _no_pair(path, **kwargs):
    return path


_GET_CONTEXT = multiprocessing.get_context


def _fork_context(method=None):
    """fork, not spawn: the child runs the patched case at once (a spawned one re-imports this module, ~10 s)."""
    return _GET_CONTEXT("fork")


def test_bench_memory_reports_a_dead_child_and_goes_on(monkeypatch, capsys):
    """A case whose process dies without reporting gets a line naming its exit code, and the next case still runs
    (queue.get() without a timeout used to wait forever). Run in a thread so a hang fails instead of blocking."""
    monkeypatch.setattr(bench, "_memory_case", _dying_case)
    monkeypatch.setattr(bench, "save_large_vocab_pair", _no_pair)
    monkeypatch.setattr(multiprocessing, "get_context", _fork_context)
    lines = []

    def run_bench():
        lines.extend(bench.bench_memory(sizes=((8, 4),), methods=("dies", "reports")))

    thread = threading.Thread(target=run_bench, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "bench_memory hangs on a dead child"
    assert lines[0] == "memory dies B=8 T=4 failed: its process exited with code 3 before reporting (-9: killed, " \
                       "e.g. out of memory)"
    assert lines[1].startswith("memory reports B=8 T=4 peak_mib=1 before_mib=2 teacher_s=0.25 update_s=0.50")
    out = capsys.readouterr().out
    assert all(line in out for line in lines)


# --- evaluation runs under the sampling autocast -----------------------------------------------------------------


def test_evaluation_runs_under_the_same_autocast_as_sampling(pair, tmp_path, monkeypatch):
    """The periodic and the final evaluation run under bf16 autocast when cfg.dtype resolves to bfloat16, as
    sampling does (they ran in float32), and under none with float32."""
    seen = []
    evaluate = train.evaluate

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", spy)
    for dtype in ("bfloat16", "float32"):
        argv = _argv(pair, tmp_path / dtype, "--method", "kdrl", "--dtype", dtype, "--eval", str(pair / "train.jsonl"),
                     "--eval-limit", "2", "--eval-every", "1", "--max-new-tokens", "3")
        assert train.main(argv) == 0
    assert seen[:2] == [(True, torch.bfloat16)] * 2
    assert len(seen) == 4 and not seen[2][0] and not seen[3][0]


# --- train_trl's dropout, resume rows, vLLM refusal, KL metrics ---------------------------------------------------


KL_METRICS = ("kl_k1", "kl_k3", "kd_loss")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trl_student_attention_dropout_is_zeroed(train_trl, pair, tmp_path, monkeypatch):
    """HF attention applies its float attention_dropout in train mode, and TRL samples and scores in train mode:
    once the trainer is built, two train-mode forwards of the student are identical (they differ before)."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    path = tmp_path / "student"
    model = _tiny("qwen2", 24, 0)
    model.config.attention_dropout = 0.3
    model.save_pretrained(path)
    char_tokenizer(CHARS).save_pretrained(path)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])  # (1, 8)

    def two_forwards(m):
        m.train()
        with torch.no_grad():
            return m(input_ids=ids).logits, m(input_ids=ids).logits  # (1, 8, 24) each

    torch.manual_seed(0)
    first, second = two_forwards(train.load_model(str(path), torch.device("cpu"), torch.float32, "student"))
    assert not torch.equal(first, second)  # the dropout is live before: this test can fail
    trainer = _trl_trainer(train_trl, pair, tmp_path, "grpo", student=str(path))[0]
    first, second = two_forwards(trainer.model)
    assert torch.equal(first, second)


class _StopBeforeOptimizerStep(TrainerCallback):
    """Stops the run once optimizer step `n` is taken, before it is logged or saved: a job killed mid-run."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.n:
            raise KeyboardInterrupt


def test_trl_resume_keeps_one_row_per_optimizer_step(train_trl, pair, tmp_path, monkeypatch):
    """μ = 2, a checkpoint every kdrl step (checkpoint-2, -4, ...). Stopped after optimizer step 4 is taken, the run
    has logged optimizer steps 0..2 (0-based) and saved only checkpoint-2; resumed to 3 kdrl steps, TRL redoes
    optimizer steps 2..5 from checkpoint-2. metrics.jsonl then holds one row per optimizer step, no duplicates."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    out = tmp_path / "run"
    flags = ("--method", "kdrl", "--mu", "2", "--save-every", "1")
    cfg, options = train_trl.parse(_argv(pair, out, *flags))  # on KDRL_TEST_DEVICE
    with pytest.raises(KeyboardInterrupt):
        train_trl.run(cfg, options, callbacks=[_StopBeforeOptimizerStep(4)])
    assert [r["optimizer_step"] for r in _rows(out)] == [0, 1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    cfg, options = train_trl.parse(_argv(pair, out, *flags, "--steps", "3", "--resume"))
    train_trl.run(cfg, options)
    rows = _rows(out)
    assert [r["optimizer_step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["step"] for r in rows] == [0, 0, 1, 1, 2, 2]


def test_trl_vllm_with_padded_logit_columns_is_refused(train_trl, pair, tmp_path, capsys):
    """vLLM samples from every logit column and TRL does not mask the padded ones, so a student whose head is wider
    than its tokenizer is refused before training starts, with both widths named."""
    out = tmp_path / "o"
    width = _tiny("llama", 24, 0).get_output_embeddings().weight.shape[0]
    vocab = len(char_tokenizer(CHARS))
    assert width > vocab
    assert train_trl.main(_trl_argv(pair, out, "--use-vllm")) == 1
    err = capsys.readouterr().err
    assert "--use-vllm" in err and f"{width} logit columns" in err and f"{vocab} tokens" in err, err
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize("method, has_kl", [("grpo", False), ("kdrl", True)])
def test_trl_kl_metrics_only_when_a_teacher_is_scored(train_trl, pair, tmp_path, method, has_kl):
    """As kdrl.py's rows: grpo scores no teacher, so its rows have no kl_k1 / kl_k3 / kd_loss (against a zero
    teacher they would read mean log π); kdrl's rows have all three."""
    out = tmp_path / method
    assert train_trl.main(_argv(pair, out, "--method", method)) == 0  # on KDRL_TEST_DEVICE
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        assert "pg_loss" in row and all((name in row) == has_kl for name in KL_METRICS), row


def test_every_docs_page_is_linked_from_the_readme_and_every_link_resolves():
    """The README is the front page: each page of docs/ is one link away, and no relative link points nowhere."""
    root = Path(__file__).parent
    readme = (root / "README.md").read_text()
    for page in sorted((root / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, page.name
    for source in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", source.read_text()):
            assert (source.parent / target).exists(), f"{source.name} links to {target}"
