"""Group Relative Policy Optimization with verifiable rewards.

    posttrain grpo --model_name_or_path runs/sft --dataset_name data/arith/prompts.jsonl

Shao et al., arXiv 2402.03300 (DeepSeekMath) §4.1. Each step:

  1. rollout     G = num_generations completions per prompt in one batched call;
                 a prompt's G completions are consecutive rows and stay together
                 (with an environment or tools: multi-turn trajectories, tool
                 tokens masked out; see posttrain.rollout.MultiTurn)
  2. rewards     the reward sources, then group_advantages (no critic: the
                 group's mean is the baseline); optionally drop groups whose
                 rewards are all equal (they carry no signal)
  3. cache       old log-probs (only when num_iterations > 1: otherwise the
                 ratio is 1 at the one pass and old = current, detached) and
                 reference log-probs (only when beta > 0: beta 0 loads no reference)
  4. update      num_iterations passes: clipped ratio (epsilon, epsilon_high),
                 + beta·k3 KL as a separate loss term, aggregated by loss_type

The loss types follow their papers: grpo (per-sequence mean, then mean),
bnpo (token mean), dr_grpo (Dr. GRPO, sum / (B·max_completion_length)), dapo
(DAPO, token mean over the whole accumulated batch). See docs/papers.md.
"""

from __future__ import annotations

import torch

from posttrain import distributed
from posttrain.data import prompt_examples, train_rows
from posttrain.evaluation import rl_evaluation
from posttrain.losses import (
    aggregate_loss,
    bias_corrected_kl,
    group_advantages,
    kl_penalty,
    masked_mean,
    ppo_token_losses,
)
from posttrain.models import load_policy_and_reference, reference_mode, token_logps
from posttrain.optim import build_optimizer, clip_and_step, scheduler_for
from posttrain.rewards import RewardSources, check_required_fields
from posttrain.rollout import GroupRollout, build_engine, sample
from posttrain.training import (
    StatsWindow,
    autocast,
    completion_samples,
    finish,
    rl_total_steps,
    run_rl,
    setup_run,
    trainable_parameters,
)


