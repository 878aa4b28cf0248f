"""Tests for issue 18's kdrl_trl.py points: the student's attention dropout, resume without duplicate metrics rows,
vLLM refused when the logits have padded columns, and no KL metrics when no teacher is scored. (Point 3, the
metrics under DDP, is tested in test_kdrl.py's test_trl_two_processes_equal_one.)"""
import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import kdrl
import test_kdrl
from test_kdrl import CHARS, _argv, _tiny, _trl_argv, _trl_trainer
from train_tiny import char_tokenizer

pair = test_kdrl.pair  # module-scoped fixtures: the saved tiny student/teacher pair, and kdrl_trl (skipped without trl)
kdrl_trl = test_kdrl.kdrl_trl

KL_METRICS = ("kl_k1", "kl_k3", "kd_loss")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trl_student_attention_dropout_is_zeroed(kdrl_trl, pair, tmp_path, monkeypatch):
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
    first, second = two_forwards(kdrl.load_model(str(path), torch.device("cpu"), torch.float32, "student"))
    assert not torch.equal(first, second)  # the dropout is live before: this test can fail
    trainer = _trl_trainer(kdrl_trl, pair, tmp_path, "grpo", student=str(path))[0]
    first, second = two_forwards(trainer.model)
    assert torch.equal(first, second)


class _StopBeforeOptimizerStep(TrainerCallback):
    """Stops the run once optimizer step `n` is taken, before it is logged or saved: a job killed mid-run."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.n:
            raise KeyboardInterrupt


def test_trl_resume_keeps_one_row_per_optimizer_step(kdrl_trl, pair, tmp_path, monkeypatch):
    """μ = 2, a checkpoint every kdrl step (checkpoint-2, -4, ...). Stopped after optimizer step 4 is taken, the run
    has logged optimizer steps 0..2 (0-based) and saved only checkpoint-2; resumed to 3 kdrl steps, TRL redoes
    optimizer steps 2..5 from checkpoint-2. metrics.jsonl then holds one row per optimizer step, no duplicates."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    out = tmp_path / "run"
    flags = ("--method", "kdrl", "--mu", "2", "--save-every", "1")
    cfg, options = kdrl_trl.parse(_argv(pair, out, *flags))  # on KDRL_TEST_DEVICE
    with pytest.raises(KeyboardInterrupt):
        kdrl_trl.run(cfg, options, callbacks=[_StopBeforeOptimizerStep(4)])
    assert [r["optimizer_step"] for r in _rows(out)] == [0, 1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    cfg, options = kdrl_trl.parse(_argv(pair, out, *flags, "--steps", "3", "--resume"))
    kdrl_trl.run(cfg, options)
    rows = _rows(out)
    assert [r["optimizer_step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["step"] for r in rows] == [0, 0, 1, 1, 2, 2]


def test_trl_vllm_with_padded_logit_columns_is_refused(kdrl_trl, pair, tmp_path, capsys):
    """vLLM samples from every logit column and TRL does not mask the padded ones, so a student whose head is wider
    than its tokenizer is refused before training starts, with both widths named."""
    out = tmp_path / "o"
    width = _tiny("llama", 24, 0).get_output_embeddings().weight.shape[0]
    vocab = len(char_tokenizer(CHARS))
    assert width > vocab
    assert kdrl_trl.main(_trl_argv(pair, out, "--use-vllm")) == 1
    err = capsys.readouterr().err
    assert "--use-vllm" in err and f"{width} logit columns" in err and f"{vocab} tokens" in err, err
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize("method, has_kl", [("grpo", False), ("kdrl", True)])
def test_trl_kl_metrics_only_when_a_teacher_is_scored(kdrl_trl, pair, tmp_path, method, has_kl):
    """As kdrl.py's rows: grpo scores no teacher, so its rows have no kl_k1 / kl_k3 / kd_loss (against a zero
    teacher they would read mean log π); kdrl's rows have all three."""
    out = tmp_path / method
    assert kdrl_trl.main(_argv(pair, out, "--method", method)) == 0  # on KDRL_TEST_DEVICE
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        assert "pg_loss" in row and all((name in row) == has_kl for name in KL_METRICS), row
