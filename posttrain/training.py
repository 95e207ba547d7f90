"""The pieces every recipe calls: run set-up, step counts, autocast, and the
epoch loop of the dataset-driven stages (sft, rm, dpo).

`fit` owns what is identical across those stages — length-grouped batches,
gradient accumulation, clipping, the schedule, logging, checkpoints and exact
resume — and takes the stage's loss as a function. PPO and GRPO have their own
rollout loops in their recipes and call the same optim / checkpoint / metrics
functions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from posttrain import checkpoint, distributed, memory, metrics
from posttrain.config import save_config
from posttrain.data import length_grouped_batches
from posttrain.errors import UserError
from posttrain.optim import build_optimizer, clip_and_step, scheduler_for


def setup_run(cfg) -> None:
    """Threads, seeds and the memory check: the first step of every recipe. Nothing is written yet (see ``start_output``).

    Every rank takes the same seed, so models initialised here start equal on
    every rank (FSDP2 does not broadcast them); rollouts sample from a stream of
    each rank's own (``rollout.sampling_stream``). The memory check (`memory.preflight`)
    comes before any weight is loaded, so a run that cannot fit on its GPU stops at once.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    memory.preflight(cfg)


FINAL_FILES = ("model.safetensors", "model.safetensors.index.json", "summary.json")


def start_output(cfg, modules: dict) -> Path | None:
    """Check and claim output_dir, once config, data and models have all loaded; rank 0 writes config.yaml.

    Returns the checkpoint to resume from (None for a fresh run).

    A folder holding another run's checkpoints or final model is refused unless
    this run resumes it or ``overwrite_output_dir`` is set (then the old
    checkpoints are removed, so ``save_total_limit`` and ``latest`` only ever see
    this run's). The free disk must hold two checkpoints. ``latest`` with no
    checkpoint is an error, not a silent fresh start.
    """
    out = Path(cfg.output_dir)
    path = checkpoint.resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
    if cfg.resume_from_checkpoint == "latest" and path is None:
        raise UserError(f"resume_from_checkpoint: latest, but {out} holds no complete checkpoint-STEP folder to resume")
    resuming_here = bool(cfg.resume_from_checkpoint) and (
        cfg.resume_from_checkpoint == "latest" or Path(cfg.resume_from_checkpoint).resolve().parent == out.resolve())
    previous = [p.name for p in checkpoint.list_checkpoints(cfg.output_dir)] + \
        [name for name in FINAL_FILES if (out / name).exists()]
    if previous and not resuming_here and not cfg.overwrite_output_dir:
        raise UserError(f"output_dir: {out} holds another run ({', '.join(previous[:4])}); resume it with "
                        "--resume_from_checkpoint latest, replace it with --overwrite_output_dir true, or choose another folder")
    if cfg.save_strategy == "epoch" or cfg.save_strategy == "steps" and cfg.save_steps:
        params = sum(p.numel() * p.element_size() for m in modules.values() for p in m.parameters())
        needed = 2 * 3 * params  # two checkpoints of weights and AdamW's two moments
        probe = next(p for p in [out, *out.parents] if p.exists())
        free = shutil.disk_usage(probe).free
        if free < needed:
            raise UserError(f"output_dir: {out} has {free / 1e9:.1f} GB free, two checkpoints need about "
                            f"{needed / 1e9:.1f} GB; free disk space or set save_steps: 0")
    memory.report(cfg)
    notice = getattr(cfg, "trl_default_notice", "")  # set by the command line (cli.run)
    if notice and distributed.is_main():
        print(notice, file=sys.stderr, flush=True)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if previous and cfg.overwrite_output_dir and not resuming_here:
            for old in checkpoint.list_checkpoints(cfg.output_dir):
                checkpoint.remove_checkpoint(old)
        save_config(cfg, out / "config.yaml")
    distributed.barrier()
    return path


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient; stops the run after too many in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def observe(self, grad_norm: torch.Tensor) -> dict:
        """Record one optimizer step's gradient norm (non-finite: ``clip_and_step`` skipped it)."""
        finite = bool(torch.isfinite(grad_norm))
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row >= self.limit:
            raise TrainingStopped(f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                                  "(max_nonfinite_steps); stopped, the last checkpoint is intact. Lower learning_rate "
                                  "or check the data and rewards")
        return {"nonfinite_steps": 0.0 if finite else 1.0}


