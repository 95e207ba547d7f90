"""posttrain.data and the tiny tokenizer: every row format of DESIGN.md §3 read from real files,
bad rows, truncation, collation, batching.

The embedded tokenizer has one token per character, so expectations are written as text and
compared through ``decode``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from posttrain import data as D
from posttrain.errors import UserError
from posttrain.models import load_tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@pytest.fixture(scope="module")
def tok(tiny_qwen):
    return load_tokenizer(str(tiny_qwen))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows) -> Path:
    """Rows may be objects (dumped) or raw strings (written verbatim as a line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def loss_segments(tok, batch: D.TokenBatch, row: int) -> list[str]:
    """Decoded runs of consecutive tokens that the loss mask selects (token t+1 for mask[:, t])."""
    mask = batch.loss_mask[row].tolist()
    targets = batch.input_ids[row, 1:].tolist()
    runs, current = [], []
    for m, token in zip(mask, targets):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def sft(tok, rows, tmp_path, name="sft.jsonl", max_length=512, max_prompt_length=256):
    return D.sft_examples(D.read_rows(str(write_jsonl(tmp_path / name, rows))), tok, max_length, max_prompt_length)


def prefs(tok, rows, tmp_path, name="pref.jsonl", max_length=512, max_prompt_length=256):
    return D.preference_examples(D.read_rows(str(write_jsonl(tmp_path / name, rows))), tok, max_length,
                                 max_prompt_length)


def prompts(tok, rows, tmp_path, name="prompts.jsonl", max_prompt_length=256):
    return D.prompt_examples(D.read_rows(str(write_jsonl(tmp_path / name, rows))), tok, max_prompt_length)


def chatml(*turns, generation_prompt=False) -> str:
    text = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns)
    return text + (f"{IM_START}assistant\n" if generation_prompt else "")


# ===================================================================== tokenizer


def test_tokenizer_one_token_per_digit(tok):
    assert len(ids(tok, "123")) == 3
    for d in "0123456789":
        assert len(ids(tok, d)) == 1
    assert ids(tok, "123") == ids(tok, "1") + ids(tok, "2") + ids(tok, "3")
    assert len(ids(tok, "57+68=")) == 6
    assert len(set(ids(tok, "0123456789"))) == 10


@pytest.mark.parametrize("text", ["57+68=125", "a b  c", "line one\nline two\n\n  indented\tx", " lead and trail ",
                                  "what is 12 + 34?\n"])
def test_tokenizer_round_trips_text(tok, text):
    assert tok.decode(ids(tok, text)) == text


def test_tokenizer_chat_template_is_chatml(tok):
    messages = [{"role": "user", "content": "57+68="}]
    assert (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == "<|im_start|>user\n57+68=<|im_end|>\n<|im_start|>assistant\n")
    full = messages + [{"role": "assistant", "content": "125"}]
    assert (tok.apply_chat_template(full, tokenize=False)
            == "<|im_start|>user\n57+68=<|im_end|>\n<|im_start|>assistant\n125<|im_end|>\n")


def test_tokenizer_special_tokens(tok):
    assert tok.pad_token is not None and tok.eos_token is not None
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == IM_END  # the end of an assistant turn ends generation
    # special tokens are single tokens, also inside text
    assert ids(tok, IM_START + "user")[0] == tok.convert_tokens_to_ids(IM_START)
    assert ids(tok, "7" + IM_END) == ids(tok, "7") + [tok.eos_token_id]


def test_auto_tokenizer_matches_load_tokenizer(tiny_qwen, tok):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tiny_qwen)
    text = "<|im_start|>user\n57+68=<|im_end|>\n"
    assert auto(text, add_special_tokens=False)["input_ids"] == ids(tok, text)
    assert auto.pad_token_id == tok.pad_token_id and auto.eos_token_id == tok.eos_token_id


def test_load_tokenizer_tiny_llama(tiny_llama, tok):
    llama_tok = load_tokenizer(str(tiny_llama))
    assert llama_tok.pad_token_id is not None and llama_tok.eos_token_id is not None
    assert llama_tok("123", add_special_tokens=False)["input_ids"] == ids(tok, "123")
    messages = [{"role": "user", "content": "1+2="}]
    assert (llama_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == chatml(("user", "1+2="), generation_prompt=True))


def test_load_tokenizer_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(UserError, match="model_name_or_path"):
        load_tokenizer(str(tmp_path))


# ===================================================================== SFT formats


