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

Every bad input raises UserError naming file:line (``file:row N`` in .json and
.parquet files) and the field: bytes that are not UTF-8, invalid or too deeply
nested JSON, lone UTF-16 surrogates (``"\\ud800"``: json accepts them, no
tokenizer encodes them), a .json file that is not a list, rows that are not
objects, missing fields and fields of the wrong type, texts that are empty or
only whitespace (a string ``prompt`` may be empty, meaning no prompt, but not
only whitespace), messages with a role other than system, user, assistant or
tool or with blank content (an assistant turn carrying ``tool_calls`` may have
empty content), margins that are not finite numbers, and an SFT file that
mixes ``messages`` rows with prompt/completion rows (the first row of the
other format is named; in parquet a null column counts as absent). Values nested
nearly as deep as json allows are an error too. A UTF-8 byte-order mark
at the start of a file is dropped. No row is ever skipped.

Warnings (one line each on stderr, once per file, after the file is loaded):
the number of prompts longer than ``max_prompt_length`` (they keep their last
tokens), and the number of preference pairs whose chosen == rejected (the same
string or the same messages): they are kept but carry no preference signal
(their loss does not depend on the weights, so has no gradient). A conversation pair
(no ``prompt``) with identical conversations stays an error, as there is no
differing turn to split its prompt off at.
"""

from __future__ import annotations

import codecs
import json
import math
import random
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from posttrain import distributed
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


def _decode(p: Path) -> str:
    """The file's text: UTF-8, a leading byte-order mark dropped; bad bytes name their line."""
    data = p.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[:err.start].decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        raise UserError(f"{p}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None


def _lines(text: str):
    """The lines of a text split at \n, \r\n or \r, as open() reads them (not at the other breaks
    str.splitlines knows, such as U+2028, which JSON strings may hold raw)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


def _parse_json(p: Path, text: str, number: int = 0):
    """json.loads with errors as UserError at file:line (number: the line of a .jsonl row; 0 for a whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = number or err.lineno
        where = f" at column {err.colno}" if number else ""
        hint = "; is it JSON Lines? then name it .jsonl" if not number and err.msg == "Extra data" else ""
        raise UserError(f"{p}:{line}: invalid JSON ({err.msg}{where}{hint})") from None
    except RecursionError:
        raise UserError(f"{p}:{number or 1}: invalid JSON (nested too deeply)") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a (possibly lone) UTF-16 surrogate enters JSON text


def _holds_surrogate(value) -> bool:
    """Whether a JSON value holds, at any depth, a string UTF-8 cannot encode (a lone surrogate).
    Iterative: rows may nest deeply."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack += [x for kv in item.items() for x in kv]
        elif isinstance(item, list):
            stack += item
    return False


def _check_surrogates(row: Row) -> None:
    """json accepts a lone surrogate ("\\ud800"), but no tokenizer can encode it: an error naming
    the top-level field that holds one."""
    if not isinstance(row.data, dict):
        return  # reported as "expected a JSON object"
    for key, value in row.data.items():
        if _holds_surrogate(key) or _holds_surrogate(value):
            raise UserError(f"{row.source}: field {key!r} holds a lone UTF-16 surrogate (an unpaired "
                            "\\ud800-\\udfff escape), which no tokenizer can encode")


def read_rows(path: str, field: str = "dataset_name") -> list[Row]:
    """Every row of a data file with its file:line (row number for .json/.parquet).

    Bad bytes, invalid or too deeply nested JSON, lone surrogates, a .json file that is not a
    list and rows that are not objects are UserErrors naming file:line; a leading UTF-8
    byte-order mark is dropped.
    """
    p = resolve_data_path(path, field)
    rows: list[Row] = []
    if p.suffix == ".jsonl":
        text = _decode(p)
        for number, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            obj = _parse_json(p, line, number)
            rows.append(Row(f"{p}:{number}", obj))
            if _SURROGATE_ESCAPE.search(line):
                _check_surrogates(rows[-1])
    elif p.suffix == ".json":
        text = _decode(p)
        objs = _parse_json(p, text)
        if not isinstance(objs, list):
            raise UserError(f"{p}:1: expected a JSON list of row objects, got {_json_type(objs)}")
        rows = [Row(f"{p}:row {i}", obj) for i, obj in enumerate(objs, 1)]
        if _SURROGATE_ESCAPE.search(text):
            for row in rows:
                _check_surrogates(row)
    else:
        from datasets import Dataset

        try:
            table = Dataset.from_parquet(str(p))
            rows = [Row(f"{p}:row {i}", obj) for i, obj in enumerate(table, 1)]
        except Exception as err:  # noqa: BLE001 - any reader failure is a bad file
            raise UserError(f"{p}: cannot read parquet ({type(err).__name__}: {_one_line(str(err))})") from None
    if not rows:
        raise UserError(f"{p}: no rows (the file is empty or holds only blank lines)")
    for row in rows:
        if not isinstance(row.data, dict):
            raise UserError(f"{row.source}: expected a JSON object, got {_json_type(row.data)}")
    return rows


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _describe(value) -> str:
    """A short one-line account of a JSON value for an error message (nested values by type only:
    their repr may be huge, or too deep to build)."""
    return _json_type(value) if isinstance(value, (list, dict)) else _one_line(repr(value), 60)


def _one_line(text: str, limit: int = 300) -> str:
    """Text for a one-line error message: whitespace runs collapsed, long text cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _need(row: Row, key: str):
    if key not in row.data:
        names = [repr(k) for k in row.data]
        has = ", ".join(names[:12]) + (f", ... ({len(names)} fields)" if len(names) > 12 else "")
        raise UserError(f"{row.source}: missing field {key!r} (has: {has or 'nothing'})")
    return row.data[key]


ROLES = ("system", "user", "assistant", "tool")


def _check_text_or_messages(row: Row, key: str, value) -> None:
    """A text field is a non-blank string, or a non-empty list of messages with a known role and
    non-blank string content. A string ``prompt`` may be empty (no prompt), not only whitespace."""
    if isinstance(value, str):
        if not value.strip() and not (key == "prompt" and not value):
            raise UserError(f"{row.source}: field {key!r} is {'an empty string' if not value else 'only whitespace'}")
        return
    if not isinstance(value, list) or not value:
        raise UserError(f"{row.source}: field {key!r} must be a string or a non-empty list of messages, "
                        f"got {'an empty list' if isinstance(value, list) else _json_type(value)}")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise UserError(f"{row.source}: field {key!r} message {i} needs string 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise UserError(f"{row.source}: field {key!r} message {i} has unknown role {_describe(msg['role'])} "
                            "(expected system, user, assistant or tool)")
        if not msg["content"].strip() and not (msg["role"] == "assistant" and msg.get("tool_calls")):
            raise UserError(f"{row.source}: field {key!r} message {i} ({msg['role']}) has "
                            f"{'empty' if not msg['content'] else 'only whitespace'} content")


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
        raise TemplateMismatch(f"the chat template rejects these messages: {_one_line(str(err))}") from None
    except (TypeError, ValueError, KeyError, IndexError) as err:  # the template's own code failed on these messages
        raise TemplateMismatch(f"the chat template failed on these messages ({type(err).__name__}: "
                               f"{_one_line(str(err))})") from None


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
                  max_prompt_length: int, max_completion_length: int = 0) -> tuple[Example, Example]:
    """Truncate a preference pair once, so chosen and rejected keep the same prompt tokens:
    the prompt's cut leaves room for the longer response, each response keeps its first tokens
    (at most ``max_completion_length`` of them when it is > 0)."""
    if max_completion_length:
        chosen_ids, rejected_ids = chosen_ids[:max_completion_length], rejected_ids[:max_completion_length]
    longest = max(len(chosen_ids), len(rejected_ids))
    prompt = truncated_prompt(prompt_ids, longest, max_length, max_prompt_length)
    budget = max_length - len(prompt)
    return Example(prompt, chosen_ids[:budget]), Example(prompt, rejected_ids[:budget])


def messages_example(row: Row, tokenizer) -> tuple[Example, bool]:
    """A {"messages": [...]} row checked and encoded: (example, final_turn_only)."""
    messages = row.data["messages"]
    if not isinstance(messages, list):
        raise UserError(f"{row.source}: field 'messages' must be a non-empty list of messages, got {_json_type(messages)}")
    _check_text_or_messages(row, "messages", messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{row.source}: field 'messages' has no assistant turn to train on")
    if messages[0]["role"] == "assistant":
        raise UserError(f"{row.source}: field 'messages' needs a turn before the first assistant turn")
    try:
        return encode_conversation(tokenizer, messages)
    except TemplateMismatch as err:
        raise UserError(f"{row.source}: {err}") from None


def _file_of(source: str) -> str:
    """The file part of a Row.source ("file:line" or "file:row N")."""
    return source.rsplit(":", 1)[0]


def _warn(message: str) -> None:
    """One line on stderr, from rank 0 only (every rank loads the same data)."""
    if distributed.is_main():
        print(f"posttrain: warning: {message}", file=sys.stderr)


def _warn_long_prompts(rows: list[Row], prompt_lengths: list[int], max_prompt_length: int) -> None:
    """One counted warning per file for the prompts that max_prompt_length cuts (0: no limit)."""
    if not max_prompt_length:
        return
    totals: dict[str, list[int]] = {}
    for row, n in zip(rows, prompt_lengths):
        counts = totals.setdefault(_file_of(row.source), [0, 0])
        counts[0] += n > max_prompt_length
        counts[1] += 1
    for file, (long, total) in totals.items():
        if long:
            _warn(f"{long} of {total} prompts in {file} are longer than max_prompt_length={max_prompt_length} "
                  f"tokens and keep their last {max_prompt_length}")


def _sft_format(row: Row) -> str | None:
    """'messages' or 'prompt/completion' (None: neither). A None value counts as absent where the
    other format's fields are there: a parquet file has every column in every row."""
    data = row.data
    if data.get("messages") is not None or ("messages" in data and "prompt" not in data and "completion" not in data):
        return "messages"
    if "prompt" in data or "completion" in data:
        return "prompt/completion"
    return None


def sft_examples(rows: list[Row], tokenizer, max_length: int, max_prompt_length: int) -> list[Example]:
    out, prompt_lengths = [], []
    warned = False  # the final-turn fallback is announced once per dataset, not per row
    first: Row | None = None  # the first row, whose format every row must share
    try:  # values nested nearly as deep as json allows overflow the stack when compared
        for row in rows:
            kind = _sft_format(row)
            if kind is None:
                raise UserError(f"{row.source}: an SFT row needs 'messages' or 'prompt' and 'completion'")
            if first is None:
                first = row
            elif kind != _sft_format(first):
                raise UserError(f"{row.source}: mixed row formats: this row has {kind!r} fields but the first row "
                                f"({first.source}) has {_sft_format(first)!r}; use one format per SFT dataset")
            if kind == "messages":
                example, final_turn_only = messages_example(row, tokenizer)
                if final_turn_only and not warned:
                    _warn(f"{row.source}: the chat template rewrites earlier turns as the conversation grows "
                          "(e.g. drops their <think> blocks), so multi-turn rows of this dataset train only on "
                          "their final assistant turn")
                    warned = True
            else:
                prompt, completion = _need(row, "prompt"), _need(row, "completion")
                _check_text_or_messages(row, "prompt", prompt)
                _check_text_or_messages(row, "completion", completion)
                _check_same_kind(row, prompt, "completion", completion)
                try:
                    example = Example(encode_prompt(tokenizer, prompt), encode_response(tokenizer, prompt, completion))
                except TemplateMismatch as err:
                    raise UserError(f"{row.source}: {err}") from None
            prompt_lengths.append(len(example.prompt_ids))
            out.append(truncate(example, max_length, max_prompt_length))
    except RecursionError:
        raise UserError(f"{row.source}: a field is nested too deeply to process") from None
    _warn_long_prompts(rows, prompt_lengths, max_prompt_length)
    return out


@dataclass
class PreferenceExample:
    chosen: Example
    rejected: Example
    margin: float = 0.0


def split_shared_prefix(row: Row) -> tuple[list, list, list]:
    """Conversations without a `prompt`: the leading turns both share are the prompt."""
    chosen, rejected = row.data["chosen"], row.data["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise UserError(f"{row.source}: 'chosen' and 'rejected' share no leading turn and there is no 'prompt'")
    if n == len(chosen) and n == len(rejected):
        raise UserError(f"{row.source}: 'chosen' and 'rejected' are identical, so no differing turn splits off "
                        "the prompt (and the pair carries no preference signal)")
    if n == len(chosen) or n == len(rejected):
        short, other = ("chosen", "rejected") if n == len(chosen) else ("rejected", "chosen")
        raise UserError(f"{row.source}: {short!r} is the start of {other!r}, with no turn of its own after "
                        "the shared leading turns")
    return chosen[:n], chosen[n:], rejected[n:]


def _margin(row: Row) -> float:
    margin = row.data.get("margin")
    if margin is None:  # parquet reads an absent value as None
        return 0.0
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise UserError(f"{row.source}: field 'margin' must be a number, got {_describe(margin)}")
    try:
        value = float(margin)
    except OverflowError:  # an integer beyond float range
        value = math.inf
    if not math.isfinite(value):
        raise UserError(f"{row.source}: field 'margin' must be a finite number, got {_describe(margin)}")
    return value


def preference_examples(rows: list[Row], tokenizer, max_length: int, max_prompt_length: int,
                        max_completion_length: int = 0) -> list[PreferenceExample]:
    out, prompt_lengths = [], []
    identical: dict[str, int] = {}  # file -> pairs whose chosen == rejected
    try:  # values nested nearly as deep as json allows overflow the stack when compared
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
            margin = _margin(row)
            if chosen == rejected:
                identical[_file_of(row.source)] = identical.get(_file_of(row.source), 0) + 1
            try:
                prompt_ids = encode_prompt(tokenizer, prompt)
                chosen_ids = encode_response(tokenizer, prompt, chosen)
                rejected_ids = encode_response(tokenizer, prompt, rejected)
            except TemplateMismatch as err:
                raise UserError(f"{row.source}: {err}") from None
            chosen_ex, rejected_ex = truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length,
                                                   max_completion_length)
            prompt_lengths.append(len(prompt_ids))
            out.append(PreferenceExample(chosen_ex, rejected_ex, margin))
    except RecursionError:
        raise UserError(f"{row.source}: a field is nested too deeply to process") from None
    _warn_long_prompts(rows, prompt_lengths, max_prompt_length)
    for file, count in identical.items():
        _warn(f"{count} pair{'s' if count > 1 else ''} in {file} {'have' if count > 1 else 'has'} chosen == rejected; "
              f"{'they carry' if count > 1 else 'it carries'} no preference signal")
    return out


@dataclass
class PromptExample:
    prompt_ids: list[int]
    prompt_text: str  # what reward functions see as the prompt
    extra: dict  # the row's other fields, passed to reward functions
    prompt: str | list[dict]  # the raw prompt (text or messages): reward models re-render from it


def prompt_examples(rows: list[Row], tokenizer, max_prompt_length: int) -> list[PromptExample]:
    out, prompt_lengths = [], []
    try:  # values nested nearly as deep as json allows overflow the stack when compared
        for row in rows:
            prompt = _need(row, "prompt")
            _check_text_or_messages(row, "prompt", prompt)
            if isinstance(prompt, str) and not prompt:
                raise UserError(f"{row.source}: field 'prompt' is an empty string")
            try:
                ids = encode_prompt(tokenizer, prompt)
                prompt_lengths.append(len(ids))
                ids = ids[-max_prompt_length:] if max_prompt_length else ids
                text = prompt if isinstance(prompt, str) else _template(tokenizer, prompt, add_generation_prompt=True)
            except TemplateMismatch as err:
                raise UserError(f"{row.source}: {err}") from None
            out.append(PromptExample(ids, text, {k: v for k, v in row.data.items() if k != "prompt"}, prompt))
    except RecursionError:
        raise UserError(f"{row.source}: a field is nested too deeply to process") from None
    _warn_long_prompts(rows, prompt_lengths, max_prompt_length)
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
