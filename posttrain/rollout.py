"""Batched sampling with the KV cache into typed containers.

Prompts are left-padded so every completion starts at the same column; the
sequence is then ``[prompt | completion]`` and the completion's log-probs come
from the last ``T`` logits only (``logits_to_keep``), never the prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from posttrain.data import left_pad


@dataclass
class Generation:
    """Prompts and their sampled completions, laid out for scoring."""

    input_ids: torch.Tensor  # (B, P+T) left-padded prompt, then completion, pad after EOS
    attention_mask: torch.Tensor  # (B, P+T) 1 on real prompt tokens and completion tokens up to EOS
    completion_mask: torch.Tensor  # (B, T) 1 on completion tokens up to and including EOS
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens
    completions: list[str]  # (B,) decoded completions, special tokens removed

    @property
    def completion_ids(self) -> torch.Tensor:  # (B, T)
        return self.input_ids[:, -self.completion_mask.shape[1]:]

    def to(self, device) -> Generation:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if torch.is_tensor(v):
                moved[k] = v.to(device)
        return Generation(**moved)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS (everything when there is none). (B, T), and truncated (B,)."""
    is_eos = completion_ids == eos_id
    after_first_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    truncated = ~is_eos.any(-1)
    return (~after_first_eos).long(), truncated


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             greedy: bool = False, num_return_sequences: int = 1, top_k: int = 0) -> Generation:
    """Sample completions for a batch of prompts in one `generate` call (KV cache on).

    With ``num_return_sequences = G`` the G completions of a prompt are
    consecutive rows, the layout `group_advantages` expects.
    """
    was_training = model.training
    model.eval()
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": 1.0}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, use_cache=True,
                         num_return_sequences=num_return_sequences, pad_token_id=pad_id, eos_token_id=eos_id,
                         **sampling)
    if was_training:
        model.train()
    completion_ids = out[:, ids.shape[1]:]
    if completion_ids.shape[1] == 0:  # every prompt already at the limit: one pad column keeps shapes valid
        completion_ids = torch.full((out.shape[0], 1), eos_id, device=out.device)
        out = torch.cat([out, completion_ids], 1)
    completion_mask, truncated = completion_mask_from_ids(completion_ids, eos_id)
    prompt_mask = mask.repeat_interleave(num_return_sequences, dim=0)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    texts = tokenizer.batch_decode(completion_ids * completion_mask + pad_id * (1 - completion_mask),
                                   skip_special_tokens=True)
    return Generation(out, attention_mask, completion_mask.float(), truncated, texts)


@dataclass
class Rollout:
    """One PPO rollout batch, with everything the epochs reuse cached at sampling time."""

    input_ids: torch.Tensor  # (B, P+T) prompt (left-padded) + completion
    attention_mask: torch.Tensor  # (B, P+T)
    mask: torch.Tensor  # (B, T) 1 on completion tokens up to and including EOS
    old_logps: torch.Tensor  # (B, T) log π_old(a_t|s_t), cached at rollout
    ref_logps: torch.Tensor  # (B, T) log π_ref(a_t|s_t)
    values: torch.Tensor  # (B, T) V_old(s_t), cached at rollout
    advantages: torch.Tensor  # (B, T) Â_t from GAE (whitened)
    returns: torch.Tensor  # (B, T) R_t = Â_t + V_old(s_t) (before whitening)
    scores: torch.Tensor  # (B,) sequence reward from the reward sources

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


@dataclass
class GroupRollout:
    """One GRPO rollout batch: N prompts x G completions, groups in consecutive rows."""

    input_ids: torch.Tensor  # (N·G, P+T) prompt (left-padded) + completion
    attention_mask: torch.Tensor  # (N·G, P+T)
    mask: torch.Tensor  # (N·G, T) completion tokens that count (truncated ones zeroed when masked)
    advantages: torch.Tensor  # (N·G,) Â_i = group-relative reward, shared by the tokens of completion i
    old_logps: torch.Tensor | None  # (N·G, T) log π_old, cached when num_iterations > 1
    ref_logps: torch.Tensor | None  # (N·G, T) log π_ref, cached when beta > 0

    def select(self, index: torch.Tensor) -> GroupRollout:
        pick = {f.name: getattr(self, f.name) for f in fields(self)}
        return GroupRollout(**{k: v[index] if v is not None else None for k, v in pick.items()})