def test_sft_messages_multi_turn_trains_only_assistant_turns(tok, tmp_path):
    messages = [
        {"role": "system", "content": "sys text"},
        {"role": "user", "content": "12+34="},
        {"role": "assistant", "content": "46"},
        {"role": "user", "content": "and 57+68?"},
        {"role": "assistant", "content": "125\nok"},
    ]
    [ex] = sft(tok, [{"messages": messages}], tmp_path)
    # prompt: everything before the first assistant turn, with the generation prompt
    assert tok.decode(ex.prompt_ids) == chatml(("system", "sys text"), ("user", "12+34="), generation_prompt=True)
    # prompt + response is exactly the templated conversation
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.prompt_ids + ex.completion_ids) == full
    assert len(ex.completion_weights) == len(ex.completion_ids)

    batch = D.collate_examples([ex], tok.pad_token_id)
    segments = loss_segments(tok, batch, 0)
    # exactly the two assistant contents, each followed by the end-of-turn token (the template's
    # newline after <|im_end|> may ride along); nothing of the user / system turns nor the
    # "<|im_start|>assistant\n" header is trained
    assert [s.removesuffix("\n") for s in segments] == ["46" + IM_END, "125\nok" + IM_END]
    trained = "".join(segments)
    assert "and 57+68?" not in trained and "user" not in trained and IM_START not in trained


def test_sft_prompt_completion_strings(tok, tmp_path):
    [ex] = sft(tok, [{"prompt": "12+34=", "completion": "46"}], tmp_path)
    assert ex.prompt_ids == ids(tok, "12+34=")  # a string prompt is used as is
    assert ex.completion_ids == ids(tok, "46") + [tok.eos_token_id]  # EOS appended
    batch = D.collate_examples([ex], tok.pad_token_id)
    assert loss_segments(tok, batch, 0) == ["46" + IM_END]
    # the loss mask covers exactly the completion tokens
    assert batch.loss_mask.sum().item() == len(ex.completion_ids)


def test_sft_conversational_prompt_completion(tok, tmp_path):
    row = {"prompt": [{"role": "user", "content": "12+34="}], "completion": [{"role": "assistant", "content": "46"}]}
    [ex] = sft(tok, [row], tmp_path)
    assert tok.decode(ex.prompt_ids) == chatml(("user", "12+34="), generation_prompt=True)
    assert tok.decode(ex.completion_ids).removesuffix("\n") == "46" + IM_END
    batch = D.collate_examples([ex], tok.pad_token_id)
    assert [s.removesuffix("\n") for s in loss_segments(tok, batch, 0)] == ["46" + IM_END]


def test_sft_messages_prompt_with_string_completion(tok, tmp_path):
    row = {"prompt": [{"role": "user", "content": "1+2="}], "completion": "3"}
    [ex] = sft(tok, [row], tmp_path)
    assert tok.decode(ex.prompt_ids) == chatml(("user", "1+2="), generation_prompt=True)
    assert tok.decode(ex.completion_ids).removesuffix("\n") == "3" + IM_END


def test_sft_completion_only_false_trains_prompt_too(tok, tmp_path):
    [ex] = sft(tok, [{"prompt": "12+34=", "completion": "46"}], tmp_path)
    batch = D.collate_examples([ex], tok.pad_token_id, completion_only=False)
    assert loss_segments(tok, batch, 0) == ["2+34=46" + IM_END]  # every token after the first


# Qwen3-like: an assistant turn that is not the last message loses its <think>...</think> block
THINK_DROPPING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' and not loop.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Qwen3 with thinking off: the generation prompt opens an empty think block the turns never render
EMPTY_THINK_PROMPT_TEMPLATE = THINK_DROPPING_TEMPLATE.replace(
    "'<|im_start|>assistant\\n' -}}{%- endif", "'<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}{%- endif")