def group_filter(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N·G,) bool: True for rows of groups whose rewards are not all equal."""
    grouped = rewards.view(-1, group_size)
    varied = (grouped.max(1).values - grouped.min(1).values) > 0
    return varied.repeat_interleave(group_size)


@torch.no_grad()
def make_rollout(cfg, engine, policy, ref, rewards, prompts) -> tuple[GroupRollout | None, dict]:
    """Steps 1-3: sample G completions per prompt, score, group advantages, caches."""
    G = cfg.num_generations
    gen, episodes = sample(engine, prompts, G)  # episodes: multi-turn only (mask 0 on tool tokens)
    mask, T = gen.completion_mask, gen.completion_mask.shape[1]
    texts = [p.prompt_text for p in prompts for _ in range(G)]
    extras = [p.extra for p in prompts for _ in range(G)]
    scores, parts = rewards.score(texts, gen.completions, extras, raw_prompts=[p.prompt for p in prompts for _ in range(G)],
                                  truncated=gen.truncated, environments=episodes and episodes.environments)
    scores = scores.to(mask.device)
    # group statistics over the global batch: gather every rank's scores (groups never span ranks), keep ours
    start = distributed.rank() * len(scores)
    advantages = group_advantages(distributed.all_gather(scores), G, cfg.scale_rewards)[start:start + len(scores)]
    keep = group_filter(scores, G)
    stats = {"reward": scores.mean(), "reward_std": scores.view(-1, G).std(1).mean(),
             "frac_reward_zero_std": 1 - keep.float().mean(), "completion_length": mask.sum(-1).mean(),
             "truncated_ratio": gen.truncated.float().mean(), **{k: v.mean() for k, v in parts.items()},
             **(episodes.stats() if episodes else {})}
    samples = completion_samples(cfg, texts, episodes.transcripts if episodes else gen.completions, scores)
    if samples:
        stats["samples"] = samples
    if cfg.mask_truncated_completions:
        mask = mask * (~gen.truncated).float().unsqueeze(1).to(mask.device)
    # filtered groups stay in the batch with no tokens that count, so every rank runs the same micro-batches
    rows = keep if cfg.filter_zero_std_groups else torch.ones_like(keep)
    if not distributed.any_rank(bool(rows.any())):
        return None, stats
    mask = mask * rows.float().unsqueeze(1)
    ids, attn = gen.input_ids, gen.attention_mask
    with autocast(cfg.bf16):
        old_logps = token_logps(policy, ids, attn, T, temperature=cfg.temperature) if cfg.num_iterations > 1 else None
        ref_logps = None
        if cfg.beta:
            with reference_mode(policy, ref) as ref_model:
                ref_logps = token_logps(ref_model, ids, attn, T, temperature=cfg.temperature)
    return GroupRollout(ids, attn, mask, advantages * rows, rows, old_logps, ref_logps), stats


def grpo_loss(cfg, policy, mb: GroupRollout, T: int, num_tokens: torch.Tensor):
    """Step 4 on one micro-batch: clipped surrogate + beta·k3, aggregated by loss_type."""
    logps, entropy = token_logps(policy, mb.input_ids, mb.attention_mask, T, return_entropy=True,
                                 temperature=cfg.temperature)
    old = mb.old_logps if mb.old_logps is not None else logps.detach()
    per_token, clip_stats = ppo_token_losses(logps, old, mb.advantages.unsqueeze(1), cfg.epsilon,
                                             cfg.epsilon_high or None)
    stats = {k: masked_mean(v, mb.mask) for k, v in clip_stats.items() if k != "approx_kl"}
    if cfg.beta:
        if cfg.use_bias_correction_kl:
            kl = bias_corrected_kl(logps, mb.ref_logps, old)
        else:
            kl = kl_penalty(logps, mb.ref_logps, "k3")
        per_token = per_token + cfg.beta * kl
        stats["kl"] = masked_mean(kl.detach(), mb.mask)
    loss = aggregate_loss(per_token, mb.mask, cfg.loss_type, cfg.max_completion_length, num_tokens)
    stats["entropy"] = masked_mean(entropy, mb.mask)
    return loss, stats


def update(cfg, policy, rollout: GroupRollout, optimizer, params, window: StatsWindow) -> None:
    """num_iterations passes over the rollout, each one optimizer step of accumulated micro-batches.

    Every micro-batch weighs its share of the completions that count over all
    ranks (the gradient all-reduce averages over ranks, which the world size
    undoes); dapo's token count is the whole accumulated global batch's.
    """
    B, T = rollout.mask.shape
    micro = max(1, -(-B // cfg.gradient_accumulation_steps))
    world = distributed.world_size()
    num_tokens = distributed.all_sum(rollout.mask.sum())  # for dapo
    counted = distributed.all_sum(rollout.kept.sum()).clamp_min(1)
    starts = list(range(0, B, micro))
    for _ in range(cfg.num_iterations):
        step_loss = 0.0
        for i, start in enumerate(starts):
            mb = rollout.select(torch.arange(start, min(start + micro, B)))
            distributed.sync_gradients([policy], i == len(starts) - 1)
            with autocast(cfg.bf16):
                loss, stats = grpo_loss(cfg, policy, mb, T, num_tokens)
            # dapo already divides by the whole batch's tokens; the others (bnpo: a token mean per
            # micro-batch, as TRL normalises it) weigh by completions
            weight = world if cfg.loss_type == "dapo" else world * mb.mask.shape[0] / counted
            (loss * weight).backward()
            step_loss = step_loss + loss.detach() * weight
            window.add(stats)
        # the loss of the whole global batch (the mean over ranks undoes the world size in the weights)
        window.add({"loss": step_loss, "grad_norm": clip_and_step(params, optimizer, None, cfg.max_grad_norm)})


def main(cfg) -> None:
    # set-up: prompts, policy, reference only when beta > 0, reward sources
    setup_run(cfg)
    tokenizer, policy, ref = load_policy_and_reference(cfg, need_reference=cfg.beta > 0)
    rows = train_rows(cfg)
    prompts = prompt_examples(rows, tokenizer, cfg.max_prompt_length)
    check_required_fields(cfg.reward_funcs, prompts, [r.source for r in rows])
    rewards = RewardSources.from_config(cfg, tokenizer)
    params = [p for _, p in trainable_parameters(policy)]
    optimizer = build_optimizer(trainable_parameters(policy), cfg.learning_rate, cfg.weight_decay)
    steps = rl_total_steps(cfg, len(prompts))
    scheduler = scheduler_for(cfg, optimizer, steps)

    probe = rl_evaluation(cfg, policy, tokenizer, rewards)  # held-out mean reward and greedy accuracy
    engine = build_engine(cfg, policy, tokenizer)

    def rl_step(indices, window, state):  # steps 1-4 of the module docstring, once per rollout batch
        rollout, stats = make_rollout(cfg, engine, policy, ref, rewards, [prompts[i] for i in indices])
        samples = stats.pop("samples", None)
        window.add(stats)
        if rollout is not None:  # every group filtered out: no signal, no update
            update(cfg, policy, rollout, optimizer, params, window)
            engine.load_weights(policy)
        return samples

    record = run_rl(cfg, "grpo", steps, len(prompts), {"policy": policy}, optimizer, scheduler, rl_step, probe)
    copies = {"policy": 1, "reference": int(ref is not None), "reward_model": len(rewards.models)}
    finish(cfg, policy, tokenizer, record, "GRPO", {"model_copies": copies})
