"""Issue 18, points 8 to 12 (the engine's part): non-finite config floats, resume across devices, knobs that turn a
method into another, a bench_memory child that dies, evaluation under the sampling autocast."""
import dataclasses
import math
import multiprocessing
import os
import random
import shutil
import threading

import pytest
import torch
import torch.serialization

import kdrl
import test_kdrl
import train_tiny
from test_kdrl import _argv, _fails, _steps

pair = test_kdrl.pair  # module-scoped fixtures: the saved tiny student/teacher pair, and a 1-step run of it
one_step_run = test_kdrl.one_step_run

# --- 8: every float field must be finite ------------------------------------------------------------------------

_FLOAT_FIELDS = [f.name for f in dataclasses.fields(kdrl.KDRLConfig) if f.type in ("float", "Optional[float]")]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", _FLOAT_FIELDS)
def test_validate_config_refuses_every_non_finite_float(field, value):
    """NaN and ±inf in any float field are refused by name, before any range check can let them through (inf
    passes `x >= 0`; a NaN temperature used to surface only later, as "weights diverged"). _FLOAT_FIELDS is read
    from the dataclass, so a new float knob joins the parametrisation by itself."""
    assert len(_FLOAT_FIELDS) == 13 and {"temperature", "format_bonus", "lr", "trrd_clamp"} < {*_FLOAT_FIELDS}
    with pytest.raises(kdrl.KDRLError) as e:
        kdrl.validate_config(kdrl.KDRLConfig.from_method("kdrl", **{field: value}))
    assert f"config field {field}={value}: must be a finite number" in str(e.value)


# --- 9: resume across devices -------------------------------------------------------------------------------------

_FAKE_CUDA_RNG = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # two devices' states


def _cuda_tag(obj):
    return "cuda:0"


def _no_restore(obj, location):
    return None


def test_resume_reads_a_cuda_checkpoint_on_a_cpu_machine(pair, one_step_run, tmp_path, capsys, monkeypatch):
    """A checkpoint written on 2 GPUs (every tensor of trainer_state.pt tagged cuda:0, two CUDA RNG states) resumes
    on this CPU-only machine: the optimizer and the CPU and Python RNG are restored, so the run equals the
    uninterrupted CPU one bit for bit, and a note says the CUDA RNG state was not restored."""
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    path = out / "checkpoint" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state["rng"]["cuda"] = _FAKE_CUDA_RNG
    registry = list(torch.serialization._package_registry)
    monkeypatch.setattr(torch.serialization, "_package_registry", registry)
    torch.serialization.register_package(0, _cuda_tag, _no_restore)  # outranks the cpu tagger (priority 10)
    torch.save(state, path)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="CUDA device"):  # what a plain torch.load makes of it here
        torch.load(path, weights_only=True)
    assert kdrl.main(_argv(pair, out, "--method", "kdrl", "--steps", "2", "--resume")) == 0
    err = capsys.readouterr().err
    note = "note: --resume: the checkpoint's CUDA RNG state (2 devices) was not restored: no CUDA device is visible"
    assert note in err and "resuming across devices is not bit-exact" in err, err
    assert len([line for line in err.splitlines() if line.startswith("note: --resume")]) == 1
    uninterrupted = tmp_path / "a"
    assert kdrl.main(_argv(pair, uninterrupted, "--method", "kdrl", "--steps", "2")) == 0
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
    (0, [], "the checkpoint's CUDA RNG state (2 devices) was not restored: no CUDA device is visible"),
    (1, [(0, 0)], "the checkpoint's CUDA RNG state (2 devices) was restored for the first 1 only: 1 visible now"),
    (2, [(0, 0), (1, 1)], None),
    (3, [(0, 0), (1, 1)], None),  # the third device was not part of the run
])
def test_set_rng_state_restores_what_the_visible_devices_allow(monkeypatch, count, restored, note):
    """Fewer GPUs than at save time: the first ones are restored (a single-GPU run uses device 0), the rest named
    in the note; it used to raise IndexError from set_rng_state_all. The CPU and Python states always come back."""
    fake = _FakeCuda(monkeypatch, count)
    cpu = torch.get_rng_state()
    state = dict(torch=cpu, python=random.getstate(), cuda=_FAKE_CUDA_RNG)
    torch.manual_seed(123)
    assert kdrl._set_rng_state(state, torch.device("cuda" if count else "cpu")) == note
    assert fake.calls == restored and torch.equal(torch.get_rng_state(), cpu)