THINKING_CHAT = [
    {"role": "user", "content": "12+34="},
    {"role": "assistant", "content": "<think>\nadd\n</think>\n\n46"},
    {"role": "user", "content": "and 57+68?"},
    {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n125"},
]


def templated_tok(tiny_qwen, template: str):
    """A fresh copy of the tiny tokenizer with another chat template."""
    copy = load_tokenizer(str(tiny_qwen))
    copy.chat_template = template
    return copy


def test_sft_template_that_drops_earlier_think_blocks_trains_the_final_turn(tiny_qwen, tmp_path, capsys):
    tok = templated_tok(tiny_qwen, THINK_DROPPING_TEMPLATE)
    full = tok.apply_chat_template(THINKING_CHAT, tokenize=False)
    assert "<think>\nadd\n</think>" not in full  # the template really rewrites the earlier turn
    rows = [{"messages": THINKING_CHAT}, {"messages": THINKING_CHAT[:2] + [{"role": "user", "content": "1+2="},
                                                                          {"role": "assistant", "content": "3"}]}]
    first, second = sft(tok, rows, tmp_path)
    assert first.prompt_ids + first.completion_ids == ids(tok, full)
    batch = D.collate_examples([first, second], tok.pad_token_id)
    assert "".join(loss_segments(tok, batch, 0)).removesuffix("\n") == THINKING_CHAT[3]["content"] + IM_END
    assert "".join(loss_segments(tok, batch, 1)).removesuffix("\n") == "3" + IM_END
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "sft.jsonl:1" in warnings[0] and "final assistant turn" in warnings[0]


def test_sft_chatml_multi_turn_is_split_turn_by_turn_without_warning(tok, tmp_path, capsys):
    [ex] = sft(tok, [{"messages": THINKING_CHAT}], tmp_path)
    assert tok.decode(ex.prompt_ids) == chatml(("user", "12+34="), generation_prompt=True)
    batch = D.collate_examples([ex], tok.pad_token_id)
    assert [s.removesuffix("\n") for s in loss_segments(tok, batch, 0)] == [
        THINKING_CHAT[1]["content"] + IM_END, THINKING_CHAT[3]["content"] + IM_END]
    assert "warning" not in capsys.readouterr().err


def test_sft_template_that_cannot_split_off_the_final_turn_names_the_row(tiny_qwen, tmp_path):
    tok = templated_tok(tiny_qwen, EMPTY_THINK_PROMPT_TEMPLATE)
    fits = [USER, {"role": "assistant", "content": "<think>\n\n</think>\n\n3"}]  # renders as the prompt opens it
    path = write_jsonl(tmp_path / "file.jsonl", [{"messages": fits}, {"messages": THINKING_CHAT}])
    with pytest.raises(UserError, match=r"file\.jsonl:2: .*chat template") as info:
        _load("sft", path, tok)
    assert "\n" not in str(info.value)


def test_completion_only_false_trains_every_turn_of_a_conversation(tok, tmp_path):
    messages = [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "46"},
                {"role": "user", "content": "and 57+68?"}, {"role": "assistant", "content": "125"}]
    examples = sft(tok, [{"messages": messages}, {"messages": [USER, {"role": "assistant", "content": "3"}]}], tmp_path)
    every = D.collate_examples(examples, tok.pad_token_id, completion_only=False)
    assert every.loss_mask.tolist() == every.attention_mask[:, 1:].float().tolist()  # every real token after the first
    full = tok.apply_chat_template(messages, tokenize=False)
    assert "".join(loss_segments(tok, every, 0)) == full.removeprefix(IM_START)  # both user turns too
    only = D.collate_examples(examples, tok.pad_token_id, completion_only=True)
    assert [s.removesuffix("\n") for s in loss_segments(tok, only, 0)] == ["46" + IM_END, "125" + IM_END]


# ===================================================================== preference formats


def test_preference_explicit_string_prompt(tok, tmp_path):
    rows = [{"prompt": "57+68=", "chosen": "125", "rejected": "115"},
            {"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": 1.5}]
    first, second = prefs(tok, rows, tmp_path)
    assert first.chosen.prompt_ids == first.rejected.prompt_ids == ids(tok, "57+68=")
    assert first.chosen.completion_ids == ids(tok, "125") + [tok.eos_token_id]
    assert first.rejected.completion_ids == ids(tok, "115") + [tok.eos_token_id]
    assert first.margin == 0.0
    assert second.margin == 1.5


def test_preference_explicit_messages_prompt(tok, tmp_path):
    row = {"prompt": [{"role": "user", "content": "57+68="}],
           "chosen": [{"role": "assistant", "content": "125"}],
           "rejected": [{"role": "assistant", "content": "115"}]}
    [pair] = prefs(tok, [row], tmp_path)
    assert tok.decode(pair.chosen.prompt_ids) == chatml(("user", "57+68="), generation_prompt=True)
    assert pair.rejected.prompt_ids == pair.chosen.prompt_ids
    assert tok.decode(pair.chosen.completion_ids).removesuffix("\n") == "125" + IM_END
    assert tok.decode(pair.rejected.completion_ids).removesuffix("\n") == "115" + IM_END


def test_preference_messages_prompt_string_responses(tok, tmp_path):
    row = {"prompt": [{"role": "user", "content": "57+68="}], "chosen": "125", "rejected": "115"}
    [pair] = prefs(tok, [row], tmp_path)
    assert tok.decode(pair.chosen.prompt_ids) == chatml(("user", "57+68="), generation_prompt=True)
    assert tok.decode(pair.chosen.completion_ids).removesuffix("\n") == "125" + IM_END


