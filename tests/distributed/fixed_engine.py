"""A rollout engine that returns fixed completions per prompt: sampling taken out of a comparison.

``rollout_engine: fixed_engine:fixed_completions`` (this folder on sys.path or
PYTHONPATH). Completion g of a prompt is a digit string whose length and
value depend only on the prompt's ids and g: rows of unequal length, some
without EOS (truncated), and the same on any number of ranks.
"""

from __future__ import annotations

import torch

from posttrain.data import left_pad
from posttrain.rollout import generation_from_ids


class FixedEngine:
    def __init__(self, tokenizer, max_new_tokens: int):
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens

    def completion(self, prompt: list[int], g: int) -> list[int]:
        key = sum((i + 1) * t for i, t in enumerate(prompt)) + 31 * g
        length = 1 + key % self.max_new_tokens
        digits = self.tokenizer(str(key % 997).rjust(3, "1"), add_special_tokens=False)["input_ids"]
        body = (digits * self.max_new_tokens)[:length]
        return body + [self.tokenizer.eos_token_id] if length < self.max_new_tokens else body  # the longest: no EOS

    def generate(self, prompt_ids: list[list[int]], num_return_sequences: int = 1):
        ids, mask = left_pad(prompt_ids, self.tokenizer.pad_token_id)
        rows = [self.completion(p, g) for p in prompt_ids for g in range(num_return_sequences)]
        width = max(len(r) for r in rows)
        completions = torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return generation_from_ids(ids, mask, completions, self.tokenizer, num_return_sequences)

    def load_weights(self, model) -> None:
        """Fixed completions do not depend on the weights."""


def fixed_completions(cfg, model, tokenizer):
    return FixedEngine(tokenizer, cfg.max_completion_length)


def length_reward(prompts, completions, **_):
    """A reward that differs within every group: the completion's length (and a digit-sum bonus)."""
    return [len(c) / 4 + sum(int(ch) for ch in c if ch.isdigit()) / 50 for c in completions]
