"""
train_trl.py: kdrl's exact loss inside Hugging Face TRL's GRPOTrainer, for runs that outgrow one GPU.

train.py runs kdrl.py's method on one device. This file runs the *same* algorithm on TRL's engine, which brings
data parallelism (DDP), DeepSpeed ZeRO-1/2/3 and FSDP through accelerate, and vLLM generation. It re-implements
none of kdrl's math: the loss is a call to kdrl.kdrl_loss (and through it the KL estimators, TRRD, the KD masks and
reward-mode KD), β comes from kdrl.beta_schedule, advantages from kdrl.grpo_advantages, rewards and correctness from
kdrl.score_completions, and the log-probs from kdrl.head_logprobs. What this file adds is the plumbing:

- a teacher, loaded from a local path and prepared exactly the way GRPOTrainer prepares its own reference model
  (prepare_deepspeed under DeepSpeed, prepare_fsdp under FSDP, accelerator.prepare_model(evaluation_mode=True)
  otherwise), dropout off, scored at the sampling temperature, once per generation batch, without grad;
- log-probs over the tokenizer's columns only (padded logit columns carry no probability, as in train.py): every
  forward pass goes through the wrapped model, so DDP, ZeRO-3 and FSDP see it, and the output head runs on chunks
  of the final hidden states, so no (B, T, V) tensor is built;
- normalisers that are right under gradient accumulation and data parallelism. One kdrl step is one TRL
  generation batch (steps_per_generation = gradient_accumulation_steps), and one μ-epoch over it is one optimizer
  step. Each micro-batch calls kdrl_loss with the *global* response-token and response counts divided by the
  number of processes, because DDP, DeepSpeed and FSDP average gradients over processes; the sum over micro-batches
  and the average over processes then equal the full-batch gradient for every loss_agg. TRL's own loss_types map
  as: loss_agg "token-mean" ↔ loss_type "dapo", "seq-mean" ↔ "grpo", "constant" ↔ "dr_grpo" (max_new_tokens × B);
- advantages and KD masks computed on the whole gathered batch, before TRL shuffles it across micro-batches, so
  a group split across processes or micro-batches is still a group (kd_mask="group" needs whole groups);
- vLLM: TRL's importance-sampling correction w = π_old/π_vLLM (truncated or masked as vllm_importance_sampling_mode
  says) is kept for the policy term and applied to the KD term too, through kdrl_loss's sampler_weight. The KD
  term's own weight π/π_old times w is then π/π_vLLM: the sampler's tokens, reweighted to the current policy, so
  the KD gradient is again the on-policy one. (TRL applies its correction to the policy term only.) vLLM samples
  from every logit column, so a student whose head is wider than its tokenizer is refused with --use-vllm (TRL's
  generate masks the padded columns, with suppress_tokens);
- dropout off in the student too, its float attention_dropout included: TRL zeroes nn.Dropout modules only, and
  samples and scores in train mode, where HF attention applies it.

Refused, with an error that says why: the sft and sft-all presets (not policy-gradient methods; use TRL's SFTTrainer on
the teacher's correct samples), and kd_kind="full" (kdrl-full): train.py computes it without (B, T, V) logits by
keeping the teacher's final hidden states and calling its output head chunk by chunk inside the update, which here
would mean carrying (B, T, H) states through TRL's batch shuffling and calling a head that ZeRO-3 / FSDP shard
outside the teacher's forward. kd_baseline="loo" (kdrl-seq's default) is refused: its leave-one-out baseline needs
whole groups in each micro-batch, which TRL's shuffle splits (pass --kd-baseline none). kd-then-grpo is refused: its
switch from KD to GRPO lives in train.py's loop. Multimodal inputs are refused too: kdrl trains text-only models.

Differences from train.py's own loop, all from TRL: the data order (TRL's seeded sampler, not batch_for_step),
the sampler (transformers' generate or vLLM, not kdrl.sample_rollouts), checkpoints (TRL's checkpoint-N folders,
and a final save_pretrained folder <out>/checkpoint), and the step counter: TRL counts optimizer steps, so
max_steps = steps × μ and β is scheduled at global_step // μ, the kdrl step. Two more: --resume is TRL's
resume_from_checkpoint, which does not compare the config with the checkpoint's as train.py does (metrics.jsonl is
trimmed as train.py's is: the rows before the checkpoint resumed from stay); and the end ids are TRL's: the
tokenizer's EOS and the student's generation_config ids (kdrl.end_token_ids also adds the teacher's).
Logging is TRL's too: it logs every optimizer step (its console lines and <out>/metrics.jsonl), so --log-every,
which sets train.py's `|`-separated line, is not used here. As in train.py, kl_k1, kl_k3 and kd_loss are logged only
when a teacher is scored.

Run:  python train_trl.py --student PATH --teacher PATH --train data.jsonl --method kdrl --steps 100
      accelerate launch [--config_file zero3.yaml] train_trl.py ...   (see the README, "Beyond one GPU")
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from accelerate.utils import gather
from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp

import kdrl
import train

# loss_agg ↔ TRL's loss_type: the normaliser each one divides the summed per-token loss by.
LOSS_TYPE = {"token-mean": "dapo", "seq-mean": "grpo", "constant": "dr_grpo"}

# transformers renamed gradient_checkpointing to activation_checkpointing during 5.x; the old name warns.
CHECKPOINTING_FIELD = next(
    name for name in ("activation_checkpointing", "gradient_checkpointing") if name in GRPOConfig.__dataclass_fields__
)

# Logged once per optimizer step: these are each micro-batch's share of the batch total, times P (kdrl_loss divides
# by the global count / P, for DDP's gradient average over P processes), so they are summed over micro-batches and
# processes, then divided by P; the other kdrl_loss metrics are per-token means (averaged, weighted by tokens).
_SUMMED_METRICS = ("pg_loss", "kd_loss")

# kdrl_loss's metrics that compare with the teacher: left out when no teacher is scored (as kdrl._loss_metrics does),
# since against the zero teacher_logps kl_k1 would read mean log π.
_TEACHER_METRICS = ("kl_k1", "kl_k3", "kd_loss")


# -----------------------------------------------------------------------------
# Log-probs through the wrapped model, over the tokenizer's columns, chunked.


def add_kdrl_head(model, temperature: float, vocab_size: int, chunk_size: int) -> None:
    """Give `model` a second forward mode: model(input_ids, attention_mask, position_ids, kdrl_labels=labels)
    returns log softmax(logits / T)[label] over the first vocab_size columns, (B, L − 1) float32, where
    labels (B, L) holds the token ids to score and −100 elsewhere; entry t scores labels[:, t + 1].

    The call goes through the module (and so through its DDP / FSDP / ZeRO-3 wrapper, which must see every forward
    pass for gradient synchronisation and parameter gathering); the backbone runs once, and the output head runs on
    chunks of the scored positions' hidden states through kdrl.head_logprobs, checkpointed under grad. Without
    kdrl_labels the forward is the original one, so generation is unchanged. Models whose logits are post-processed
    after the head (soft-capping, scaling) take the full logits, as kdrl.token_logprobs does.
    """
    original_forward = model.forward
    postprocessed = any(getattr(model.config, k, None) not in (None, 1, 1.0) for k in kdrl._LOGIT_POSTPROCESSING)

    @functools.wraps(type(model).forward)  # keep the signature: generate() validates its kwargs against it
    def forward(self, *args, kdrl_labels=None, **kwargs):
        if kdrl_labels is None:
            return original_forward(*args, **kwargs)
        targets = kdrl_labels[:, 1:]  # (B, L−1): the token each position predicts
        scored = targets != -100  # (B, L−1)
        if (targets[scored] >= vocab_size).any():
            raise kdrl.KDRLError(f"a sampled token id is >= the tokenizer's {vocab_size} tokens (a padded column)")
        kwargs["use_cache"] = False
        if postprocessed or self.get_output_embeddings() is None:
            hidden = original_forward(*args, **kwargs).logits[:, :-1][scored]  # (n, V): logits, with an identity head
            head, checkpoint = torch.nn.Identity(), False
        else:
            hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1][scored]  # (n, H)
            head, checkpoint = _output_head(self.get_output_embeddings()), True
        logp = kdrl.head_logprobs(head, hidden, targets[scored], temperature, vocab_size, chunk_size,
                                  checkpoint=checkpoint)  # (n,)
        return torch.zeros(scored.shape, dtype=torch.float32, device=logp.device).masked_scatter(scored, logp)

    model.forward = types.MethodType(forward, model)


def _output_head(head):
    """The output head as a callable. FSDP2 keeps it as DTensor shards outside its own forward: gather them once."""
    weight = head.weight
    if type(weight).__name__ == "DTensor":
        bias = head.bias.full_tensor() if head.bias is not None else None
        return functools.partial(F.linear, weight=weight.full_tensor(), bias=bias)
    return head


# -----------------------------------------------------------------------------
# The trainer: TRL's GRPOTrainer with kdrl's teacher, rewards, advantages and loss.


class KDRLTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is kdrl.kdrl_loss with a separate teacher. See the module docstring.

    cfg: the KDRLConfig (any kdrl.METHODS preset but sft, sft-all and kdrl-full); teacher: a model or a local path;
    reward_fn(prompt, completion, example) -> float as in train.py (1.0 = correct); examples: the rows the
    train_dataset's "kdrl_index" column points into (they reach reward_fn whole, as in train.py).
    """

    def __init__(self, cfg: kdrl.KDRLConfig, model, teacher, reward_fn: Callable, examples: list[dict], **kwargs):
        check_supported(cfg)
        args = kwargs["args"]
        if args.steps_per_generation != args.gradient_accumulation_steps:
            raise kdrl.KDRLError(
                f"steps_per_generation={args.steps_per_generation} must equal gradient_accumulation_steps="
                f"{args.gradient_accumulation_steps}: one kdrl step is one generation batch and one optimizer step"
            )
        if args.beta != 0.0:
            raise kdrl.KDRLError("GRPOConfig.beta must be 0: kdrl's β (cfg.beta) is the KD coefficient to the teacher")
        self.cfg, self.reward_fn, self.examples = cfg, reward_fn, examples
        self.kdrl_timer, self.kdrl_tokens, self._window = train.Timer(), 0, []
        super().__init__(model=model, reward_funcs=[self.kdrl_reward], **kwargs)
        self.vocab_size = len(self._tokenizer)
        if cfg.temperature != self.temperature:
            raise kdrl.KDRLError(
                f"cfg.temperature={cfg.temperature} differs from GRPOConfig.temperature={self.temperature}"
            )
        self.needs_teacher = kdrl.needs_teacher(cfg)
        # TRL's disable_dropout zeroes nn.Dropout modules only; HF attention applies its float attention_dropout in
        # train mode, the mode TRL samples and scores in: kdrl's switch zeroes both, so every pass sees one policy.
        train.disable_dropout(self.model)
        add_kdrl_head(self.model, self.temperature, self.vocab_size, cfg.logprob_chunk)
        self.teacher = self._prepare_teacher(teacher) if self.needs_teacher else None

    @staticmethod
    def kdrl_reward(prompts, completions, **kwargs):  # only its name is used (in TRL's logs): see _calculate_rewards
        raise RuntimeError("KDRLTrainer scores completions with kdrl.score_completions")

    def _prepare_teacher(self, teacher):
        """Exactly as GRPOTrainer prepares its reference model, plus kdrl's head at the sampling temperature."""
        if isinstance(teacher, (str, Path)):
            dtype = torch.bfloat16 if self.args.bf16 else torch.float32
            teacher = train.load_model(str(teacher), torch.device("cpu"), dtype, "teacher")
        teacher.requires_grad_(False).eval()
        train.disable_dropout(teacher)
        add_kdrl_head(teacher, self.temperature, self.vocab_size, self.cfg.logprob_chunk)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # --- log-probs: every TRL path (old policy, vLLM correction, the loss) and the teacher use kdrl's head ---

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):
        """(B, logits_to_keep) float32 log-probs of the completion tokens at the sampling temperature."""
        if any(v is not None for v in multimodal.values()):
            raise kdrl.KDRLError("train_trl trains text-only models: multimodal inputs are not supported")
        B, T = input_ids.shape[0], logits_to_keep
        P = input_ids.shape[1] - T
        # Without grad (teacher, old policy), rows run in buckets of similar length, each trimmed to its longest
        # completion (as kdrl._response_states: exact, attention is causal). With grad, one forward per micro-batch, as
        # DDP expects; sharded models (ZeRO-3, FSDP) also keep one, since each forward gathers the parameters.
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        buckets = 1 if torch.is_grad_enabled() or sharded else 4
        lengths = attention_mask[:, P:].sum(1)  # (B,) completion tokens per row
        batch_size = batch_size or B
        logp = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
        for start in range(0, B, batch_size):
            rows = torch.arange(start, min(start + batch_size, B), device=input_ids.device)
            by_length = lengths[rows].argsort(descending=True, stable=True)  # (b,) rows, longest completion first
            for idx in by_length.chunk(buckets) if buckets > 1 else [torch.arange(len(rows))]:
                idx = rows[idx.to(rows.device)]
                L = int(lengths[idx].max()) if buckets > 1 and len(idx) else T  # this bucket's longest completion
                if L == 0:
                    continue
                ids, attn = input_ids[idx, : P + L], attention_mask[idx, : P + L]  # (b, P+L)
                labels = ids.masked_fill(attn == 0, -100)
                labels[:, :P] = -100  # score the completion only
                with self.accelerator.autocast():
                    positions = kdrl._positions(attn)  # (b, P+L), skipping the left padding
                    scored = model(input_ids=ids, attention_mask=attn, position_ids=positions, kdrl_labels=labels)
                logp[idx, :L] = scored[:, P - 1 :]  # (b, L)
        return logp, None, None

    # --- rewards, advantages, teacher: once per generation batch ---

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """kdrl.score_completions on the decoded completions; gathered over processes, as TRL's reward is."""
        texts = self._tokenizer.batch_decode(completion_ids_list, skip_special_tokens=True)
        examples = [self.examples[row["kdrl_index"]] for row in inputs]
        rewards, correct = kdrl.score_completions(self.reward_fn, examples, texts, 1, self.cfg.format_bonus)
        self._scores = gather(rewards.to(self.accelerator.device)), gather(correct.to(self.accelerator.device))
        return self._scores[0][:, None]  # (B_global, 1): TRL logs it as the one reward function's value

    def _generate_and_score_completions(self, inputs):
        with self.kdrl_timer("sampling"):
            output = super()._generate_and_score_completions(inputs)
        rewards, correct = self._scores  # (B_global,), prompt-major: groups are contiguous
        G = self.num_generations if self.model.training else self.num_generations_eval
        if self.cfg.use_reward:
            advantages = kdrl.grpo_advantages(rewards, G, self.cfg.scale_adv_by_std, self.cfg.adv_eps)
        else:
            advantages = torch.zeros_like(rewards)
        kd_keep = kdrl.kd_response_mask(correct, self.cfg.kd_mask, G)  # whole groups, before TRL shuffles
        rank, n = self.accelerator.process_index, len(inputs)
        local = slice(rank * n, (rank + 1) * n)
        output.update(advantages=advantages[local], correct=correct[local], kd_keep=kd_keep[local])
        output["num_seqs"] = torch.tensor(float(rewards.shape[0]), device=rewards.device)  # responses, all processes
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)  # (b, P+T)
        attn = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)  # (b, P+T)
        self.kdrl_tokens += int(self.accelerator.gather(attn.sum()).sum())
        T = output["completion_ids"].shape[1]
        with self.kdrl_timer("teacher"), torch.no_grad():
            if self.needs_teacher:
                batch = self.args.per_device_train_batch_size
                output["teacher_logps"] = self._get_per_token_logps_and_entropies(self.teacher, ids, attn, T, batch)[0]
            else:
                output["teacher_logps"] = torch.zeros(ids.shape[0], T, device=ids.device)
        return output

    # --- the loss ---

    def _compute_loss(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # (b, P+T)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)  # (b, P+T)
        mask = inputs["completion_mask"].bool()  # (b, T), up to and including the first EOS
        logp, _, _ = self._get_per_token_logps_and_entropies(model, ids, attn, mask.shape[1])  # (b, T), with grad
        old_logp = inputs.get("old_per_token_logps")  # present when μ > 1 or with vLLM
        old_logp = logp.detach() if old_logp is None else old_logp  # μ = 1: ratio exactly 1
        beta = kdrl.beta_schedule(self.state.global_step // self.num_iterations, self.cfg.beta, self.cfg.beta_min,
                                  self.cfg.beta_decay_steps)
        processes = self.accelerator.num_processes  # DDP / DeepSpeed / FSDP average gradients over processes
        # kd_keep was computed on whole groups before the shuffle; "response" with correct = ~kd_keep hands it over.
        cfg = dataclasses.replace(self.cfg, kd_mask="response")
        loss, metrics = kdrl.kdrl_loss(
            logp, old_logp, inputs["teacher_logps"], inputs["advantages"], mask, ~inputs["kd_keep"], cfg, beta,
            num_tokens=inputs["num_items_in_batch"].item() / processes,
            num_seqs=inputs["num_seqs"].item() / processes,
            sampler_weight=inputs.get("importance_sampling_ratio"),  # vLLM: π_old / π_vLLM, for both terms
        )
        if not torch.isfinite(loss):
            raise kdrl.KDRLError(f"non-finite loss at optimizer step {self.state.global_step} (loss={loss.item()})")
        if self.model.training:
            self._log_window(mask.sum().item(), metrics, beta)
        return loss

    def _log_window(self, n_tokens: int, metrics: dict, beta: float) -> None:
        """Collect each micro-batch's metrics; at the optimizer step, reduce them over micro-batches and processes."""
        self._window.append((n_tokens, metrics))
        if not self.accelerator.sync_gradients:
            return
        keys = sorted(k for k in metrics if self.needs_teacher or k not in _TEACHER_METRICS)
        local = [sum(m[k] if k in _SUMMED_METRICS else n * m[k] for n, m in self._window) for k in keys]
        local.append(sum(n for n, _ in self._window))
        totals = self.accelerator.reduce(torch.tensor(local, device=self.accelerator.device), reduction="sum")
        processes, tokens = self.accelerator.num_processes, max(totals[-1].item(), 1)
        for k, value in zip(keys, totals[:-1].tolist(), strict=True):
            self._metrics["train"][k].append(value / processes if k in _SUMMED_METRICS else value / tokens)
        self._metrics["train"]["beta"].append(beta)
        self._window = []

    def training_step(self, model, inputs, num_items_in_batch):
        start, before = time.perf_counter(), sum(self.kdrl_timer.values())
        loss = super().training_step(model, inputs, num_items_in_batch)
        elapsed = time.perf_counter() - start - (sum(self.kdrl_timer.values()) - before)
        self.kdrl_timer["update"] = self.kdrl_timer.get("update", 0.0) + elapsed  # minus sampling and teacher
        return loss

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        """TRL's logging, plus one JSON line per logged step in <out>/metrics.jsonl, as train.py writes."""
        metrics = dict(self._metrics["train"])  # read before super() clears them
        super().log(logs, start_time)
        if self.accelerator.is_main_process and "loss" in logs and metrics:
            kdrl_step = (self.state.global_step - 1) // self.num_iterations  # μ optimizer steps per kdrl step
            row = dict(logs, step=kdrl_step, optimizer_step=self.state.global_step - 1,
                       **{k: sum(v) / len(v) for k, v in metrics.items() if v})
            with (Path(self.args.output_dir) / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    def time_summary(self) -> str:
        """The time breakdown and throughput, in train.py's format."""
        t = self.kdrl_timer
        busy = sum(t.get(k, 0.0) for k in ("sampling", "teacher", "update"))
        return (f"time: sampling {t.get('sampling', 0):.1f}s | teacher {t.get('teacher', 0):.1f}s | update "
                f"{t.get('update', 0):.1f}s | {self.kdrl_tokens / max(busy, 1e-9):.0f} tokens/s"
                " (non-pad prompt+response tokens per busy second, all processes)")


def check_supported(cfg: kdrl.KDRLConfig) -> None:
    """Refuse what this integration cannot run exactly, saying why."""
    train.validate_config(cfg)
    if cfg.sft:
        raise kdrl.KDRLError(
            f"--method {cfg.method} is not a policy-gradient method, so it does not run inside GRPOTrainer: sample the "
            "teacher, keep its correct responses and train on them with TRL's SFTTrainer (or run train.py --method sft)"
        )
    if cfg.kd_mode == "reward" and cfg.kd_baseline == "loo" and cfg.group_size > 1:
        raise kdrl.KDRLError(
            "--kd-mode reward with --kd-baseline loo (kdrl-seq's default) needs whole groups in each micro-batch, "
            "which TRL's shuffle splits; add --kd-baseline none here, or run it with train.py"
        )
    if cfg.kd_kind == "full" and cfg.kd_mode == "loss":
        raise kdrl.KDRLError(
            "--kd-kind full (kdrl-full) is refused here: its chunked exact KL calls the teacher's output head inside "
            "the update, outside the teacher's forward (sharded under ZeRO-3 / FSDP); run it with train.py, or use k2"
        )
    if cfg.switch_step:
        raise kdrl.KDRLError(
            f"--method {cfg.method} is refused here: its switch from KD to GRPO (and the reset of AdamW's moments with "
            "it) lives in train.py's loop; run it with train.py"
        )


# -----------------------------------------------------------------------------
# From KDRLConfig to GRPOConfig, data, the CLI.


def world_size() -> int:
    """Processes in this run, as torchrun / accelerate launch announce them (read before TRL sets them up)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def grpo_config(cfg: kdrl.KDRLConfig, processes: int, **trl_options) -> GRPOConfig:
    """The GRPOConfig twin of a KDRLConfig (see the README's table). One kdrl step = one generation batch of
    prompts_per_step × group_size responses over all processes = one optimizer step per μ-epoch."""
    B = cfg.prompts_per_step * cfg.group_size
    if B % processes:
        raise kdrl.KDRLError(f"prompts_per_step × group_size = {B} responses do not split over {processes} processes")
    per_process = B // processes
    per_device = max(d for d in range(1, min(cfg.minibatch_size, per_process) + 1) if per_process % d == 0)
    accumulation = per_process // per_device
    compute_bf16 = kdrl.compute_dtype(cfg.dtype, train.resolve_device(cfg.device)) == torch.bfloat16
    return GRPOConfig(
        output_dir=cfg.out,
        seed=cfg.seed,
        max_steps=cfg.steps * cfg.mu,  # TRL counts optimizer steps: μ per kdrl step
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,
        num_generations=cfg.group_size,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=1.0,
        top_k=0,
        num_iterations=cfg.mu,
        epsilon=cfg.clip_eps_low,
        epsilon_high=cfg.clip_eps_high,
        beta=0.0,  # TRL's KL to a reference model: off; kdrl's β is toward the teacher
        loss_type=LOSS_TYPE[cfg.loss_agg],
        scale_rewards="group" if cfg.scale_adv_by_std else "none",
        mask_truncated_completions=False,  # kdrl trains on truncated responses too (flagged, not dropped)
        disable_dropout=True,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        bf16=compute_bf16,
        use_cpu=cfg.device == "cpu",
        **{CHECKPOINTING_FIELD: cfg.gradient_checkpointing},
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=max(cfg.save_every * cfg.mu, 1),
        logging_steps=1,
        report_to="none",
        disable_tqdm=not cfg.progress,
        **trl_options,
    )


def dataset_for(tokenizer, examples: list[dict]) -> Dataset:
    """TRL's prompt column: one user turn when the tokenizer has a chat template (TRL applies it), else the raw
    text, exactly as kdrl.encode_prompts formats prompts. kdrl_index points back to the example (its answer)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    prompts = [[{"role": "user", "content": ex["prompt"]}] if templated else ex["prompt"] for ex in examples]
    return Dataset.from_dict({"prompt": prompts, "kdrl_index": list(range(len(examples)))})


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags (one per KDRLConfig field), plus the few TRL needs for distribution."""
    parser = train.build_parser()
    parser.description = "kdrl's loss inside TRL's GRPOTrainer: " + parser.description
    trl = parser.add_argument_group("TRL (distribution and generation)")
    trl.add_argument("--use-vllm", action="store_true", help="generate with vLLM (install it separately)")
    trl.add_argument("--vllm-mode", choices=("colocate", "server"), default="colocate",
                     help="vLLM in the training processes (colocate) or in a separate `trl vllm-serve` (server)")
    trl.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3,
                     help="colocate: vLLM's share of GPU memory")
    trl.add_argument("--vllm-importance-sampling-mode", default="token_truncate",
                     choices=("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
                     help="TRL's correction between the vLLM sampler and the trainer (applied to both terms)")
    return parser


_TRL_FLAGS = ("use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_importance_sampling_mode")


def parse(argv=None) -> tuple[kdrl.KDRLConfig, dict]:
    """Defaults ← the --method preset ← explicit flags (as train.config_from_args), and the TRL options."""
    args = vars(build_parser().parse_args(argv))
    trl_options = {k: args.pop(k) for k in _TRL_FLAGS}
    if not trl_options["use_vllm"]:
        trl_options = dict(use_vllm=False)
    cfg = train.config_from_flags(args)
    return cfg, trl_options


def run(cfg: kdrl.KDRLConfig, trl_options: dict, reward_fn: Callable = kdrl.math_reward, **trainer_kwargs):
    """Check everything, build the trainer, train, save <out>/checkpoint. Returns the trainer. Raises KDRLError."""
    check_supported(cfg)
    if cfg.eval_every:
        raise kdrl.KDRLError("--eval-every is train.py only: train_trl.py evaluates once, at the end (--eval)")
    for name in ("student", "teacher", "train"):
        if not getattr(cfg, name):
            raise kdrl.KDRLError(f"--{name} is required")
    device = train.resolve_device(cfg.device)
    train_set = train.load_jsonl(cfg.train)
    eval_set = train.load_jsonl(cfg.eval) if cfg.eval else None
    tokenizer = train.load_tokenizer(cfg.student, "student")
    train.check_same_tokenizer(tokenizer, train.load_tokenizer(cfg.teacher, "teacher"))
    student = train.load_model(cfg.student, torch.device("cpu"), torch.float32, "student")  # float32 master weights
    for examples, source in ((train_set, cfg.train), (eval_set or [], cfg.eval)):
        train.check_prompt_lengths(tokenizer, student, examples, cfg.max_new_tokens, source)
    args = grpo_config(cfg, world_size(), **trl_options)
    width = student.get_output_embeddings().weight.shape[0]
    if width > len(tokenizer):  # padded logit columns carry no probability, as in train.py: the sampler must mask them
        if args.use_vllm:  # vLLM samples every column, and its masking option is untested here: refuse
            raise kdrl.KDRLError(
                f"--use-vllm: the student {cfg.student} has {width} logit columns for {len(tokenizer)} tokens, and "
                "vLLM would sample the padded ones; run without --use-vllm (TRL's generate masks them), or save the "
                "student after model.resize_token_embeddings(len(tokenizer)), which changes nothing kdrl computes"
            )
        padded_ids = list(range(len(tokenizer), width))
        args.generation_kwargs = {**(args.generation_kwargs or {}), "suppress_tokens": padded_ids}
    metrics = Path(cfg.out) / "metrics.jsonl"
    if not cfg.resume and metrics.exists() and is_main_process():
        metrics.unlink()  # a fresh run starts a fresh log
    if cfg.resume and is_main_process():
        _trim_metrics_for_resume(Path(cfg.out), cfg.mu)
    trainer = KDRLTrainer(cfg, student, cfg.teacher, reward_fn, train_set, args=args,
                          train_dataset=dataset_for(tokenizer, train_set), processing_class=tokenizer, **trainer_kwargs)
    try:
        trainer.train(resume_from_checkpoint=True if cfg.resume else None)
    except ValueError as e:
        if cfg.resume and "checkpoint" in str(e):
            raise kdrl.KDRLError(f"--resume: no checkpoint-N folder in {cfg.out} ({e})") from None
        raise
    trainer.save_model(str(Path(cfg.out) / "checkpoint"))  # save_pretrained, gathered under ZeRO-3 / FSDP
    if trainer.accelerator.is_main_process:
        (Path(cfg.out) / "checkpoint" / "kdrl_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(trainer.time_summary())
    if eval_set:
        _evaluate(trainer, tokenizer, eval_set, reward_fn, cfg, device)
    return trainer


def _trim_metrics_for_resume(out: Path, mu: int) -> None:
    """--resume: keep the metrics.jsonl rows of the kdrl steps before the last <out>/checkpoint-N, the one TRL resumes
    from, so that the steps it redoes are not logged twice (train.py keeps those before its checkpoint the same way)."""
    metrics = out / "metrics.jsonl"
    checkpoint = get_last_checkpoint(str(out)) if out.is_dir() else None
    if checkpoint is None or not metrics.exists():
        return  # no checkpoint: trainer.train says so
    state = Path(checkpoint) / "trainer_state.json"
    try:
        start = json.loads(state.read_text())["global_step"] // mu  # optimizer steps → the kdrl step TRL resumes at
    except (OSError, ValueError, KeyError) as e:
        raise kdrl.KDRLError(f"--resume: cannot read the step of {state} ({e})") from None
    kept = [line for line in metrics.read_text().splitlines() if train._keep_on_resume(json.loads(line), start)]
    metrics.write_text("".join(line + "\n" for line in kept))


def _evaluate(trainer, tokenizer, eval_set, reward_fn, cfg, device) -> None:
    """train.evaluate on the main process (greedy and sampled accuracy), when the weights are whole on every rank."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        if trainer.accelerator.is_main_process:
            print("eval: skipped under DeepSpeed / FSDP (sharded weights); evaluate <out>/checkpoint with train.py")
        return
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        result = train.evaluate(model, tokenizer, eval_set[: cfg.eval_limit], reward_fn, cfg)
        print("eval: " + " | ".join(f"{k} {v:.3f}" for k, v in result.items()))
    trainer.accelerator.wait_for_everyone()


def shutdown(wait_for_all: bool = True) -> None:
    """Destroy the process group, if any, while the interpreter is whole. First free what still holds it (DDP's
    reducer, through the trainer's cycles) and, after a run that ended on every rank, wait for all of them: a group
    freed at exit, or torn down while another rank still used it, aborted a 2-process run now and then (`terminate
    called without an active exception`). After an error the other ranks may never arrive: no wait."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        if wait_for_all:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    cfg, trl_options = parse(argv)
    try:
        run(cfg, trl_options)
        shutdown()
    except kdrl.KDRLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown(wait_for_all=False)  # after an error; a no-op once shut down
    if is_main_process():
        print(f"saved {Path(cfg.out) / 'checkpoint'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