def test_preference_seed_format_shared_leading_turns_are_the_prompt(tok, tmp_path):
    user = {"role": "user", "content": "57+68="}
    row = {"chosen": [user, {"role": "assistant", "content": "125"}],
           "rejected": [user, {"role": "assistant", "content": "115"}]}
    [pair] = prefs(tok, [row], tmp_path)
    assert tok.decode(pair.chosen.prompt_ids) == chatml(("user", "57+68="), generation_prompt=True)
    assert pair.rejected.prompt_ids == pair.chosen.prompt_ids
    assert tok.decode(pair.chosen.completion_ids).removesuffix("\n") == "125" + IM_END
    assert tok.decode(pair.rejected.completion_ids).removesuffix("\n") == "115" + IM_END


def test_preference_seed_format_multi_turn_prefix(tok, tmp_path):
    shared = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"},
              {"role": "user", "content": "57+68="}]
    row = {"chosen": shared + [{"role": "assistant", "content": "125"}],
           "rejected": shared + [{"role": "assistant", "content": "115"}]}
    [pair] = prefs(tok, [row], tmp_path)
    assert tok.decode(pair.chosen.prompt_ids) == chatml(("user", "1+2="), ("assistant", "3"), ("user", "57+68="),
                                                        generation_prompt=True)
    assert tok.decode(pair.rejected.completion_ids).removesuffix("\n") == "115" + IM_END


def test_collate_preferences_chosen_rows_then_rejected(tok, tmp_path):
    rows = [{"prompt": "57+68=", "chosen": "125", "rejected": "115", "margin": 2},
            {"prompt": "1+2=", "chosen": "3", "rejected": "40"}]
    pairs = prefs(tok, rows, tmp_path)
    batch = D.collate_preferences(pairs, [7, 3], tok.pad_token_id)
    assert batch.tokens.input_ids.shape[0] == 4
    texts = [tok.decode(r, skip_special_tokens=False).replace(tok.pad_token, "")
             for r in batch.tokens.input_ids.tolist()]
    assert texts == ["57+68=125" + IM_END, "1+2=3" + IM_END, "57+68=115" + IM_END, "1+2=40" + IM_END]
    assert batch.margin.tolist() == [2.0, 0.0]
    assert batch.index.tolist() == [7, 3]
    assert [loss_segments(tok, batch.tokens, i) for i in range(4)] == [
        ["125" + IM_END], ["3" + IM_END], ["115" + IM_END], ["40" + IM_END]]


# ===================================================================== prompt formats


def test_prompt_rows_keep_extra_fields(tok, tmp_path):
    rows = [{"prompt": "57+68=", "answer": "125", "level": 2}, {"prompt": "1+2=", "answer": "3"}]
    first, second = prompts(tok, rows, tmp_path)
    assert first.prompt_ids == ids(tok, "57+68=")
    assert first.prompt_text == "57+68="
    assert first.extra == {"answer": "125", "level": 2}
    assert second.extra == {"answer": "3"}


def test_prompt_messages_are_templated(tok, tmp_path):
    [ex] = prompts(tok, [{"prompt": [{"role": "user", "content": "1+2="}], "answer": "3"}], tmp_path)
    expected = chatml(("user", "1+2="), generation_prompt=True)
    assert ex.prompt_text == expected
    assert tok.decode(ex.prompt_ids) == expected
    assert ex.extra == {"answer": "3"}


def test_prompt_string_with_chatml_template_used_verbatim(tok, tmp_path):
    text = "<|im_start|>user\n57+68=<|im_end|>\n<|im_start|>assistant\n"
    [ex] = prompts(tok, [{"prompt": text, "answer": "125"}], tmp_path)
    assert ex.prompt_text == text
    assert ex.prompt_ids == ids(tok, text)
    assert tok.decode(ex.prompt_ids) == text  # not wrapped in a second template
    assert ex.prompt_ids.count(tok.convert_tokens_to_ids(IM_START)) == 2
    # the same in a preference row: the response follows the templated prompt directly
    [pair] = prefs(tok, [{"prompt": text, "chosen": "125", "rejected": "115"}], tmp_path)
    assert tok.decode(pair.chosen.prompt_ids + pair.chosen.completion_ids) == text + "125" + IM_END


# ===================================================================== file types


ROWS = [{"prompt": "12+34=", "completion": "46"}, {"prompt": "57+68=", "completion": "125"}]