class TrainingStopped(Exception):
    """The run cannot go on (non-finite training); the CLI prints one line and exits 1."""


class Interrupted(Exception):
    """SIGTERM / SIGINT: a checkpoint was saved at the end of the current step; the CLI exits 143 / 130."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupts:
    """SIGTERM and SIGINT ask the loop to stop after the current optimizer step; a second one exits at once.

    Schedulers (SLURM, Kubernetes) send SIGTERM before they kill: the loop
    saves a checkpoint and exits, so a pre-empted job resumes where it was.
    """

    CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}

    def __enter__(self):
        self.signum, self.saved = None, {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.CODES:
                self.saved[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: no more waiting
            os._exit(self.CODES[signum])
        self.signum = signum

    def requested(self) -> bool:
        """True on every rank when any rank was signalled (all stop at the same step)."""
        return distributed.any_rank(self.signum is not None)

    def stop(self, saved: Path | None) -> Interrupted:
        signum = self.signum if self.signum is not None else signal.SIGTERM
        where = f"checkpoint saved to {saved}; resume with --resume_from_checkpoint latest" if saved else "nothing to save"
        return Interrupted(f"interrupted by {signal.Signals(signum).name}: {where}", self.CODES[signum])

    def __exit__(self, *exc):
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
        return False


def checkpoint_or_stop(cfg, step: int, steps: int, interrupts: Interrupts, logger, save: Callable[[], Path],
                       epoch_end: bool = False) -> None:
    """After an optimizer step: on a signal, save and stop; else save as save_strategy says (every save_steps,
    or at the end of each epoch; the final model is saved apart)."""
    if interrupts.requested():
        logger.close()
        raise interrupts.stop(save() if step < steps else None)
    due = cfg.save_strategy == "epoch" and epoch_end or \
        cfg.save_strategy == "steps" and cfg.save_steps and step % cfg.save_steps == 0
    if due and step < steps:
        save()


def total_steps(cfg, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps, else epochs x ceil(micro-batches / accumulation).

    An epoch ends with a shorter accumulation when accumulation does not
    divide its micro-batches, so it takes ceil(...) steps (as the HF Trainer
    counts them); every micro-batch of every epoch is used.
    """
    if cfg.max_steps > 0:
        return cfg.max_steps
    steps_per_epoch = math.ceil(micro_batches_per_epoch / cfg.gradient_accumulation_steps)
    return max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))


def autocast(enabled: bool):
    """bf16 autocast over fp32 weights on this process's device; a no-op context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    kind = distributed.device().type
    if kind == "cpu":
        warn_slow_cpu_bf16()
    return torch.autocast(kind, dtype=torch.bfloat16)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}


@functools.cache
def warn_slow_cpu_bf16() -> None:
    """Once per process: bf16 on a CPU without native bf16 instructions is emulated, far slower than fp32."""
    if not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        print("posttrain: warning: bf16 autocast on this CPU (no avx512_bf16 / amx_bf16) is much slower than fp32; "
              "drop --bf16 here", file=sys.stderr)


def trainable_parameters(*models) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for m in models for n, p in m.named_parameters() if p.requires_grad]


def resume(cfg, modules: dict, optimizer, scheduler) -> dict:
    """Claim output_dir (``start_output``), then restore modules, optimizer, schedule and RNG from
    resume_from_checkpoint.

    Returns the checkpoint's trainer state (step, data position, ...), or {}
    when there is nothing to resume.
    """
    path = start_output(cfg, modules)
    if path is None:
        return {}
    saved = checkpoint.load_checkpoint(path, modules, {"optimizer": optimizer, "scheduler": scheduler})
    print(f"resumed from {path} at step {saved['step']}")
    return saved


class StatsWindow:
    """Running means of detached stats between two log lines."""

    def __init__(self):
        self.sums, self.counts = defaultdict(float), defaultdict(int)

    def add(self, stats: dict) -> None:
        # tensors stay tensors until a log line: no device sync per micro-batch
        for k, v in stats.items():
            self.sums[k] = self.sums[k] + (v.detach().float() if torch.is_tensor(v) else float(v))
            self.counts[k] += 1

    def pop(self) -> dict:
        """The window's means, averaged over ranks (one all-reduce for every key), and a fresh window."""
        keys = sorted(self.sums)
        means = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=distributed.device())
                             / self.counts[k] for k in keys]) if keys else torch.zeros(0)
        means = distributed.all_mean(means).cpu()  # one device sync for the whole log line
        self.sums.clear()
        self.counts.clear()
        return {k: float(v) for k, v in zip(keys, means)}

    def state(self) -> dict:
        """The pending sums and counts, saved in a checkpoint taken between two log lines."""
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def load(self, state: dict | None) -> None:
        for k, v in (state or {}).get("sums", {}).items():
            self.sums[k], self.counts[k] = v, state["counts"][k]


