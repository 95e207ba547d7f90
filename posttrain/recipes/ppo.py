"""PPO-based RLHF: actor, critic, frozen reference and reward sources.

    posttrain ppo --model_name_or_path runs/sft --dataset_name data/arith/prompts.jsonl
    posttrain ppo --config configs/ppo_tiny.yaml --critic shared

Schulman et al., arXiv 1707.06347, in the RLHF form of Ziegler et al.
(arXiv 1909.08593) and Ouyang et al. (arXiv 2203.02155). Each step:

  1. rollout   sample completions for a batch of prompts (KV cache, one call), or
               multi-turn trajectories with an environment or tools (tool tokens
               masked out; the score sits on the last model token)
  2. score     old log-probs, reference log-probs and values, once, cached —
               there is no "old actor" model copy; all log-probs are of
               softmax(z / temperature), the distribution that was sampled
  3. rewards   r_t = -kl_coef·KL_t on every completion token, plus the
               sequence score on the last one
  4. GAE       advantages and returns over completion tokens, whitened
  5. epochs    num_ppo_epochs over num_mini_batches: clipped surrogate, clipped
               value loss, entropy bonus; stop early when approx KL > target_kl

``critic: shared`` puts the value head on the actor's own trunk: one model copy
fewer, and the value loss reaches the trunk scaled by vf_coef.
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain import checkpoint, distributed
from posttrain.data import prompt_examples, train_rows
from posttrain.distributed import device
from posttrain.evaluation import rl_evaluation
from posttrain.losses import (
    adaptive_kl_coef,
    explained_variance,
    gae,
    kl_penalty,
    last_token_index,
    masked_mean,
    masked_sum,
    ppo_policy_loss,
    value_loss,
    whiten,
)
from posttrain.models import (
    disable_dropout,
    load_options,
    load_policy_and_reference,
    load_scalar_model,
    reference_mode,
    token_logps,
    token_values,
)
from posttrain.optim import build_optimizer, clip_and_step, scheduler_for
from posttrain.rewards import RewardSources, check_required_fields
from posttrain.rollout import Rollout, build_engine, sample, sampling_stream
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


class ValueHead(nn.Module):
    """Scalar value on the actor's last hidden state (the shared critic). Starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, bias=False)
        nn.init.zeros_(self.score.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden).squeeze(-1).float()


