"""REINFORCE Leave-One-Out (RLOO): the grpo recipe with TRL RLOOTrainer's defaults and semantics.

    posttrain rloo --model_name_or_path runs/sft --dataset_name data/arith/prompts.jsonl

Ahmadian et al., arXiv 2402.14740 ("Back to Basics"). config.RLOOConfig sets
what differs from posttrain grpo, as TRL's RLOOTrainer does it: G = 2
completions per prompt; the k1 KL to the reference, summed over each
completion, subtracted from its reward (beta 0.05); advantages r_i minus the
mean of the other G-1 rewards (rloo_advantages), unscaled unless
normalize_advantages; and the clipped ratio of whole completions,
exp(Σ_t log-ratio), averaged over completions (rloo_sequence_loss). The loop
itself is recipes/grpo.py's.
"""

from posttrain.recipes.grpo import main

__all__ = ["main"]