def fit(
    cfg,
    model: torch.nn.Module,
    lengths: list[int],
    make_batch: Callable[[list[int]], object],
    loss_fn: Callable[[object], tuple[torch.Tensor, dict]],
    evaluate: Callable[[], dict] | None = None,
    desc: str = "train",
    batch_weight: Callable[[object], float] | None = None,
    shares_itself: bool = False,
) -> dict:
    """Train ``model`` on the examples whose token lengths are ``lengths``.

    ``make_batch(indices)`` collates a micro-batch; ``loss_fn(batch)`` returns
    the mean loss and a dict of detached stats. Accumulated micro-batches are
    weighted by ``batch_weight(batch)`` (default: rows), so that a token-mean
    loss weighted by its token count gives exactly the large batch's gradient.
    ``shares_itself``: ``make_batch`` gets the whole global micro-batch and takes
    this rank's share itself (KTO pairs each row with another row's response).
    Returns the last log record.
    """
    params = trainable_parameters(model)
    optimizer = build_optimizer(params, cfg.learning_rate, cfg.weight_decay)
    # one global micro-batch = per_device_train_batch_size rows on each rank; this rank trains its share
    global_batch, accum = cfg.per_device_train_batch_size * distributed.world_size(), cfg.gradient_accumulation_steps

    def epoch_batches(epoch: int) -> list[list[int]]:
        batches = length_grouped_batches(lengths, global_batch, cfg.seed, epoch, group=cfg.group_by_length)
        # a last global batch too small to give every rank a row is dropped (never the case for one process)
        return [b for b in batches if len(b) >= distributed.world_size()]

    micro_per_epoch = len(epoch_batches(0))
    if micro_per_epoch == 0:
        raise UserError(f"dataset_name: {cfg.dataset_name}: no training rows left to train on "
                        f"({len(lengths)} rows for {distributed.world_size()} ranks)")
    steps = total_steps(cfg, micro_per_epoch)
    scheduler = scheduler_for(cfg, optimizer, steps)

    # claim output_dir, then resume: modules, optimizer, schedule, RNG, the data position and the logging window
    saved = resume(cfg, {"model": model}, optimizer, scheduler)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    step, epoch, micro = saved.get("step", 0), saved.get("epoch", 0), saved.get("micro", 0)
    window = StatsWindow()
    window.load(saved.get("window"))

    logger = metrics.MetricsLogger(cfg.output_dir, steps, step, saved.get("elapsed_s", 0.0), cfg.progress, desc,
                                   metrics.open_backends(cfg, step))
    record: dict = {}
    model.train()

    def save() -> Path:
        return checkpoint.save_checkpoint(cfg.output_dir, step, {"model": model},
                                          {"optimizer": optimizer, "scheduler": scheduler},
                                          {"epoch": epoch, "micro": micro, "elapsed_s": logger.elapsed_s,
                                           "window": window.state()}, cfg.save_total_limit)

    with Interrupts() as interrupts, logger:  # the logger closes on an error too
        while step < steps:
            batches = epoch_batches(epoch)
            while micro < len(batches) and step < steps:
                # one optimizer step = `accum` global micro-batches (fewer at the end of an epoch)
                host = [make_batch(indices if shares_itself else distributed.rank_share(indices))
                        for indices in batches[micro:micro + accum]]
                # weights are read from the host batches before they move: no device sync per micro-batch
                weights = [float(batch_weight(b)) if batch_weight else float(len(b)) for b in host]
                made = [b.to(distributed.device()) for b in host]
                # each micro-batch weighs its share of the whole step's rows (or tokens) over every rank; the
                # all-reduce of gradients averages over ranks, which the world size undoes
                scale = distributed.world_size() / float(distributed.all_sum(torch.tensor(sum(weights))))
                step_loss = 0.0
                for i, (batch, weight) in enumerate(zip(made, weights)):
                    distributed.sync_gradients([model], i == len(made) - 1)
                    with autocast(cfg.bf16):
                        loss, stats = loss_fn(batch)
                    (loss * weight * scale).backward()
                    step_loss = step_loss + loss.detach() * weight * scale
                    window.add(stats)
                micro += len(made)
                grad_norm = clip_and_step([p for _, p in params], optimizer, scheduler, cfg.max_grad_norm)
                # the loss of the whole global batch (the mean over ranks undoes the scale)
                window.add({"loss": step_loss, "grad_norm": grad_norm, **guard.observe(grad_norm)})
                step += 1
                logger.advance()
                extra = evaluate() if evaluate is not None and eval_due(cfg, step, steps, micro >= len(batches)) else {}
                if step % cfg.logging_steps == 0 or step == steps:
                    model.train()
                    lr = scheduler.get_last_lr()[0]
                    record = logger.log(step, {"epoch": round(epoch + micro / len(batches), 4), **window.pop(),
                                               "learning_rate": lr, **extra})
                elif extra:  # an eval step between two log lines: a line of its own
                    logger.log(step, extra)
                checkpoint_or_stop(cfg, step, steps, interrupts, logger, save, epoch_end=micro >= len(batches))
            if micro >= len(batches):
                epoch, micro = epoch + 1, 0
    logger.close()
    record["wall_s"] = round(logger.elapsed_s, 2)
    return record


