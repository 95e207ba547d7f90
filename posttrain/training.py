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
import math
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from posttrain import checkpoint, distributed, metrics
from posttrain.config import save_config
from posttrain.data import length_grouped_batches
from posttrain.optim import build_optimizer, build_scheduler, clip_and_step


def setup_run(cfg) -> None:
    """Threads, seeds, output_dir and config.yaml: the first step of every recipe.

    Every rank takes the same seed, so models initialised here start equal on
    every rank (FSDP2 does not broadcast them); rank 0 writes the folder.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if distributed.is_main():
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    distributed.barrier()


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
    return torch.autocast(distributed.device().type, dtype=torch.bfloat16)


def trainable_parameters(*models) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for m in models for n, p in m.named_parameters() if p.requires_grad]


def resume(cfg, modules: dict, optimizer, scheduler) -> dict:
    """Restore modules, optimizer, schedule and RNG from resume_from_checkpoint.

    Returns the checkpoint's trainer state (step, data position, ...), or {}
    when there is nothing to resume.
    """
    path = checkpoint.resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
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
        means = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32).cpu() / self.counts[k]
                             for k in keys]) if keys else torch.zeros(0)
        means = distributed.all_mean(means).cpu()
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
) -> dict:
    """Train ``model`` on the examples whose token lengths are ``lengths``.

    ``make_batch(indices)`` collates a micro-batch; ``loss_fn(batch)`` returns
    the mean loss and a dict of detached stats. Accumulated micro-batches are
    weighted by ``batch_weight(batch)`` (default: rows), so that a token-mean
    loss weighted by its token count gives exactly the large batch's gradient.
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
    steps = total_steps(cfg, micro_per_epoch)
    scheduler = build_scheduler(optimizer, steps, cfg.warmup_ratio, cfg.lr_scheduler_type)

    # resume: modules, optimizer, schedule, RNG, the data position (epoch, micro-batch) and the logging window
    saved = resume(cfg, {"model": model}, optimizer, scheduler)
    step, epoch, micro = saved.get("step", 0), saved.get("epoch", 0), saved.get("micro", 0)
    window = StatsWindow()
    window.load(saved.get("window"))

    logger = metrics.MetricsLogger(cfg.output_dir, steps, step, saved.get("elapsed_s", 0.0), cfg.progress, desc)
    record: dict = {}
    model.train()
    while step < steps:
        batches = epoch_batches(epoch)
        while micro < len(batches) and step < steps:
            # one optimizer step = `accum` global micro-batches (fewer at the end of an epoch)
            made = [make_batch(distributed.rank_share(indices)).to(distributed.device())
                    for indices in batches[micro:micro + accum]]
            weights = [float(batch_weight(b)) if batch_weight else float(len(b)) for b in made]
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
            window.add({"loss": step_loss})  # the loss of the whole global batch (the mean over ranks undoes the scale)
            micro += len(made)
            grad_norm = clip_and_step([p for _, p in params], optimizer, scheduler, cfg.max_grad_norm)
            window.add({"grad_norm": grad_norm})
            step += 1
            logger.advance()
            if step % cfg.logging_steps == 0 or step == steps:
                extra = evaluate() if evaluate is not None else {}
                model.train()
                lr = scheduler.get_last_lr()[0]
                record = logger.log(step, {"epoch": round(epoch + micro / len(batches), 4), **window.pop(),
                                           "learning_rate": lr, **extra})
            if cfg.save_steps and step % cfg.save_steps == 0 and step < steps:
                checkpoint.save_checkpoint(cfg.output_dir, step, {"model": model},
                                           {"optimizer": optimizer, "scheduler": scheduler},
                                           {"epoch": epoch, "micro": micro, "elapsed_s": logger.elapsed_s, "window": window.state()},
                                           cfg.save_total_limit)
        if micro >= len(batches):
            epoch, micro = epoch + 1, 0
    logger.close()
    record["wall_s"] = round(logger.elapsed_s, 2)
    return record