def _write(path: Path, rows) -> Path:
    if path.suffix == ".jsonl":
        write_jsonl(path, rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_file_types_load_the_same_examples(tok, tmp_path, suffix):
    path = _write(tmp_path / f"train{suffix}", ROWS)
    rows = D.read_rows(str(path))
    assert [r.data for r in rows] == ROWS
    assert all("train" + suffix in r.source for r in rows)
    examples = D.sft_examples(rows, tok, 64, 32)
    assert [tok.decode(e.prompt_ids + e.completion_ids) for e in examples] == [
        "12+34=46" + IM_END, "57+68=125" + IM_END]


def test_parquet_with_messages(tok, tmp_path):
    user = {"role": "user", "content": "57+68="}
    rows = [{"chosen": [user, {"role": "assistant", "content": "125"}],
             "rejected": [user, {"role": "assistant", "content": "115"}]}]
    path = _write(tmp_path / "pref.parquet", rows)
    [pair] = D.preference_examples(D.read_rows(str(path)), tok, 64, 32)
    assert tok.decode(pair.chosen.prompt_ids) == chatml(("user", "57+68="), generation_prompt=True)
    assert tok.decode(pair.rejected.completion_ids).removesuffix("\n") == "115" + IM_END


def test_parquet_optional_margin_column(tok, tmp_path):
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": 1.0},
            {"prompt": "1+3=", "chosen": "4", "rejected": "5"}]  # parquet stores margin=null here
    path = _write(tmp_path / "pref.parquet", rows)
    pairs = D.preference_examples(D.read_rows(str(path)), tok, 64, 32)
    assert [p.margin for p in pairs] == [1.0, 0.0]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_folder_with_one_file_loads(tmp_path, suffix):
    folder = tmp_path / "ds"
    folder.mkdir()
    _write(folder / f"data{suffix}", ROWS)
    (folder / "README.md").write_text("not data")  # other files are ignored
    assert [r.data for r in D.read_rows(str(folder))] == ROWS