def actor_critic_forward(actor, critic, value_head, ids, attention_mask, T: int, entropy: bool = True,
                         entropy_grad: bool = False, temperature: float = 1.0):
    """Completion log-probs (B, T), entropies (B, T) (None unless ``entropy``) and values (B, T) of V(s_t).

    V(s_t) is read at the position *before* token t (the state it was sampled
    from); a shared critic reads it from the same forward as the log-probs.
    """
    kwargs = {"return_entropy": entropy, "entropy_grad": entropy_grad, "return_hidden": value_head is not None,
              "temperature": temperature}
    out = token_logps(actor, ids, attention_mask, T, **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    logps, ent = out[0], (out[1] if entropy else None)
    if value_head is not None:
        values = value_head(out[-1][:, -T - 1:-1])
    else:
        values = token_values(critic, ids, attention_mask)[:, -T - 1:-1]
    return logps, ent, values


@torch.no_grad()
def make_rollout(cfg, engine, actor, ref, critic, value_head, rewards, prompts, kl_coef: float,
                 step: int = 0) -> tuple[Rollout, dict]:
    """Steps 1-4: sample (this rank's stream for rollout ``step``), score once, shape per-token rewards, GAE."""
    with sampling_stream(cfg.seed, step), autocast(cfg.bf16):  # sampled at the precision its log-probs are scored at
        gen, episodes = sample(engine, prompts)  # episodes: multi-turn only (mask 0 on tool tokens)
    mask, T = gen.completion_mask, gen.completion_mask.shape[1]
    with autocast(cfg.bf16):
        old_logps, _, values = actor_critic_forward(actor, critic, value_head, gen.input_ids, gen.attention_mask, T,
                                                    entropy=False, temperature=cfg.temperature)
        with reference_mode(actor, ref) as ref_model:
            ref_logps = token_logps(ref_model, gen.input_ids, gen.attention_mask, T, temperature=cfg.temperature)
    scores, parts = rewards.score([p.prompt_text for p in prompts], gen.completions, [p.extra for p in prompts],
                                  raw_prompts=[p.prompt for p in prompts], truncated=gen.truncated,
                                  environments=episodes and episodes.environments)
    scores = scores.to(mask.device)

    # 3. per-token reward: -β·KL everywhere, the sequence score on the last completion token
    kl = kl_penalty(old_logps, ref_logps, cfg.kl_estimator) * mask
    token_rewards = shape_rewards(scores, kl, mask, kl_coef, cfg.whiten_rewards)

    # 4. advantages
    values = values * mask
    advantages, returns = gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask, reduce=distributed.all_sum)  # over the global batch
    rollout = Rollout(gen.input_ids, gen.attention_mask, mask, old_logps, ref_logps, values, advantages, returns,
                      scores)
    samples = completion_samples(cfg, [p.prompt_text for p in prompts], episodes.transcripts if episodes else gen.completions,
                                 scores)
    stats = {"reward": scores.mean(), "reward_std": scores.std() if len(scores) > 1 else torch.tensor(0.0),
             "kl": masked_sum(kl, mask) / len(scores), "completion_length": mask.sum(-1).mean(),
             "non_score_reward": masked_sum(-kl_coef * kl, mask) / len(scores),
             **{k: v.mean() for k, v in parts.items()}, **(episodes.stats() if episodes else {}),
             **({"samples": samples} if samples else {})}
    return rollout, stats


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                  whiten_rewards: bool = False) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef·KL_t on every completion token, plus the sequence score on the last one
    (Ziegler et al. eq. 2): the last token of mask 1, the model's last in a multi-turn trajectory.
    ``whiten_rewards`` scales them to unit variance over the (global) batch without centring them, as TRL's
    option of that name does."""
    token_rewards = -kl_coef * kl
    last = last_token_index(mask)
    token_rewards[torch.arange(len(last)), last] += scores
    if whiten_rewards:
        token_rewards = whiten(token_rewards, mask, shift_mean=False, reduce=distributed.all_sum)
    return token_rewards


def ppo_epochs(cfg, actor, critic, value_head, rollout: Rollout, optimizer, params, window: StatsWindow) -> None:
    """Step 5: num_ppo_epochs passes over shuffled mini-batches of the rollout.

    Each mini-batch (B / num_mini_batches rollouts, exact: the config checks
    it divides) is one optimizer step, accumulated over
    gradient_accumulation_steps equal micro-batches. Each micro-batch's token
    means weigh by its share of the mini-batch's completion tokens over every
    rank, so the step's loss is the token mean of the whole (global)
    mini-batch whatever the split.
    """
    B, T = rollout.mask.shape
    trained = [m for m in (actor, critic, value_head) if m is not None]
    mini = max(1, B // cfg.num_mini_batches)  # exact for full batches: the config checks divisibility
    micro = max(1, mini // cfg.gradient_accumulation_steps)
    for _ in range(cfg.num_ppo_epochs):
        order = torch.randperm(B)
        for start in range(0, B - mini + 1, mini):
            approx_kl, step_loss = 0.0, 0.0
            chunks = order[start:start + mini].split(micro)
            tokens = distributed.all_sum(rollout.mask[order[start:start + mini]].sum()).clamp_min(1)
            for i, chunk in enumerate(chunks):
                mb = rollout.select(chunk)
                weight = distributed.world_size() * mb.mask.sum() / tokens
                distributed.sync_gradients(trained, i == len(chunks) - 1)
                with autocast(cfg.bf16):
                    logps, entropy, values = actor_critic_forward(actor, critic, value_head, mb.input_ids,
                                                                  mb.attention_mask, T, entropy_grad=cfg.entropy_coef > 0,
                                                                  temperature=cfg.temperature)
                    pg_loss, pg_stats = ppo_policy_loss(logps, mb.old_logps, mb.advantages, mb.mask, cfg.epsilon)
                    vf_loss = value_loss(values, mb.values, mb.returns, mb.mask, cfg.cliprange_value or None)
                    mean_entropy = masked_mean(entropy, mb.mask)
                    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * mean_entropy
                (loss * weight).backward()
                approx_kl += pg_stats["approx_kl"] * weight / distributed.world_size()
                step_loss = step_loss + loss.detach() * weight
                window.add({"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                            "entropy": mean_entropy.detach(), "clip_ratio": pg_stats["clip_ratio"],
                            "approx_kl": pg_stats["approx_kl"],
                            "explained_variance": explained_variance(values.detach(), mb.returns, mb.mask)})
            window.add({"loss": step_loss, "grad_norm": clip_and_step(params, optimizer, None, cfg.max_grad_norm)})
            # every rank stops together, on the KL of the whole mini-batch
            if cfg.target_kl and float(distributed.all_sum(torch.as_tensor(approx_kl))) > cfg.target_kl:
                window.add({"early_stop": 1.0})
                return


def main(cfg) -> None:
    # set-up: prompts, actor + reference, critic, reward sources, optimizer
    setup_run(cfg)
    tokenizer, actor, ref = load_policy_and_reference(cfg)
    rows = train_rows(cfg)
    prompts = prompt_examples(rows, tokenizer, cfg.max_prompt_length)
    check_required_fields(cfg.reward_funcs, prompts, [r.source for r in rows])
    rewards = RewardSources.from_config(cfg, tokenizer)
    critic, value_head = None, None
    if cfg.critic == "shared":
        value_head = distributed.wrap(ValueHead(actor.config.hidden_size).to(device()), cfg.fsdp, cfg.bf16)
    else:
        init = cfg.critic_model_name_or_path or cfg.reward_model_name_or_path or cfg.model_name_or_path
        critic = load_scalar_model(init, "critic_model_name_or_path", allow_pickle=cfg.allow_pickle, **load_options(cfg))
        if cfg.disable_dropout:
            disable_dropout(critic)
        critic = distributed.wrap(critic, cfg.fsdp, cfg.bf16)
    value_module = value_head if value_head is not None else critic
    actor_params = [p for _, p in trainable_parameters(actor)]
    optimizer = build_optimizer(trainable_parameters(actor), cfg.learning_rate, cfg.weight_decay)
    optimizer.add_param_group({"params": list(value_module.parameters()), "weight_decay": 0.0,
                               "lr": cfg.critic_learning_rate or cfg.learning_rate})
    params = actor_params + list(value_module.parameters())
    steps = rl_total_steps(cfg, len(prompts))
    scheduler = scheduler_for(cfg, optimizer, steps)

    probe = rl_evaluation(cfg, actor, tokenizer, rewards)  # held-out mean reward and greedy accuracy
    engine = build_engine(cfg, actor, tokenizer)

    def rl_step(indices, window, state, step):  # steps 1-5 of the module docstring, once per rollout batch
        batch = [prompts[i] for i in indices]
        rollout, stats = make_rollout(cfg, engine, actor, ref, critic, value_head, rewards, batch, state["kl_coef"], step)
        samples = stats.pop("samples", None)
        window.add(stats)
        ppo_epochs(cfg, actor, critic, value_head, rollout, optimizer, params, window)
        engine.load_weights(actor)
        if cfg.target_kl_coef:  # the controller sees the whole global batch's KL
            kl = float(distributed.all_mean(stats["kl"]))
            state["kl_coef"] = adaptive_kl_coef(state["kl_coef"], kl, cfg.target_kl_coef,
                                                len(batch) * distributed.world_size(), cfg.kl_horizon)
        return samples

    record = run_rl(cfg, "ppo", steps, len(prompts), {"actor": actor, "critic": value_module}, optimizer, scheduler,
                    rl_step, probe, state={"kl_coef": cfg.kl_coef})

    # save: the actor at output_dir, the critic at output_dir/critic/
    copies = {"actor": 1, "critic": 0 if value_head is not None else 1, "reference": int(ref is not None),
              "reward_model": len(rewards.models)}
    save_critic(cfg, critic, value_head, tokenizer)
    finish(cfg, actor, tokenizer, record, "PPO", {"model_copies": copies, "critic": cfg.critic})


def save_critic(cfg, critic, value_head, tokenizer) -> None:
    from pathlib import Path

    target = Path(cfg.output_dir) / "critic"
    if critic is not None:
        checkpoint.save_pretrained(critic, tokenizer, target)
    else:  # shared: the trunk is the actor's; only the head is the critic's own
        checkpoint.save_module_file(value_head, target / "value_head.safetensors")