def test_set_rng_state_says_when_a_cpu_checkpoint_resumes_on_cuda(monkeypatch):
    """A checkpoint written without CUDA holds no CUDA RNG state: resumed on a GPU, CUDA draws start from the seed."""
    fake = _FakeCuda(monkeypatch, 1)
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    note = kdrl._set_rng_state(state, torch.device("cuda"))
    assert note == "the checkpoint holds no CUDA RNG state (written without CUDA): CUDA draws restart from the seed"
    assert fake.calls == []
    assert kdrl._set_rng_state(state, torch.device("cpu")) is None  # resumed on CPU: nothing is missing


# --- 10: knobs that silently turn a method into another ----------------------------------------------------------


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
    assert len(kdrl.method_conflicts(cfg)) == 1
    with pytest.raises(kdrl.KDRLError) as e:
        kdrl.validate_config(cfg)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_sft_beta_is_refused_on_the_cli_and_the_valid_neighbours_are_accepted(pair, tmp_path, capsys):
    """--beta used to be ignored by sft after a note that it overrides the preset; now it is refused, with no note.
    The neighbours of each refused knob stay valid."""
    err = _fails(_argv(pair, tmp_path / "o", "--method", "sft", "--beta", "0.01"), capsys,
                 "beta=0.01 contradicts method='sft'")
    assert "overrides" not in err and not (tmp_path / "o").exists()
    kdrl.config_from_args(["--method", "kd", "--beta", "0.5"])  # a knob that is tuned still says so
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
        kdrl.validate_config(kdrl.KDRLConfig.from_method(method, **knobs))


# --- 11: bench_memory survives a child that dies -----------------------------------------------------------------


def _dying_case(pair_dir: str, method: str, batch: int, length: int, queue) -> None:
    """Stands in for train_tiny._memory_case in the child: "dies" exits as an OOM kill would, before reporting;
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
    monkeypatch.setattr(train_tiny, "_memory_case", _dying_case)
    monkeypatch.setattr(train_tiny, "save_large_vocab_pair", _no_pair)
    monkeypatch.setattr(multiprocessing, "get_context", _fork_context)
    lines = []

    def bench():
        lines.extend(train_tiny.bench_memory(sizes=((8, 4),), methods=("dies", "reports")))

    thread = threading.Thread(target=bench, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "bench_memory hangs on a dead child"
    assert lines[0] == "memory dies B=8 T=4 failed: its process exited with code 3 before reporting (-9: killed, " \
                       "e.g. out of memory)"
    assert lines[1].startswith("memory reports B=8 T=4 peak_mib=1 before_mib=2 teacher_s=0.25 update_s=0.50")
    out = capsys.readouterr().out
    assert all(line in out for line in lines)


# --- 12: evaluation runs under the sampling autocast -------------------------------------------------------------


def test_evaluation_runs_under_the_same_autocast_as_sampling(pair, tmp_path, monkeypatch):
    """The periodic and the final evaluation run under bf16 autocast when cfg.dtype resolves to bfloat16, as
    sampling does (they ran in float32), and under none with float32."""
    seen = []
    evaluate = kdrl.evaluate

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(kdrl, "evaluate", spy)
    for dtype in ("bfloat16", "float32"):
        argv = _argv(pair, tmp_path / dtype, "--method", "kdrl", "--dtype", dtype, "--eval", str(pair / "train.jsonl"),
                     "--eval-limit", "2", "--eval-every", "1", "--max-new-tokens", "3")
        assert kdrl.main(argv) == 0
    assert seen[:2] == [(True, torch.bfloat16)] * 2
    assert len(seen) == 4 and not seen[2][0] and not seen[3][0]