def test_folder_with_two_or_no_data_files_is_an_error(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    with pytest.raises(UserError, match="exactly one"):
        D.read_rows(str(folder))
    _write(folder / "a.jsonl", ROWS)
    _write(folder / "b.json", ROWS)
    with pytest.raises(UserError, match="exactly one"):
        D.read_rows(str(folder))


def test_jsonl_skips_blank_lines_but_keeps_physical_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n")
    rows = D.read_rows(str(path))
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:4"]


# ===================================================================== bad rows

GOOD = {
    "sft": {"prompt": "1+2=", "completion": "3"},
    "pref": {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
    "prompts": {"prompt": "1+2=", "answer": "3"},
}
USER = {"role": "user", "content": "1+2="}
GOOD_MESSAGES = {"messages": [USER, {"role": "assistant", "content": "3"}]}  # SFT rows of one format per file


def good_neighbour(kind: str, row) -> dict:
    """A good row of the same format as `row` (an SFT file may not mix messages and prompt/completion rows)."""
    return GOOD_MESSAGES if kind == "sft" and isinstance(row, dict) and "messages" in row else GOOD[kind]


def bad(name, kind, row, words, marks=()):
    """A bad line for a loader ("sft", "pref", "prompts") and the words its error must contain."""
    return pytest.param(kind, row, words, id=name, marks=marks)


BAD_ROWS = [
    # (id, loader, bad line, words the message must contain)
    bad("invalid-json", "sft", '{"prompt": "1+2=", "completion": ', ["invalid JSON"]),
    bad("missing-completion", "sft", {"prompt": "1+2="}, ["missing field", "'completion'"]),
    bad("missing-prompt", "prompts", {"answer": "3"}, ["missing field", "'prompt'"]),
    bad("missing-rejected", "pref", {"prompt": "1+2=", "chosen": "3"}, ["missing field", "'rejected'"]),
    bad("neither-sft-format", "sft", {"body": "hello"}, ["messages", "prompt", "completion", "'text'"]),
    bad("completion-is-number", "sft", {"prompt": "1+2=", "completion": 3}, ["'completion'", "string"]),
    bad("chosen-is-number", "pref", {"prompt": "1+2=", "chosen": 3, "rejected": "4"}, ["'chosen'", "string"]),
    bad("prompt-is-dict", "prompts", {"prompt": {"text": "1+2="}}, ["'prompt'", "string"]),
    bad("messages-is-string", "sft", {"messages": "hello"}, ["'messages'"]),
    bad("mixed-prompt-kinds", "sft", {"prompt": "1+2=", "completion": [{"role": "assistant", "content": "3"}]},
        ["'prompt'", "'completion'", "messages"]),
    bad("empty-messages", "sft", {"messages": []}, ["'messages'"]),
    bad("empty-completion", "sft", {"prompt": "1+2=", "completion": ""}, ["'completion'", "empty"]),
    bad("empty-rejected", "pref", {"prompt": "1+2=", "chosen": "3", "rejected": ""}, ["'rejected'", "empty"]),
    bad("empty-prompt", "prompts", {"prompt": "", "answer": "3"}, ["'prompt'", "empty"]),
    bad("message-without-role", "sft", {"messages": [USER, {"content": "3"}]}, ["message 1", "role"]),
    bad("message-without-content", "sft", {"messages": [USER, {"role": "assistant"}]}, ["message 1", "content"]),
    bad("message-not-object", "pref", {"prompt": [USER], "chosen": ["3"], "rejected": "4"}, ["'chosen'", "message 0"]),
    bad("no-assistant-turn", "sft", {"messages": [USER]}, ["assistant"]),
    bad("row-is-list", "sft", "[1, 2]", ["JSON object", "list"]),
    bad("row-is-string", "prompts", '"1+2="', ["JSON object", "str"]),
    bad("seed-identical", "pref", {"chosen": [USER, {"role": "assistant", "content": "3"}],
                                   "rejected": [USER, {"role": "assistant", "content": "3"}]}, ["identical"]),
    bad("seed-no-shared-prefix", "pref", {"chosen": [USER, {"role": "assistant", "content": "3"}],
                                          "rejected": [{"role": "user", "content": "2+2="},
                                                       {"role": "assistant", "content": "4"}]}, ["share no"]),
    bad("strings-without-prompt", "pref", {"chosen": "3", "rejected": "4"}, ["'prompt'"]),
    bad("margin-not-number", "pref", {"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": "high"},
        ["'margin'", "number"]),
    bad("margin-bool", "pref", {"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": True}, ["'margin'"]),
]


def _load(kind: str, path: Path, tok):
    rows = D.read_rows(str(path))
    if kind == "sft":
        return D.sft_examples(rows, tok, 64, 32)
    if kind == "pref":
        return D.preference_examples(rows, tok, 64, 32)
    return D.prompt_examples(rows, tok, 32)


@pytest.mark.parametrize("kind,row,words", BAD_ROWS)
def test_bad_row_names_file_line_and_problem(tok, tmp_path, kind, row, words):
    good = good_neighbour(kind, row)
    path = write_jsonl(tmp_path / "file.jsonl", [good, good, row, good])
    with pytest.raises(UserError) as info:
        _load(kind, path, tok)
    message = str(info.value)
    assert "file.jsonl:3" in message
    assert "\n" not in message  # one line
    for word in words:
        assert word in message


def test_messages_starting_with_assistant_is_a_user_error(tok, tmp_path):
    # DESIGN §3: a row that does not fit is an error naming file:line, never a crash deep inside
    row = {"messages": [{"role": "assistant", "content": "3"}]}
    path = write_jsonl(tmp_path / "file.jsonl", [GOOD_MESSAGES, GOOD_MESSAGES, row])
    with pytest.raises(UserError, match="file.jsonl:3.*before the first assistant"):
        _load("sft", path, tok)


def test_good_rows_of_the_bad_row_fixtures_load(tok, tmp_path):
    # the rows around each bad one are fine: the error above comes from line 3 alone
    for kind, row in GOOD.items():
        assert len(_load(kind, write_jsonl(tmp_path / f"{kind}.jsonl", [row, row]), tok)) == 2


def test_bad_row_in_json_list_names_the_row(tok, tmp_path):
    path = tmp_path / "file.json"
    path.write_text(json.dumps([GOOD["sft"], {"prompt": "1+2=", "completion": 5}]))
    with pytest.raises(UserError, match=r"file\.json:row 2: .*'completion'"):
        _load("sft", path, tok)


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "file.json"
    path.write_text(json.dumps(GOOD["sft"]))
    with pytest.raises(UserError, match=r"file\.json.*list"):
        D.read_rows(str(path))


def test_invalid_json_file_names_line(tmp_path):
    path = tmp_path / "file.json"
    path.write_text('[\n  {"prompt": "1+2=", "completion": "3"},\n  {"prompt": oops}\n]\n')
    with pytest.raises(UserError, match=r"file\.json:3: invalid JSON"):
        D.read_rows(str(path))


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("empty.json", "[]")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match="no rows") as info:
        D.read_rows(str(path))
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["data.tsv", "data.txt", "data"])
def test_unknown_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text(json.dumps(GOOD["sft"]) + "\n")
    with pytest.raises(UserError, match=r"\.jsonl, \.jsonl\.gz, \.json, \.parquet or \.csv") as info:
        D.read_rows(str(path))
    assert name in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found") as info:
        D.read_rows(str(tmp_path / "nope.jsonl"), field="eval_dataset_name")
    assert "nope.jsonl" in str(info.value) and "eval_dataset_name" in str(info.value)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not a parquet file")
    with pytest.raises(UserError, match=r"bad\.parquet"):
        D.read_rows(str(path))


# ===================================================================== truncation


PROMPT = "0123456789" * 5 + "="  # 51 tokens
COMPLETION = "9876543210"  # 10 tokens + EOS


