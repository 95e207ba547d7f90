"""Rows on disk -> token ids -> padded batches.

Formats (DESIGN.md §3), one JSON object per row, from .jsonl, .json or .parquet:

- SFT:        {"messages": [...]} or {"prompt": str|messages, "completion": str|messages}
- preference: {"prompt", "chosen", "rejected"}, or {"chosen": [user, assistant],
              "rejected": [user, assistant]} whose shared leading turns are the prompt
- prompts:    {"prompt": str|messages, ...extra fields passed to reward functions}

A bare string prompt is used as is (it may already carry a chat template); a
completion string gets the EOS token appended. Messages go through the
tokenizer's chat template, and loss / log-probs cover assistant turns only. A
template that rewrites earlier turns as the chat grows (Qwen3 drops the
``<think>`` blocks of earlier assistant turns) cannot be split turn by turn:
such conversations train on their final assistant turn only, with a warning.

Truncation policy: a prompt longer than ``max_prompt_length`` keeps its *last*
tokens (those next to the response); then the completion keeps its *first*
``max_length - len(prompt)`` tokens. If that leaves fewer than
``max_length // 4`` completion tokens, the prompt is cut further from the left
so every row still trains on a response. A preference pair is truncated once,
with that minimum computed from the longer of chosen and rejected, so both
sides condition on exactly the same prompt tokens; each response then keeps
its first ``max_length - len(prompt)`` tokens.

Every bad row raises UserError naming file:line and the problem.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from posttrain.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet")


# ---------------------------------------------------------------- reading rows


@dataclass
class Row:
    source: str  # "file:line" for error messages
    data: dict


def resolve_data_path(path: str, field: str = "dataset_name") -> Path:
    p = Path(path)
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.suffix in SUFFIXES)
        if len(found) != 1:
            raise UserError(f"{field}: folder {path!r} must hold exactly one .jsonl/.json/.parquet file, found {len(found)}")
        p = found[0]
    if not p.is_file():
        raise UserError(f"{field}: file {path!r} not found")
    if p.suffix not in SUFFIXES:
        raise UserError(f"{field}: {path!r} is not a .jsonl, .json or .parquet file")
    return p


def read_rows(path: str, field: str = "dataset_name") -> list[Row]:
    """Every row of a data file with its file:line (row number for .json/.parquet)."""
    p = resolve_data_path(path, field)
    rows: list[Row] = []
    if p.suffix == ".jsonl":
        with p.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{p}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
                rows.append(Row(f"{p}:{number}", obj))
    elif p.suffix == ".json":
        try:
            objs = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{p}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(objs, list):
            raise UserError(f"{p}:1: expected a JSON list of row objects")
        rows = [Row(f"{p}:row {i}", obj) for i, obj in enumerate(objs, 1)]
    else:
        from datasets import Dataset

        try:
            table = Dataset.from_parquet(str(p))
        except Exception as err:  # noqa: BLE001 - any reader failure is a bad file
            raise UserError(f"{p}: cannot read parquet ({type(err).__name__}: {err})") from None
        rows = [Row(f"{p}:row {i}", obj) for i, obj in enumerate(table, 1)]
    if not rows:
        raise UserError(f"{p}: no rows")
    for row in rows:
        if not isinstance(row.data, dict):
            raise UserError(f"{row.source}: expected a JSON object, got {type(row.data).__name__}")
    return rows


def _need(row: Row, key: str):
    if key not in row.data:
        raise UserError(f"{row.source}: missing field {key!r} (has: {', '.join(row.data) or 'nothing'})")
    return row.data[key]


def _check_text_or_messages(row: Row, key: str, value) -> None:
    if isinstance(value, str):
        if key != "prompt" and not value:
            raise UserError(f"{row.source}: field {key!r} is an empty string")
        return
    if not isinstance(value, list) or not value:
        raise UserError(f"{row.source}: field {key!r} must be a string or a non-empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise UserError(f"{row.source}: field {key!r} message {i} needs string 'role' and 'content'")


def _check_same_kind(row: Row, prompt, key: str, response) -> None:
    """A plain-text prompt is not templated, so its response cannot be chat messages.

    (A conversation prompt with a string response is fine: the string is the assistant turn.)
    """
    if isinstance(prompt, str) and not isinstance(response, str):
        raise UserError(f"{row.source}: 'prompt' is a string, so {key!r} must be a string too, not messages "
                        "(both can be lists of messages)")


# ----------------------------------------------------------------- tokenising


@dataclass
class Example:
    """One tokenised row: prompt ids, then response ids (the part that is trained or scored)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_weights: list[int] | None = None  # 1 where a token counts (multi-turn chat), else all 1


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's render of messages. Raises TemplateMismatch (callers name the row's
    file:line) when the tokenizer has no template or the template rejects the messages."""
    from jinja2 import TemplateError, TemplateSyntaxError

    if not getattr(tokenizer, "chat_template", None):
        raise TemplateMismatch("the tokenizer has no chat template, so rows with messages cannot be encoded; set "
                               "`chat_template_path` to a Jinja template file (or give plain-string prompts)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateSyntaxError as err:
        raise TemplateMismatch(f"the chat template is not valid Jinja (line {err.lineno}: {err.message})") from None
    except TemplateError as err:  # e.g. raise_exception() on roles the template does not accept
        raise TemplateMismatch(f"the chat template rejects these messages: {err}") from None


def encode_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return _ids(tokenizer, prompt)
    return _ids(tokenizer, _template(tokenizer, prompt, add_generation_prompt=True))


def encode_response(tokenizer, prompt, response) -> list[int]:
    """Tokens of the response as they follow the prompt (text + EOS, or the templated turn)."""
    if isinstance(prompt, str) and isinstance(response, str):
        return _ids(tokenizer, response) + [tokenizer.eos_token_id]
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    response_msgs = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    prefix = _template(tokenizer, prompt_msgs, add_generation_prompt=True)
    full = _template(tokenizer, prompt_msgs + response_msgs, add_generation_prompt=False)
    if not full.startswith(prefix):
        raise TemplateMismatch("the chat template does not extend the prompt when the response is added")
    return _ids(tokenizer, full[len(prefix):])


class TemplateMismatch(UserError):
    """The chat template's renders do not extend each other, so a row cannot be split into
    prompt and response. Raised without a row; callers re-raise it naming file:line."""


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[Example, bool]:
    """A multi-turn chat as (example, final_turn_only).

    Normally prompt = everything before the first assistant turn and the rest is the
    response, with weight 1 only on assistant turns. If the template rewrites earlier
    turns as the chat grows, that split would cut turns apart, so only the final
    assistant turn is trained (final_turn_only is True).
    """
    example = encode_turns(tokenizer, messages)
    if example is not None:
        return example, False
    return encode_final_turn(tokenizer, messages), True


def encode_turns(tokenizer, messages: list[dict]) -> Example | None:
    """Turn by turn, each weighted by whether it is an assistant turn; None when a render
    does not extend the previous one (the template rewrote an earlier turn)."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt_ids = encode_prompt(tokenizer, messages[:first])
    completion, weights = [], []
    done = _template(tokenizer, messages[:first], add_generation_prompt=True)
    for i in range(first, len(messages)):
        before = _template(tokenizer, messages[:i], add_generation_prompt=messages[i]["role"] == "assistant")
        after = _template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            return None
        segment = before[len(done):] + after[len(before):]
        ids = _ids(tokenizer, segment)
        head = len(_ids(tokenizer, before[len(done):]))  # the generation prompt itself is not trained
        completion += ids
        weights += [0] * head + [int(messages[i]["role"] == "assistant")] * (len(ids) - head)
        done = after
    return Example(prompt_ids, completion, weights)


