"""Contrastive Preference Optimization (CPO) and SimPO: the dpo recipe with a reference-free loss.

    posttrain cpo --model_name_or_path runs/sft --dataset_name data/arith/preference.jsonl
    posttrain cpo --model_name_or_path runs/sft --dataset_name data/arith/preference.jsonl --loss_type simpo --cpo_alpha 0

Xu et al., arXiv 2401.08417 (CPO); Meng et al., arXiv 2405.14734 (SimPO, as
TRL's CPOTrainer serves it: loss_type simpo). config.CPOConfig holds TRL
CPOConfig's fields and defaults; the loss is losses.cpo_loss plus cpo_alpha
times the chosen responses' NLL (recipes/dpo.py's cpo_step). No reference model
is loaded. The loop itself is recipes/dpo.py's.
"""

from posttrain.recipes.dpo import main

__all__ = ["main"]