def test_truncation_keeps_last_prompt_tokens_and_first_completion_tokens(tok, tmp_path):
    [ex] = sft(tok, [{"prompt": PROMPT, "completion": COMPLETION}], tmp_path, max_length=12, max_prompt_length=8)
    assert tok.decode(ex.prompt_ids) == PROMPT[-8:]  # the tokens next to the response
    assert tok.decode(ex.completion_ids) == COMPLETION[:4]  # 12 - 8
    assert len(ex.prompt_ids) + len(ex.completion_ids) == 12


def test_truncation_without_a_cut(tok, tmp_path):
    [ex] = sft(tok, [{"prompt": "1+2=", "completion": "3"}], tmp_path, max_length=12, max_prompt_length=8)
    assert tok.decode(ex.prompt_ids + ex.completion_ids) == "1+2=3" + IM_END


def test_truncation_keeps_a_quarter_for_the_completion(tok, tmp_path):
    # prompt cut to 15 by max_prompt_length, but 15 + 4 > 16: the prompt gives way (from the left)
    [ex] = sft(tok, [{"prompt": PROMPT, "completion": COMPLETION}], tmp_path, max_length=16, max_prompt_length=15)
    assert tok.decode(ex.prompt_ids) == PROMPT[-12:]
    assert tok.decode(ex.completion_ids) == COMPLETION[:4]


@pytest.mark.parametrize("max_length,max_prompt_length", [(4, 2), (8, 8), (10, 3), (16, 30), (40, 20), (100, 60),
                                                          (200, 100)])
def test_truncation_invariants(tok, tmp_path, max_length, max_prompt_length):
    rows = [{"prompt": PROMPT, "completion": COMPLETION}, {"prompt": "1+2=", "completion": "3" * 30},
            {"prompt": "12+34=", "completion": "46"}]
    for row, ex in zip(rows, sft(tok, rows, tmp_path, max_length=max_length, max_prompt_length=max_prompt_length)):
        prompt, completion = row["prompt"], row["completion"]
        full_completion = ids(tok, completion) + [tok.eos_token_id]
        assert len(ex.prompt_ids) + len(ex.completion_ids) <= max_length
        assert len(ex.prompt_ids) <= max_prompt_length
        assert len(ex.completion_ids) >= 1
        assert ex.prompt_ids == ids(tok, prompt)[len(ids(tok, prompt)) - len(ex.prompt_ids):]  # a suffix
        assert ex.completion_ids == full_completion[:len(ex.completion_ids)]  # a prefix


def test_truncation_of_preference_pairs(tok, tmp_path):
    row = {"prompt": PROMPT, "chosen": COMPLETION, "rejected": "55"}
    [pair] = prefs(tok, [row], tmp_path, max_length=12, max_prompt_length=8)
    assert tok.decode(pair.chosen.prompt_ids) == tok.decode(pair.rejected.prompt_ids) == PROMPT[-8:]
    assert tok.decode(pair.chosen.completion_ids) == COMPLETION[:4]
    assert tok.decode(pair.rejected.completion_ids) == "55" + IM_END


@pytest.mark.parametrize("max_length,max_prompt_length", [(4, 2), (8, 8), (12, 8), (16, 15), (16, 30), (40, 20),
                                                          (60, 60), (200, 100)])
def test_truncation_gives_chosen_and_rejected_the_same_prompt(tok, tmp_path, max_length, max_prompt_length):
    user = [{"role": "user", "content": PROMPT}]
    rows = [{"prompt": PROMPT, "chosen": COMPLETION, "rejected": "55"},
            {"prompt": PROMPT, "chosen": "5", "rejected": COMPLETION * 3},
            {"prompt": "1+2=", "chosen": "3" * 40, "rejected": "3"},
            {"prompt": user, "chosen": [{"role": "assistant", "content": COMPLETION * 2}],
             "rejected": [{"role": "assistant", "content": "4"}]}]
    pairs = prefs(tok, rows, tmp_path, max_length=max_length, max_prompt_length=max_prompt_length)
    for row, pair in zip(rows, pairs):
        assert pair.chosen.prompt_ids == pair.rejected.prompt_ids
        full_prompt = D.encode_prompt(tok, row["prompt"])
        assert pair.chosen.prompt_ids == full_prompt[len(full_prompt) - len(pair.chosen.prompt_ids):]  # a suffix
        assert len(pair.chosen.prompt_ids) <= max_prompt_length
        budget = max_length - len(pair.chosen.prompt_ids)
        for side, key in ((pair.chosen, "chosen"), (pair.rejected, "rejected")):
            assert len(side.prompt_ids) + len(side.completion_ids) <= max_length
            assert side.completion_ids == D.encode_response(tok, row["prompt"], row[key])[:budget]
            assert len(side.completion_ids) >= 1