def eval_due(cfg, step: int, steps: int, epoch_done: bool) -> bool:
    """Whether held-out data is evaluated after this optimizer step: eval_strategy steps, every eval_steps
    (0: every logging_steps); epoch, at the end of each epoch; and both at the last step; no, never."""
    if cfg.eval_strategy == "no":
        return False
    if cfg.eval_strategy == "epoch":
        return epoch_done or step == steps
    return step % (cfg.eval_steps or cfg.logging_steps) == 0 or step == steps


def finish(cfg, model, tokenizer, record: dict, title: str, extra: dict | None = None) -> None:
    """Final HF-format save (rank 0), plots, summary.json and README.md: the last step of every recipe.

    A LoRA run built on the embedded `tiny` model also saves that base (output_dir/base/): its
    temporary folder is gone once the run exits, and the adapter needs it.
    """
    from posttrain import modelcard
    from posttrain.models import unsharded_replica

    checkpoint.save_pretrained(model, tokenizer, cfg.output_dir, replica=lambda: unsharded_replica(model),
                               merge_adapter=cfg.merge_adapter, copy_base=cfg.model_name_or_path == "tiny")
    metrics.plot_metrics(cfg.output_dir, title)
    summary = {"wall_s": record.get("wall_s"), "peak_rss_mb": round(metrics.peak_rss_mb(), 1),
               "final": record, **({"run_name": cfg.run_name} if cfg.run_name else {}), **(extra or {})}
    metrics.write_summary(cfg.output_dir, summary)
    if distributed.is_main():
        modelcard.write_model_card(cfg, summary, title)
        print(modelcard.run_summary(cfg, summary), flush=True)