def encode_final_turn(tokenizer, messages: list[dict]) -> Example:
    """Prompt = the chat up to the last assistant turn (with the generation prompt), response
    = that turn as the full render continues it, all trained. Turns after it train nothing,
    so they are left out. Raises TemplateMismatch if the full render does not extend the prompt."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _template(tokenizer, messages[:last], add_generation_prompt=True)
    full = _template(tokenizer, messages[: last + 1], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise TemplateMismatch("the chat template does not extend the conversation before the last assistant "
                               "turn when that turn is added, so the turn cannot be split off to train on")
    return Example(_ids(tokenizer, prompt), _ids(tokenizer, full[len(prompt):]))


def truncated_prompt(prompt_ids: list[int], longest_completion: int, max_length: int,
                     max_prompt_length: int) -> list[int]:
    """The prompt's last tokens under the module docstring's policy: at most max_prompt_length,
    and few enough to leave min(longest_completion, max(1, max_length // 4)) for the response."""
    prompt = prompt_ids[-max_prompt_length:] if max_prompt_length else prompt_ids
    min_completion = min(longest_completion, max(1, max_length // 4))
    if len(prompt) + min_completion > max_length:
        prompt = prompt[len(prompt) + min_completion - max_length:]
    return prompt


def truncate(example: Example, max_length: int, max_prompt_length: int) -> Example:
    """Apply the truncation policy of the module docstring."""
    prompt = truncated_prompt(example.prompt_ids, len(example.completion_ids), max_length, max_prompt_length)
    budget = max_length - len(prompt)
    weights = example.completion_weights[:budget] if example.completion_weights else None
    return Example(prompt, example.completion_ids[:budget], weights)


def truncate_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int,
                  max_prompt_length: int) -> tuple[Example, Example]:
    """Truncate a preference pair once, so chosen and rejected keep the same prompt tokens:
    the prompt's cut leaves room for the longer response, each response keeps its first tokens."""
    longest = max(len(chosen_ids), len(rejected_ids))
    prompt = truncated_prompt(prompt_ids, longest, max_length, max_prompt_length)
    budget = max_length - len(prompt)
    return Example(prompt, chosen_ids[:budget]), Example(prompt, rejected_ids[:budget])


def messages_example(row: Row, tokenizer) -> tuple[Example, bool]:
    """A {"messages": [...]} row checked and encoded: (example, final_turn_only)."""
    messages = row.data["messages"]
    if not isinstance(messages, list):
        raise UserError(f"{row.source}: field 'messages' must be a non-empty list of messages")
    _check_text_or_messages(row, "messages", messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{row.source}: field 'messages' has no assistant turn to train on")
    if messages[0]["role"] == "assistant":
        raise UserError(f"{row.source}: field 'messages' needs a turn before the first assistant turn")
    try:
        return encode_conversation(tokenizer, messages)
    except TemplateMismatch as err:
        raise UserError(f"{row.source}: {err}") from None


def sft_examples(rows: list[Row], tokenizer, max_length: int, max_prompt_length: int) -> list[Example]:
    out = []
    warned = False  # the final-turn fallback is announced once per dataset, not per row
    for row in rows:
        if "messages" in row.data:
            example, final_turn_only = messages_example(row, tokenizer)
            if final_turn_only and not warned:
                print(f"warning: {row.source}: the chat template rewrites earlier turns as the conversation grows "
                      "(e.g. drops their <think> blocks), so multi-turn rows of this dataset train only on "
                      "their final assistant turn", file=sys.stderr)
                warned = True
        elif "prompt" in row.data or "completion" in row.data:
            prompt, completion = _need(row, "prompt"), _need(row, "completion")
            _check_text_or_messages(row, "prompt", prompt)
            _check_text_or_messages(row, "completion", completion)
            _check_same_kind(row, prompt, "completion", completion)
            try:
                example = Example(encode_prompt(tokenizer, prompt), encode_response(tokenizer, prompt, completion))
            except TemplateMismatch as err:
                raise UserError(f"{row.source}: {err}") from None
        else:
            raise UserError(f"{row.source}: an SFT row needs 'messages' or 'prompt' and 'completion'")
        out.append(truncate(example, max_length, max_prompt_length))
    return out


@dataclass
class PreferenceExample:
    chosen: Example
    rejected: Example
    margin: float = 0.0


def split_shared_prefix(row: Row) -> tuple[list, list, list]:
    """Seed format: the leading turns both conversations share are the prompt."""
    chosen, rejected = row.data["chosen"], row.data["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise UserError(f"{row.source}: 'chosen' and 'rejected' share no leading turn and there is no 'prompt'")
    if n == len(chosen) or n == len(rejected):
        raise UserError(f"{row.source}: 'chosen' and 'rejected' are identical")
    return chosen[:n], chosen[n:], rejected[n:]


def preference_examples(rows: list[Row], tokenizer, max_length: int, max_prompt_length: int) -> list[PreferenceExample]:
    out = []
    for row in rows:
        chosen, rejected = _need(row, "chosen"), _need(row, "rejected")
        _check_text_or_messages(row, "chosen", chosen)
        _check_text_or_messages(row, "rejected", rejected)
        if "prompt" in row.data:
            prompt = row.data["prompt"]
            _check_text_or_messages(row, "prompt", prompt)
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = split_shared_prefix(row)
        else:
            raise UserError(f"{row.source}: missing field 'prompt' (needed when chosen/rejected are strings)")
        _check_same_kind(row, prompt, "chosen", chosen)
        _check_same_kind(row, prompt, "rejected", rejected)
        margin = row.data.get("margin")
        margin = 0.0 if margin is None else margin  # parquet reads an absent value as None
        if not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise UserError(f"{row.source}: field 'margin' must be a number, got {margin!r}")
        try:
            prompt_ids = encode_prompt(tokenizer, prompt)
            chosen_ids = encode_response(tokenizer, prompt, chosen)
            rejected_ids = encode_response(tokenizer, prompt, rejected)
        except TemplateMismatch as err:
            raise UserError(f"{row.source}: {err}") from None
        chosen_ex, rejected_ex = truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length)
        out.append(PreferenceExample(chosen_ex, rejected_ex, float(margin)))
    return out


@dataclass
class PromptExample:
    prompt_ids: list[int]
    prompt_text: str  # what reward functions see as the prompt
    extra: dict  # the row's other fields, passed to reward functions
    prompt: str | list[dict]  # the raw prompt (text or messages): reward models re-render from it


def prompt_examples(rows: list[Row], tokenizer, max_prompt_length: int) -> list[PromptExample]:
    out = []
    for row in rows:
        prompt = _need(row, "prompt")
        _check_text_or_messages(row, "prompt", prompt)
        if isinstance(prompt, str) and not prompt:
            raise UserError(f"{row.source}: field 'prompt' is an empty string")
        try:
            ids = encode_prompt(tokenizer, prompt)[-max_prompt_length:]
            text = prompt if isinstance(prompt, str) else _template(tokenizer, prompt, add_generation_prompt=True)
        except TemplateMismatch as err:
            raise UserError(f"{row.source}: {err}") from None
        out.append(PromptExample(ids, text, {k: v for k, v in row.data.items() if k != "prompt"}, prompt))
    return out


# ------------------------------------------------------------------- batching


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           shuffle: bool = True, drop_last: bool = False, group: bool = True) -> list[list[int]]:
    """Indices in batches of similar length, deterministic in (seed, epoch).

    Shuffle, cut into mega-batches of 50 batches, sort each by length, cut into
    batches, shuffle the batches: padding stays small and the order random
    (the "length-grouped" sampler of transformers). Determinism in (seed, epoch)
    is what lets a resumed run skip to its exact data position.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 100003 + epoch)
    if shuffle:
        rng.shuffle(order)
    mega = batch_size * 50 if group else batch_size
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i]) if shuffle else order[start:start + mega]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        rng.shuffle(batches)
    return batches


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + s if left else s + [value] * (width - len(s)) for s in seqs])


@dataclass
class TokenBatch:
    """Prompt + response sequences, right-padded."""

    input_ids: torch.Tensor  # (B, L) token ids
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens
    loss_mask: torch.Tensor  # (B, L-1) 1 where position t's prediction of token t+1 is a response token

    def to(self, device) -> TokenBatch:
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate_examples(examples: list[Example], pad_id: int, completion_only: bool = True) -> TokenBatch:
    """Right-padded batch. completion_only: loss on the (weighted) response tokens only;
    otherwise on every real token, every turn of a conversation included (as in TRL)."""
    seqs = [e.prompt_ids + e.completion_ids for e in examples]
    if completion_only:
        loss = [[0] * len(e.prompt_ids) + (e.completion_weights or [1] * len(e.completion_ids)) for e in examples]
    else:
        loss = [[1] * len(s) for s in seqs]
    input_ids = _pad(seqs, pad_id)
    attention_mask = _pad([[1] * len(s) for s in seqs], 0)
    loss_mask = _pad(loss, 0)[:, 1:]
    return TokenBatch(input_ids, attention_mask, loss_mask.float())


@dataclass
class PreferenceBatch:
    """Chosen rows then rejected rows, concatenated, for one forward pass: (2B, L)."""

    tokens: TokenBatch  # rows [0, B) chosen, [B, 2B) rejected
    margin: torch.Tensor  # (B,) per-pair margin (0 when absent)
    index: torch.Tensor  # (B,) dataset indices of the pairs (for precomputed reference log-probs)

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(self.tokens.to(device), self.margin.to(device), self.index.to(device))

    def __len__(self) -> int:
        return len(self.index)


def collate_preferences(pairs: list[PreferenceExample], indices: list[int], pad_id: int) -> PreferenceBatch:
    tokens = collate_examples([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return PreferenceBatch(tokens, torch.tensor([p.margin for p in pairs]), torch.tensor(indices))


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, the layout generation needs."""
    return _pad(seqs, pad_id, left=True), _pad([[1] * len(s) for s in seqs], 0, left=True)