def test_truncation_of_prompt_rows_keeps_last_tokens(tok, tmp_path):
    [ex] = prompts(tok, [{"prompt": PROMPT, "answer": "x"}], tmp_path, max_prompt_length=5)
    assert tok.decode(ex.prompt_ids) == PROMPT[-5:]


def test_truncation_cuts_multi_turn_weights_with_the_tokens(tok, tmp_path):
    messages = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"},
                {"role": "user", "content": "4+5="}, {"role": "assistant", "content": "9" * 40}]
    [ex] = sft(tok, [{"messages": messages}], tmp_path, max_length=40, max_prompt_length=30)
    assert len(ex.prompt_ids) + len(ex.completion_ids) <= 40
    assert len(ex.completion_weights) == len(ex.completion_ids)
    assert ex.completion_weights[0] == 1  # the first assistant turn starts the response


# ===================================================================== collation


def test_collate_examples_right_pads_and_shifts_the_loss_mask():
    a = D.Example([11, 12, 13], [21, 22])
    b = D.Example([31], [41, 42, 43], completion_weights=[1, 0, 1])
    batch = D.collate_examples([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[11, 12, 13, 21, 22], [31, 41, 42, 43, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # loss_mask[:, t] == 1 iff token t+1 is a (weighted) response token
    assert batch.loss_mask.shape == (2, 4)
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1], [1, 0, 1, 0]]
    assert batch.loss_mask.dtype == torch.float32


def test_collate_examples_pad_id_and_completion_only_false():
    a = D.Example([11, 12], [21])
    b = D.Example([31], [41, 42, 43, 44])
    batch = D.collate_examples([a, b], pad_id=7, completion_only=False)
    assert batch.input_ids.tolist() == [[11, 12, 21, 7, 7], [31, 41, 42, 43, 44]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.loss_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]  # never on padding


def test_token_batch_to_keeps_every_field():
    batch = D.collate_examples([D.Example([1], [2])], pad_id=0).to("cpu")
    assert batch.input_ids.tolist() == [[1, 2]] and batch.loss_mask.tolist() == [[1.0]]


def test_left_pad():
    input_ids, attention_mask = D.left_pad([[1, 2, 3], [4], [5, 6]], pad_id=9)
    assert input_ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 5, 6]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


# ===================================================================== batching


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 200) for _ in range(n)]


def _flat(batches):
    return [i for b in batches for i in b]


def test_length_grouped_batches_deterministic_in_seed_and_epoch():
    lengths = _lengths(1000)
    first = D.length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert first == D.length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert first != D.length_grouped_batches(lengths, 8, seed=1, epoch=1)
    assert first != D.length_grouped_batches(lengths, 8, seed=2, epoch=0)
    assert D.length_grouped_batches(lengths, 8, seed=1, epoch=1) == D.length_grouped_batches(lengths, 8, seed=1,
                                                                                               epoch=1)


@pytest.mark.parametrize("n", [1, 7, 8, 401, 1003])
@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_length_grouped_batches_cover_every_index_once(n, group, shuffle):
    batches = D.length_grouped_batches(_lengths(n), 8, seed=0, epoch=3, shuffle=shuffle, group=group)
    assert sorted(_flat(batches)) == list(range(n))
    assert all(1 <= len(b) <= 8 for b in batches)
    assert sum(len(b) < 8 for b in batches) <= 1


def test_length_grouped_batches_drop_last():
    batches = D.length_grouped_batches(_lengths(1003), 8, seed=0, epoch=0, drop_last=True)
    assert len(batches) == 1003 // 8
    assert all(len(b) == 8 for b in batches)
    assert len(set(_flat(batches))) == 1000


def test_length_grouped_batches_without_shuffle_is_in_order():
    batches = D.length_grouped_batches(_lengths(20), 8, seed=5, epoch=2, shuffle=False)
    assert batches == [list(range(8)), list(range(8, 16)), list(range(16, 20))]


def test_length_grouped_batches_group_keeps_lengths_uniform():
    lengths = _lengths(2000)

    def mean_spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    grouped = D.length_grouped_batches(lengths, 8, seed=0, epoch=0, group=True)
    plain = D.length_grouped_batches(lengths, 8, seed=0, epoch=0, group=False)
    # mega-batches of 400 from lengths in [1, 200]: neighbours in sorted order differ by ~4
    assert mean_spread(grouped) < 10
    assert mean_spread(plain) > 100
    # and the batch order is still random, not sorted by length
    firsts = [lengths[b[0]] for b in grouped]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
