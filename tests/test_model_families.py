"""Every stage on real model families: Qwen2 (tied and untied embeddings), Llama-3 and Mistral.

Each family is a random tiny model folder with its own tokenizer, special tokens and chat
template (conftest.py::model_families): ChatML for Qwen2, header turns ended by <|eot_id|>
for Llama-3, ``<s>[INST] user [/INST]answer</s>`` for Mistral; Llama-3 and Mistral ship no
pad token. The tests check the assistant-only loss mask of each template, run every recipe
for two optimizer steps on each family, and check the error for a tokenizer without a chat
template given conversational data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain import cli
from posttrain import data as D
from posttrain.errors import UserError
from posttrain.models import apply_chat_template_file, load_tokenizer
from tests.recipes.reward_helpers import read_jsonl, run_recipe

FAMILY_NAMES = ("qwen2_tied", "qwen2_untied", "llama3", "mistral")
STAGES = ("sft", "rm", "dpo", "ppo", "grpo")

# what follows an assistant turn's content in each template: the end-of-turn token (the EOS that
# ends generation), and for ChatML the template's newline after it
TURN_END = {"qwen2_tied": "<|im_end|>\n", "qwen2_untied": "<|im_end|>\n", "llama3": "<|eot_id|>", "mistral": "</s>"}
EOS = {"qwen2_tied": "<|im_end|>", "qwen2_untied": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}

CHAT = [
    {"role": "user", "content": "12+34="},
    {"role": "assistant", "content": "46"},
    {"role": "user", "content": "and 57+68?"},
    {"role": "assistant", "content": "125 ok"},
]

CHATML_FILE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def trained_segments(tokenizer, batch, row: int = 0) -> list[list[int]]:
    """Runs of consecutive target tokens under the loss mask of one row (position t scores token t+1)."""
    targets, mask = batch.input_ids[row, 1:].tolist(), batch.loss_mask[row].tolist()
    segments, current = [], []
    for token, weight in zip(targets, mask):
        if weight:
            current.append(token)
        elif current:
            segments.append(current)
            current = []
    return segments + ([current] if current else [])


# ===================================================================== the folders themselves


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_folder_loads_with_its_own_template(model_families, family):
    from transformers import AutoConfig

    tok = load_tokenizer(str(model_families[family]))
    config = AutoConfig.from_pretrained(model_families[family])
    assert tok.eos_token == EOS[family] and tok.eos_token_id == config.eos_token_id
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    if family.startswith("qwen2"):
        assert config.model_type == "qwen2" and config.tie_word_embeddings == (family == "qwen2_tied")
        assert tok.pad_token == "<|endoftext|>" and config.pad_token_id == tok.pad_token_id
    else:
        assert config.model_type == ("llama" if family == "llama3" else "mistral")
        assert config.pad_token_id is None  # shipped without a pad: load_tokenizer picked a spare special token
        assert tok.pad_token == {"llama3": "<|begin_of_text|>", "mistral": "<unk>"}[family]
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: every render round-trips
    assert tok(text)["input_ids"].count(tok.eos_token_id) == text.count(EOS[family]) >= 2  # one token each


def test_family_templates_render_as_the_real_ones(model_families):
    render = {f: load_tokenizer(str(model_families[f])).apply_chat_template(CHAT[:2], tokenize=False)
              for f in FAMILY_NAMES}
    assert render["qwen2_tied"] == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                    "<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n46<|im_end|>\n")
    assert render["llama3"] == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n12+34=<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\n46<|eot_id|>")
    assert render["mistral"] == "<s>[INST] 12+34= [/INST]46</s>"


# ===================================================================== assistant-only loss masks


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sft_loss_mask_covers_exactly_the_assistant_turns(model_families, family):
    tok = load_tokenizer(str(model_families[family]))
    [example] = D.sft_examples([D.Row("chat.jsonl:1", {"messages": CHAT})], tok, max_length=512, max_prompt_length=256)
    assert tok.decode(example.prompt_ids + example.completion_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    batch = D.collate_examples([example], tok.pad_token_id)
    segments = trained_segments(tok, batch)
    assert [tok.decode(s) for s in segments] == ["46" + TURN_END[family], "125 ok" + TURN_END[family]]
    # the end of each turn is the single EOS token, which is what generation stops at
    assert [s.count(tok.eos_token_id) for s in segments] == [1, 1]
    assert batch.loss_mask.sum().item() == sum(map(len, segments))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_preference_responses_are_the_assistant_turn(model_families, family):
    tok = load_tokenizer(str(model_families[family]))
    row = {"prompt": [user("12+34=")], "chosen": [assistant("46")], "rejected": [assistant("47")]}
    [pair] = D.preference_examples([D.Row("pref.jsonl:1", row)], tok, max_length=512, max_prompt_length=256)
    assert tok.decode(pair.chosen.prompt_ids) == tok.apply_chat_template([user("12+34=")], tokenize=False,
                                                                          add_generation_prompt=True)
    assert tok.decode(pair.chosen.completion_ids) == "46" + TURN_END[family]
    assert tok.decode(pair.rejected.completion_ids) == "47" + TURN_END[family]


def test_mistral_template_rejecting_roles_names_the_row(model_families):
    tok = load_tokenizer(str(model_families["mistral"]))
    messages = [{"role": "system", "content": "be brief"}, *CHAT]
    with pytest.raises(UserError, match=r"^chat\.jsonl:3: the chat template rejects these messages: .*alternate"):
        D.sft_examples([D.Row("chat.jsonl:3", {"messages": messages})], tok, max_length=512, max_prompt_length=256)


@pytest.mark.parametrize("row", [
    {"messages": CHAT},
    {"prompt": [user("1+2=")], "completion": [assistant("3")]},
], ids=["messages", "prompt_completion"])
def test_no_chat_template_error_names_the_row(no_template_model, row):
    tok = load_tokenizer(str(no_template_model))
    with pytest.raises(UserError, match=r"^sft\.jsonl:7: the tokenizer has no chat template.*chat_template_path"):
        D.sft_examples([D.Row("sft.jsonl:7", row)], tok, max_length=64, max_prompt_length=32)


def test_no_chat_template_error_names_the_row_for_preferences_and_prompts(no_template_model):
    tok = load_tokenizer(str(no_template_model))
    pref = D.Row("pref.jsonl:2", {"prompt": [user("1+2=")], "chosen": "3", "rejected": "4"})
    with pytest.raises(UserError, match=r"^pref\.jsonl:2: the tokenizer has no chat template"):
        D.preference_examples([pref], tok, max_length=64, max_prompt_length=32)
    with pytest.raises(UserError, match=r"^prompts\.jsonl:5: the tokenizer has no chat template"):
        D.prompt_examples([D.Row("prompts.jsonl:5", {"prompt": [user("1+2=")]})], tok, max_prompt_length=32)
    # plain-string rows need no template
    assert D.prompt_examples([D.Row("prompts.jsonl:1", {"prompt": "1+2="})], tok, max_prompt_length=32)


def test_apply_chat_template_file(tmp_path, no_template_model):
    tok = load_tokenizer(str(no_template_model))
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML_FILE_TEMPLATE, encoding="utf-8")
    apply_chat_template_file(tok, str(path))
    assert tok.apply_chat_template([user("1+2=")], tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(UserError, match=r"^chat_template_path: .*missing\.jinja"):
        apply_chat_template_file(tok, str(tmp_path / "missing.jinja"))
    (tmp_path / "bad.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(UserError, match=r"^chat_template_path: .*bad\.jinja"):
        apply_chat_template_file(tok, str(tmp_path / "bad.jinja"))


# ===================================================================== every stage on every family


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, arith_data) -> dict[str, Path]:
    """Conversational SFT (2-turn chats) and preference (message-list) files from the arith task."""
    out = tmp_path_factory.mktemp("chat_data")
    sft_rows = read_jsonl(arith_data["sft"])[:16]
    chats = [{"messages": [user(a["prompt"]), assistant(a["completion"]), user(b["prompt"]), assistant(b["completion"])]}
             for a, b in zip(sft_rows[::2], sft_rows[1::2])]
    pairs = [{"prompt": [user(r["prompt"])], "chosen": [assistant(r["chosen"])], "rejected": [assistant(r["rejected"])]}
             for r in read_jsonl(arith_data["preference"])[:8]]
    return {"sft": write_jsonl(out / "chat_sft.jsonl", chats), "preference": write_jsonl(out / "chat_pref.jsonl", pairs)}


def stage_fields(stage: str, model: Path, chat_data, arith_data) -> dict:
    fields = {"model_name_or_path": model, "max_steps": 2, "logging_steps": 1, "max_length": 64,
              "max_prompt_length": 48, "learning_rate": 1e-3}
    if stage == "sft":
        fields.update(dataset_name=chat_data["sft"], per_device_train_batch_size=2)
    elif stage in ("rm", "dpo"):
        fields.update(dataset_name=chat_data["preference"], per_device_train_batch_size=2)
        if stage == "rm":
            fields.update(eval_split=0.25)
    else:
        fields.update(dataset_name=arith_data["prompts"], reward_funcs="reward_helpers:ascii_frac",
                      max_completion_length=4, per_device_train_batch_size=4)
        if stage == "ppo":
            fields.update(num_ppo_epochs=1)
        else:
            fields.update(num_generations=2)
    return fields


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stage_runs_on_family(tmp_path, monkeypatch, model_families, chat_data, arith_data, family, stage):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import posttrain.metrics

    # the plots are most of a 2-step run's time and do not depend on the family
    monkeypatch.setattr(posttrain.metrics, "plot_metrics", lambda *args, **kwargs: None)
    out = tmp_path / f"{family}-{stage}"
    records, summary = run_recipe(stage, out, **stage_fields(stage, model_families[family], chat_data, arith_data))

    steps = [r for r in records if "step" in r]
    assert steps and steps[-1]["step"] == 2
    losses = {k: r[k] for r in records for k in r if "loss" in k and isinstance(r[k], (int, float))}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    assert summary["final"]

    auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    model = auto.from_pretrained(out)
    assert model.config.model_type == {"llama3": "llama", "mistral": "mistral"}.get(family, "qwen2")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == EOS[family]
    assert tokenizer.chat_template == load_tokenizer(str(model_families[family])).chat_template
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    if stage != "rm":
        tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert tied == (family == "qwen2_tied")
    with torch.no_grad():
        ids = tokenizer("12+34=", return_tensors="pt")
        assert torch.isfinite(model(**ids).logits).all()


# ===================================================================== no chat template, from the command line


def test_cli_no_chat_template_stops_with_one_line(tmp_path, capsys, no_template_model):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT}])
    out = tmp_path / "run"
    rc = cli.main(["sft", "--model_name_or_path", str(no_template_model), "--dataset_name", str(data),
                   "--output_dir", str(out), "--max_steps", "2", "--num_threads", "1", "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert f"{data}:1:" in err[0] and "no chat template" in err[0] and "chat_template_path" in err[0]
    assert not (out / "model.safetensors").exists()
    assert not (out / "metrics.jsonl").exists() or not read_jsonl(out / "metrics.jsonl")


def test_cli_chat_template_path_supplies_the_template(tmp_path, capsys, no_template_model):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT}])
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_FILE_TEMPLATE, encoding="utf-8")
    out = tmp_path / "run"
    rc = cli.main(["sft", "--model_name_or_path", str(no_template_model), "--dataset_name", str(data),
                   "--output_dir", str(out), "--max_steps", "2", "--num_threads", "1", "--progress", "false",
                   "--max_length", "64", "--per_device_train_batch_size", "2", "--chat_template_path", str(template)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "model.safetensors").exists()
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert records and all(math.isfinite(r["loss"]) for r in records)
    # the trained model's folder carries the template it was trained with
    assert load_tokenizer(str(out)).chat_template == CHATML_FILE_TEMPLATE