class PromptStream:
    """Global batches of prompt indices for the RL stages: one seeded permutation per epoch, read in order.

    ``batch_size`` is the global batch (per device x world size); each rank
    takes its share. The permutations follow each other as one stream, so every
    epoch sees every prompt exactly once, and every batch is full (the last
    batch of an epoch is completed from the next epoch's permutation), which
    keeps ranks' shares equal even with fewer prompts than the global batch.
    The position (epoch, prompt offset in it) is part of every checkpoint, so a
    resumed run sees the same prompts in the same order as an uninterrupted one.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        self.num_prompts, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.epoch, self.offset = epoch, offset
        self._ended_epoch, self._cached = False, (-1, [])

    def _order(self) -> list[int]:
        if self._cached[0] != self.epoch:  # one batch of every index: length_grouped_batches' shuffle in (seed, epoch)
            self._cached = (self.epoch, length_grouped_batches([0] * self.num_prompts, self.num_prompts, self.seed,
                                                                self.epoch, group=False)[0])
        return self._cached[1]

    def next(self) -> list[int]:
        batch, self._ended_epoch = [], False
        while len(batch) < self.batch_size:
            taken = self._order()[self.offset:self.offset + self.batch_size - len(batch)]
            batch += taken
            self.offset += len(taken)
            if self.offset >= self.num_prompts:
                self.epoch, self.offset, self._ended_epoch = self.epoch + 1, 0, True
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "prompt_offset": self.offset}

    def epoch_done(self) -> bool:
        """Whether the last batch taken ended an epoch."""
        return self._ended_epoch


def completion_samples(cfg, prompts: list[str], completions: list[str], scores: torch.Tensor) -> list[dict] | None:
    """A rollout's rows for completions.jsonl (log_completions; TRL's option of that name), else None."""
    if not cfg.log_completions:
        return None
    return [{"prompt": p, "completion": c, "reward": float(r)} for p, c, r in zip(prompts, completions, scores.tolist())]


def rl_total_steps(cfg, num_prompts: int, prompts_per_rank: int = 0) -> int:
    """Rollout batches of the run: max_steps, else epochs over the prompts (global batches of
    ``prompts_per_rank`` per rank; 0: per_device_train_batch_size)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    global_batch = (prompts_per_rank or cfg.per_device_train_batch_size) * distributed.world_size()
    return max(1, math.ceil(cfg.num_train_epochs * num_prompts / global_batch))


def run_rl(cfg, desc: str, steps: int, num_prompts: int, modules: dict, optimizer, scheduler,
           rl_step: Callable[[list[int], StatsWindow, dict, int], None], probe: Callable[[], dict] | None = None,
           state: dict | None = None, prompts_per_rank: int = 0) -> dict:
    """The rollout loop PPO and GRPO share: prompts -> ``rl_step`` -> schedule, logs, checkpoints.

    ``rl_step(prompt_indices, window, state, step)`` does rollout ``step`` (0, 1, ...;
    its sampling stream derives from it) and its updates,
    adding stats to ``window``; ``state`` holds the recipe's own scalars (e.g.
    PPO's adaptive kl_coef), logged and saved in every checkpoint. It returns
    the rollout's ``completion_samples`` (None unless log_completions), written
    to completions.jsonl at each logging step. Resume
    restores modules, optimizer, schedule, RNG, state and the prompt position.
    Each rollout takes ``prompts_per_rank`` prompts per rank (0: per_device_train_batch_size).
    Returns the last log record with ``wall_s``.
    """
    state = dict(state or {})
    saved = resume(cfg, modules, optimizer, scheduler)
    state.update({k: saved[k] for k in state if k in saved})
    step = saved.get("step", 0)
    stream = PromptStream(num_prompts, (prompts_per_rank or cfg.per_device_train_batch_size) * distributed.world_size(), cfg.seed,
                          saved.get("epoch", 0), saved.get("prompt_offset", 0))
    logger = metrics.MetricsLogger(cfg.output_dir, steps, step, saved.get("elapsed_s", 0.0), cfg.progress, desc,
                                   metrics.open_backends(cfg, step))
    window, record = StatsWindow(), {}
    window.load(saved.get("window"))

    def save() -> Path:
        return checkpoint.save_checkpoint(cfg.output_dir, step, modules, {"optimizer": optimizer, "scheduler": scheduler},
                                          {**state, "elapsed_s": logger.elapsed_s, **stream.state(),
                                           "window": window.state()}, cfg.save_total_limit)

    with Interrupts() as interrupts, logger:  # the logger closes on an error too
        while step < steps:
            samples = rl_step(distributed.rank_share(stream.next()), window, state, step)
            scheduler.step()
            step += 1
            logger.advance()
            extra = probe() if probe and eval_due(cfg, step, steps, stream.epoch_done()) else {}
            if step % cfg.logging_steps == 0 or step == steps:
                if samples and distributed.is_main():
                    with (Path(cfg.output_dir) / "completions.jsonl").open("a") as handle:
                        handle.writelines(json.dumps({"step": step, **row}) + "\n" for row in samples)
                record = logger.log(step, {**window.pop(), **state, "learning_rate": scheduler.get_last_lr()[0],
                                           **extra})
            elif extra:  # an eval step between two log lines: a line of its own
                logger.log(step, extra)
            checkpoint_or_stop(cfg, step, steps, interrupts, logger, save)
    logger.close()
    record["wall_s"] = round(logger.elapsed_s, 2)
    return record