def finish(cfg, model, tokenizer, record: dict, title: str, extra: dict | None = None) -> None:
    """Final HF-format save (rank 0), plots and summary.json: the last step of every recipe."""
    from posttrain.models import unsharded_replica

    checkpoint.save_pretrained(model, tokenizer, cfg.output_dir, replica=lambda: unsharded_replica(model, cfg))
    metrics.plot_metrics(cfg.output_dir, title)
    summary = {"wall_s": record.get("wall_s"), "peak_rss_mb": round(metrics.peak_rss_mb(), 1),
               "final": record, **(extra or {})}
    metrics.write_summary(cfg.output_dir, summary)


class PromptStream:
    """Global batches of prompt indices for the RL stages, in a seeded order per epoch.

    ``batch_size`` is the global batch (per device x world size); each rank
    takes its share. The position (epoch, batch) is part of every checkpoint,
    so a resumed run sees the same prompts in the same order as an
    uninterrupted one, at any world size.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0):
        self.num_prompts, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.epoch, self.position = epoch, position

    def _order(self) -> list[list[int]]:
        return length_grouped_batches([0] * self.num_prompts, self.batch_size, self.seed, self.epoch, drop_last=True) \
            or [list(range(self.num_prompts))]

    def next(self) -> list[int]:
        batches = self._order()
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self._order()
        self.position += 1
        return batches[self.position - 1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


def rl_total_steps(cfg, num_prompts: int) -> int:
    """Rollout batches of the run: max_steps, else epochs over the prompts (global batches)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    global_batch = cfg.per_device_train_batch_size * distributed.world_size()
    return max(1, math.ceil(cfg.num_train_epochs * num_prompts / global_batch))


def run_rl(cfg, desc: str, steps: int, num_prompts: int, modules: dict, optimizer, scheduler,
           rl_step: Callable[[list[int], StatsWindow, dict], None], probe: Callable[[], dict] | None = None,
           state: dict | None = None) -> dict:
    """The rollout loop PPO and GRPO share: prompts -> ``rl_step`` -> schedule, logs, checkpoints.

    ``rl_step(prompt_indices, window, state)`` does one rollout and its updates,
    adding stats to ``window``; ``state`` holds the recipe's own scalars (e.g.
    PPO's adaptive kl_coef), logged and saved in every checkpoint. Resume
    restores modules, optimizer, schedule, RNG, state and the prompt position.
    Returns the last log record with ``wall_s``.
    """
    state = dict(state or {})
    saved = resume(cfg, modules, optimizer, scheduler)
    state.update({k: saved[k] for k in state if k in saved})
    step = saved.get("step", 0)
    stream = PromptStream(num_prompts, cfg.per_device_train_batch_size * distributed.world_size(), cfg.seed,
                          saved.get("epoch", 0), saved.get("position", 0))
    logger = metrics.MetricsLogger(cfg.output_dir, steps, step, saved.get("elapsed_s", 0.0), cfg.progress, desc)
    window, record = StatsWindow(), {}
    window.load(saved.get("window"))
    while step < steps:
        rl_step(distributed.rank_share(stream.next()), window, state)
        scheduler.step()
        step += 1
        logger.advance()
        if step % cfg.logging_steps == 0 or step == steps:
            extra = probe() if probe else {}
            record = logger.log(step, {**window.pop(), **state, "learning_rate": scheduler.get_last_lr()[0], **extra})
        if cfg.save_steps and step % cfg.save_steps == 0 and step < steps:
            checkpoint.save_checkpoint(cfg.output_dir, step, modules, {"optimizer": optimizer, "scheduler": scheduler},
                                       {**state, "elapsed_s": logger.elapsed_s, **stream.state(), "window": window.state()},
                                       cfg.save_total_limit)
    logger.close()
    record["wall_s"] = round(logger.elapsed_s, 2)
    return record
