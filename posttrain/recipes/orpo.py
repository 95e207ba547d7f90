"""Odds Ratio Preference Optimization (ORPO): the dpo recipe with ORPO's reference-free loss.

    posttrain orpo --model_name_or_path runs/sft --dataset_name data/arith/preference.jsonl

Hong et al., arXiv 2403.07691 (Eq. 6-7): the chosen responses' NLL plus
λ·(-log σ(log odds ratio)) on mean token log-probs, λ = beta (TRL ORPOConfig's
0.1). The odds-ratio term is losses.orpo_loss (recipes/dpo.py's orpo_step). No
reference model is loaded. The loop itself is recipes/dpo.py's.
"""

from posttrain.recipes.dpo import main

__all__ = ["main"]
