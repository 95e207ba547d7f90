"""Online DPO: preference pairs sampled from the current policy, judged by the reward sources, DPO loss on them.

    posttrain online_dpo --model_name_or_path runs/sft --dataset_name data/arith/prompts.jsonl

Guo et al., arXiv 2402.04792 (direct alignment from online feedback), with TRL OnlineDPOTrainer's
semantics. Each step:

  1. rollout   2 completions per prompt from the current policy (posttrain.rollout,
               as grpo samples), per_device_train_batch_size x
               gradient_accumulation_steps prompts per process (TRL's
               per_device_train_batch_size counts prompts per micro-batch)
  2. judge     the reward sources score both (missing_eos_penalty off those
               without EOS); the higher reward is chosen, a tie chooses the
               first sampled (losses.online_dpo_pairs)
  3. update    dpo_loss (sigmoid | ipo) on each pair's summed completion
               log-probs, policy against the frozen reference; one optimizer
               step over gradient_accumulation_steps micro-batches of
               per_device_train_batch_size pairs

Log-probs are the model's own (temperature 1, as TRL scores them): β·log π/π_ref
is DPO's implicit reward whatever temperature sampled the pair.
"""

from __future__ import annotations

import torch

from posttrain import distributed
from posttrain.data import prompt_examples, train_rows
from posttrain.evaluation import rl_evaluation
from posttrain.losses import dpo_loss, masked_sum, online_dpo_pairs
from posttrain.models import load_policy_and_reference, reference_mode, token_logps
from posttrain.optim import build_optimizer, clip_and_step, scheduler_for
from posttrain.rewards import RewardSources, check_required_fields
from posttrain.rollout import Generation, build_engine, sample_and_score
from posttrain.training import autocast, completion_samples, finish, rl_total_steps, run_rl, setup_run, trainable_parameters


def pair_loss(cfg, policy, ref, gen: Generation, scores: torch.Tensor, rows: torch.Tensor):
    """DPO loss and TRL-named stats of b pairs: ``rows`` (2b,) are the chosen rows, then the rejected ones."""
    ids, attn, mask = gen.input_ids[rows], gen.attention_mask[rows], gen.completion_mask[rows]
    T = mask.shape[1]
    logps = masked_sum(token_logps(policy, ids, attn, T), mask, dim=-1)  # (2b,) log π(y|x)
    with torch.no_grad(), reference_mode(policy, ref) as ref_model:
        ref_logps = masked_sum(token_logps(ref_model, ids, attn, T), mask, dim=-1)
    (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), ref_logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type)
    kl, reward = (logps - ref_logps).detach(), scores[rows]  # each completion's summed k1 KL and its reward
    margins = chosen_rewards - rejected_rewards
    return losses.mean(), {
        "objective/kl": kl.mean(), "objective/entropy": -logps.detach().mean(),
        "objective/non_score_reward": -cfg.beta * kl.mean(), "objective/rlhf_reward": (reward - cfg.beta * kl).mean(),
        "objective/scores": reward.mean(), "objective/scores_margin": (reward.chunk(2)[0] - reward.chunk(2)[1]).mean(),
        "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (margins > 0).float().mean(), "rewards/margins": margins.mean(),
        "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(),
        "val/contain_eos_token": (~gen.truncated[rows]).float().mean(), "completion_length": mask.sum(-1).mean(),
    }


def update(cfg, policy, ref, gen, scores, optimizer, params, window) -> None:
    """Step 2-3: judge the pairs, then one optimizer step over micro-batches of per_device_train_batch_size pairs.

    Each micro-batch's mean loss weighs its share of this rank's pairs; every
    rank holds as many, so the gradient all-reduce's mean over ranks makes it
    the mean over the global batch's pairs, as TRL's accumulation does.
    """
    chosen, rejected = online_dpo_pairs(scores)
    N = chosen.shape[0]
    starts = list(range(0, N, cfg.per_device_train_batch_size))
    step_loss = 0.0
    for i, start in enumerate(starts):
        pick = slice(start, start + cfg.per_device_train_batch_size)
        rows = torch.cat([chosen[pick], rejected[pick]])
        distributed.sync_gradients([policy], i == len(starts) - 1)
        with autocast(cfg.bf16):
            loss, stats = pair_loss(cfg, policy, ref, gen, scores, rows)
        weight = rows.shape[0] / (2 * N)
        (loss * weight).backward()
        step_loss = step_loss + loss.detach() * weight
        window.add(stats)
    window.add({"loss": step_loss, "grad_norm": clip_and_step(params, optimizer, None, cfg.max_grad_norm)})


def main(cfg) -> None:
    # set-up: policy and reference, prompts (cut so prompt + completion fits max_length, as TRL does: at least the
    # prompt's last token is kept), reward sources
    setup_run(cfg)
    tokenizer, policy, ref = load_policy_and_reference(cfg)
    rows = train_rows(cfg)
    prompts = prompt_examples(rows, tokenizer, max(1, min(cfg.max_prompt_length, cfg.max_length - cfg.max_completion_length)))
    check_required_fields(cfg.reward_funcs, prompts, [r.source for r in rows])
    rewards = RewardSources.from_config(cfg, tokenizer)
    params = [p for _, p in trainable_parameters(policy)]
    optimizer = build_optimizer(trainable_parameters(policy), cfg.learning_rate, cfg.weight_decay)
    per_rank = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps  # prompts of one step, per process
    steps = rl_total_steps(cfg, len(prompts), per_rank)
    scheduler = scheduler_for(cfg, optimizer, steps)

    probe = rl_evaluation(cfg, policy, tokenizer, rewards)  # held-out mean reward and greedy accuracy
    engine = build_engine(cfg, policy, tokenizer)

    def rl_step(indices, window, state, step):  # steps 1-3 of the module docstring
        gen, _, texts, scores, _ = sample_and_score(cfg, engine, rewards, [prompts[i] for i in indices], 2, step)
        update(cfg, policy, ref, gen, scores, optimizer, params, window)
        engine.load_weights(policy)
        return completion_samples(cfg, texts, gen.completions, scores)

    record = run_rl(cfg, "online_dpo", steps, len(prompts), {"policy": policy}, optimizer, scheduler, rl_step, probe,
                    state={"beta": cfg.beta}, prompts_per_rank=per_rank)  # beta: logged as TRL logs it
    copies = {"policy": 1, "reference": int(ref is not None), "reward_model": len(rewards.models)}
    finish(cfg, policy, tokenizer, record, "Online DPO", {"model_copies": copies})
