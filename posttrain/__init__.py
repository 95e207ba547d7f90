"""posttrain: post-training for causal language models (SFT, RM, DPO, PPO, GRPO).

The public API is the pure tensor functions of `posttrain.losses`, re-exported
here; importing the package imports torch and nothing heavier.
"""

from posttrain.losses import (
    aggregate_loss,
    dpo_loss,
    gae,
    group_advantages,
    kl_penalty,
    ppo_policy_loss,
    reward_model_loss,
    selective_log_softmax,
    value_loss,
    whiten,
)

__version__ = "0.1.0"

__all__ = [
    "aggregate_loss",
    "dpo_loss",
    "gae",
    "group_advantages",
    "kl_penalty",
    "ppo_policy_loss",
    "reward_model_loss",
    "selective_log_softmax",
    "value_loss",
    "whiten",
    "__version__",
]
