"""Group Relative Policy Optimization with verifiable rewards, and its critic-free kin (RLOO, REINFORCE++, ReMax).

    posttrain grpo --model_name_or_path runs/sft --dataset_name data/arith/prompts.jsonl
    posttrain rloo --model_name_or_path runs/sft --dataset_name data/arith/prompts.jsonl

Shao et al., arXiv 2402.03300 (DeepSeekMath) §4.1. Each step:

  1. rollout     G = num_generations completions per prompt in one batched call;
                 a prompt's G completions are consecutive rows and stay together
                 (with an environment or tools: multi-turn trajectories, tool
                 tokens masked out; see posttrain.rollout.MultiTurn)
  2. rewards     the reward sources; optionally drop groups whose rewards are
                 all equal (they carry no signal)
  3. cache       old log-probs (when num_iterations > 1, or for a KL in the
                 reward: otherwise the ratio is 1 at the one pass and old =
                 current, detached) and reference log-probs (only when beta > 0:
                 beta 0 loads no reference); then the advantages of
                 advantage_estimator (no critic): grpo (group-normalised),
                 rloo (leave-one-out), reinforce_pp[_baseline] (global
                 whitening), remax (minus the greedy completion's reward), with
                 kl_in_reward's KL subtracted from the reward first
  4. update      num_iterations passes: the policy loss of loss_type (clipped
                 ratio per token or, importance_sampling_level sequence, GSPO's;
                 cispo; sapo; rloo's whole-completion ratio), + beta·KL as a
                 separate loss term unless it is in the reward, aggregated

The loss types follow their papers: grpo (per-sequence mean, then mean),
bnpo (token mean), dr_grpo (Dr. GRPO, sum / (B·max_completion_length)), dapo
(DAPO, token mean over the whole accumulated batch), cispo (CISPO, aggregated
as dapo), sapo (SAPO, as grpo), rloo (TRL's RLOOTrainer). `posttrain rloo` is
this recipe with TRL RLOOTrainer's defaults (config.RLOOConfig). See docs/papers.md.
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
    loss_aggregation,
    masked_mean,
    masked_sum,
    normalize_advantages,
    policy_token_losses,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    rloo_sequence_loss,
)
from posttrain.modelcard import stage_of
from posttrain.models import load_policy_and_reference, reference_mode, token_logps
from posttrain.optim import build_optimizer, clip_and_step, scheduler_for
from posttrain.rewards import RewardSources, check_required_fields
from posttrain.rollout import GroupRollout, build_engine, generate, sample_and_score
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
def make_rollout(cfg, engine, policy, ref, rewards, prompts, step: int = 0) -> tuple[GroupRollout | None, dict]:
    """Steps 1-3: sample G completions per prompt (this rank's stream for rollout ``step``), score, group
    advantages, caches."""
    G = cfg.num_generations
    gen, episodes, texts, scores, parts = sample_and_score(cfg, engine, rewards, prompts, G, step)
    mask, T = gen.completion_mask, gen.completion_mask.shape[1]
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
    kl_in_reward = cfg.beta > 0 and cfg.kl_in_reward
    with autocast(cfg.bf16):
        rollout_logps = None
        if cfg.num_iterations > 1 or kl_in_reward:
            rollout_logps = token_logps(policy, ids, attn, T, temperature=cfg.temperature)
        ref_logps = None
        if cfg.beta:
            with reference_mode(policy, ref) as ref_model:
                ref_logps = token_logps(ref_model, ids, attn, T, temperature=cfg.temperature)
    token_kl = kl_penalty(rollout_logps, ref_logps, cfg.kl_estimator) * mask if kl_in_reward else None
    if token_kl is not None:
        stats["kl"] = masked_mean(token_kl, mask)
    greedy = greedy_scores(cfg, engine, policy, rewards, prompts) if cfg.advantage_estimator == "remax" else None
    advantages = rollout_advantages(cfg, scores, mask, token_kl, greedy)
    advantages = advantages * (rows.unsqueeze(1) if advantages.dim() == 2 else rows)
    old_logps = rollout_logps if cfg.num_iterations > 1 else None
    return GroupRollout(ids, attn, mask, advantages, rows, old_logps, ref_logps), stats


def greedy_scores(cfg, engine, policy, rewards, prompts) -> torch.Tensor:
    """(N,) reward of each prompt's greedy completion under the current policy: ReMax's baseline."""
    gen = generate(policy, engine.tokenizer, [p.prompt_ids for p in prompts], cfg.max_completion_length, greedy=True)
    scores, _ = rewards.score([p.prompt_text for p in prompts], gen.completions, [p.extra for p in prompts],
                              raw_prompts=[p.prompt for p in prompts], truncated=gen.truncated)
    return scores.to(gen.completion_mask.device)


def rollout_advantages(cfg, scores, mask, token_kl, greedy) -> torch.Tensor:
    """Step 2b: advantage_estimator on this rank's rows; (N·G,), or (N·G, T) for REINFORCE++.

    Batch statistics are the global batch's: every rank's rewards are
    gathered (groups never span ranks) and this rank's slice is kept, or,
    for REINFORCE++'s token whitening, the sums run over ranks. With
    kl_in_reward the KL enters each completion's reward (its sum, as TRL's
    RLOO does) or, for REINFORCE++, each token's.
    """
    G, estimator = cfg.num_generations, cfg.advantage_estimator
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        group = G if estimator == "reinforce_pp_baseline" else None
        return reinforce_pp_advantages(scores, mask, group, token_kl, cfg.beta, reduce=distributed.all_sum)
    rewards = scores if token_kl is None else scores - cfg.beta * masked_sum(token_kl, mask, dim=-1)
    start, everyone = distributed.rank() * len(rewards), distributed.all_gather(rewards)
    if estimator == "grpo":
        advantages = group_advantages(everyone, G, cfg.scale_rewards)
    elif estimator == "rloo":
        advantages = rloo_advantages(everyone, G)
    else:
        advantages = remax_advantages(everyone, distributed.all_gather(greedy), G)
    if cfg.normalize_advantages:
        advantages = normalize_advantages(advantages)
    return advantages[start:start + len(rewards)]


def grpo_loss(cfg, policy, mb: GroupRollout, T: int, num_tokens: torch.Tensor):
    """Step 4 on one micro-batch: the policy loss of loss_type (+ beta·KL unless it is in the reward), aggregated."""
    logps, entropy = token_logps(policy, mb.input_ids, mb.attention_mask, T, return_entropy=True,
                                 temperature=cfg.temperature)
    old = mb.old_logps if mb.old_logps is not None else logps.detach()
    stats, kl = {}, None
    if cfg.beta and not cfg.kl_in_reward:
        kl = bias_corrected_kl(logps, mb.ref_logps, old) if cfg.use_bias_correction_kl else \
            kl_penalty(logps, mb.ref_logps, cfg.kl_estimator)
        stats["kl"] = masked_mean(kl.detach(), mb.mask)
    if cfg.loss_type == "rloo":  # TRL's RLOOTrainer: one clipped ratio per completion, mean over completions
        per_sequence, clip_stats = rloo_sequence_loss(logps, old, mb.advantages, mb.mask, cfg.epsilon, cfg.epsilon_high or None)
        if kl is not None:
            per_sequence = per_sequence + cfg.beta * masked_sum(kl, mb.mask, dim=-1)
        loss = per_sequence.mean()
        stats.update({k: masked_mean(v, mb.kept.float()) for k, v in clip_stats.items()})
    else:
        policy_loss, aggregation = loss_aggregation(cfg.loss_type)
        advantages = mb.advantages if mb.advantages.dim() == 2 else mb.advantages.unsqueeze(1)
        per_token, clip_stats = policy_token_losses(
            logps, old, advantages, mb.mask, policy_loss, cfg.importance_sampling_level, cfg.epsilon,
            cfg.epsilon_high or None, cfg.delta or None, cfg.clip_ratio_c or None, cfg.cispo_two_sided,
            cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        if kl is not None:
            per_token = per_token + cfg.beta * kl
        loss = aggregate_loss(per_token, mb.mask, aggregation, cfg.max_completion_length, num_tokens)
        stats.update({k: masked_mean(v, mb.mask) for k, v in clip_stats.items()})
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
            # dapo already divides by the whole batch's tokens; the others weigh by completions: grpo and
            # dr_grpo divide by all the micro-batch's rows (a filtered row adds 0), bnpo's token mean (per
            # micro-batch, as TRL normalises it) is over the kept rows' tokens alone, so it counts those rows
            rows = mb.kept.sum() if cfg.loss_type == "bnpo" else mb.mask.shape[0]
            weight = world if cfg.loss_type in ("dapo", "cispo") else world * rows / counted
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

    def rl_step(indices, window, state, step):  # steps 1-4 of the module docstring, once per rollout batch
        rollout, stats = make_rollout(cfg, engine, policy, ref, rewards, [prompts[i] for i in indices], step)
        samples = stats.pop("samples", None)
        window.add(stats)
        if rollout is not None:  # every group filtered out: no signal, no update
            update(cfg, policy, rollout, optimizer, params, window)
            engine.load_weights(policy)
        return samples

    stage = stage_of(cfg)  # grpo, or rloo (this recipe with RLOO's defaults)
    record = run_rl(cfg, stage, steps, len(prompts), {"policy": policy}, optimizer, scheduler, rl_step, probe)
    copies = {"policy": 1, "reference": int(ref is not None), "reward_model": len(rewards.models)}
    finish(cfg, policy, tokenizer, record, stage.upper(), {"model_copies": copies})
