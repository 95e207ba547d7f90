"""Reward sources (posttrain.rewards): built-in rules, a user's `module:function`, and a reward model.

The user functions live in tests/user_rewards.py; tests/ is put on sys.path so
`user_rewards:NAME` imports the way a user's own module would from the working
directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from posttrain.data import collate_preferences, encode_prompt, left_pad, preference_examples, prompt_examples, read_rows
from posttrain.errors import UserError
from posttrain.models import last_token_index, load_scalar_model, load_tokenizer, sequence_scores
from posttrain.rewards import BUILTIN, RewardSources, rendered_sequences, resolve_reward_func, think_format
from posttrain.rollout import generation_from_ids
from posttrain.tasks.arith import exact_match

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def user_module_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    import user_rewards

    user_rewards.CALLS.clear()
    return user_rewards


def sources(tokenizer=None, **fields) -> RewardSources:
    overrides = {"dataset_name": "unused.jsonl"}
    overrides.update({k: str(v) for k, v in fields.items()})
    return RewardSources.from_config(load_config("grpo", None, overrides), tokenizer)


# ------------------------------------------------------------------ built-ins


def test_exact_match_by_hand():
    prompts = ["1+1=", "2+2=", "3+3=", "4+4="]
    completions = ["2", " 4 \n", "7", "08"]
    assert exact_match(prompts, completions, answer=["2", "4", "6", "8"]) == [1.0, 1.0, 0.0, 0.0]
    assert exact_match(prompts[:1], ["12"], answer=[12]) == [1.0]  # answers are compared as text
    with pytest.raises(ValueError, match="answer"):
        exact_match(prompts, completions)


def test_think_format_by_hand():
    completions = ["<think>carry the one</think>125", "<think></think>125", "125", "<think>\nstep\n</think>",
                   "think>x</think>", "<think>open only"]
    assert think_format([""] * 6, completions) == [0.5, 0.0, 0.0, 0.5, 0.0, 0.0]


def test_builtins_resolve_by_name():
    assert set(BUILTIN) == {"exact_match", "think_format", "accuracy_reward", "think_format_reward"}
    assert resolve_reward_func("exact_match") is exact_match
    assert resolve_reward_func("think_format") is think_format


def test_builtin_source_gets_answer_field():
    rewards = sources(reward_funcs="exact_match,think_format", reward_weights="1.0,2.0")
    total, parts = rewards.score(["1+1=", "2+2=", "3+3="], ["2", "<think>2+2</think>4", "5"],
                                 [{"answer": "2"}, {"answer": "4"}, {"answer": "6"}])
    assert parts["rewards/exact_match"].tolist() == [1.0, 0.0, 0.0]  # "<think>..." is not the answer
    assert parts["rewards/think_format"].tolist() == [0.0, 0.5, 0.0]
    assert total.tolist() == [1.0, 1.0, 0.0]  # 1*exact + 2*think


def test_builtin_exact_match_without_answer_is_a_user_error():
    rewards = sources(reward_funcs="exact_match")
    with pytest.raises(UserError, match="exact_match"):
        rewards.score(["1+1="], ["2"], [{}])


# ------------------------------------------------------------------ a user's module:function


def test_user_function_resolves_and_scores(user_module_importable):
    func = resolve_reward_func("user_rewards:length")
    assert func is user_module_importable.length
    rewards = sources(reward_funcs="user_rewards:length", reward_clip=0)
    total, parts = rewards.score(["p", "q"], ["abc", ""], [{}, {}])
    assert parts["rewards/user_rewards:length"].tolist() == [3.0, 0.0]
    assert total.tolist() == [3.0, 0.0]


def test_user_function_receives_extra_fields_as_lists(user_module_importable):
    rewards = sources(reward_funcs="user_rewards:record_fields")
    extras = [{"answer": "2", "id": 7, "tags": ["a"]}, {"answer": "4", "id": 8, "tags": []},
              {"answer": "6", "id": 9, "tags": ["b", "c"]}]
    total, _ = rewards.score(["1+1=", "2+2=", "3+3="], ["2", "5", "6"], extras)
    assert total.tolist() == [1.0, 0.0, 1.0]
    assert len(user_module_importable.CALLS) == 1
    call = user_module_importable.CALLS[0]
    assert call["prompts"] == ["1+1=", "2+2=", "3+3="]
    assert call["completions"] == ["2", "5", "6"]
    assert call["answer"] == ["2", "4", "6"]
    assert call["id"] == [7, 8, 9]
    assert call["tags"] == [["a"], [], ["b", "c"]]


def test_raising_function_names_function_and_batch():
    """One batch call: the error names the function, its exception and where it raised, and the batch size;
    it does not re-call the function row by row to guess the row."""
    rewards = sources(reward_funcs="user_rewards:explode_on_bad")
    with pytest.raises(UserError) as info:
        rewards.score(["1+1=", "2+2=", "3+3="], ["2", "so bad", "6"], [{}, {}, {}])
    message = str(info.value)
    assert "user_rewards:explode_on_bad" in message
    assert "ValueError" in message and "cannot score 'so bad'" in message
    assert "user_rewards.py:" in message  # the line of the user's code that raised
    assert "called once on a batch of 3 completions" in message
    assert "\n" not in message


def test_wrong_number_of_values_is_an_error():
    rewards = sources(reward_funcs="user_rewards:one_short")
    with pytest.raises(UserError, match=r"user_rewards:one_short.*returned 2 values for 3 completions"):
        rewards.score(["a", "b", "c"], ["x", "y", "z"], [{}, {}, {}])


@pytest.mark.parametrize("name", ["user_rewards:not_numbers", "user_rewards:returns_scalar"])
def test_non_numeric_values_are_an_error(name):
    rewards = sources(reward_funcs=name)
    with pytest.raises(UserError, match=name):
        rewards.score(["a", "b"], ["x", "y"], [{}, {}])


@pytest.mark.parametrize("name, fragment", [
    ("exact_matches", "unknown reward 'exact_matches'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("user_rewards:missing", "has no function 'missing'"),
    ("user_rewards:NOT_CALLABLE", "has no function 'NOT_CALLABLE'"),
])
def test_unknown_reward_is_an_error(name, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve_reward_func(name)
    with pytest.raises(UserError, match=fragment):
        sources(reward_funcs=name)


def test_reward_weights_must_match_sources():
    with pytest.raises(UserError, match="reward_weights"):
        sources(reward_funcs="exact_match,think_format", reward_weights="1.0")


# ------------------------------------------------------------------ a reward model, weights and clipping


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_qwen):
    """A reward model folder: AutoModelForSequenceClassification from the tiny_qwen config, with a large head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("reward_model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    config = AutoConfig.from_pretrained(tiny_qwen, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 3.0)  # scores of a few units, so clipping at 3 bites
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_reward_model_source_weights_and_clip(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    prompts = ["12+34=", "5+5=", "99+1=", "hello", "7+8="]
    completions = ["46", "10", "1000", "<think>hm</think>", "15"]
    extras = [{"answer": "46"}, {"answer": "11"}, {"answer": "100"}, {"answer": "x"}, {"answer": "15"}]

    # by hand: the reward model's own forward on each unpadded prompt + completion + EOS
    hf = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1).eval()
    with torch.no_grad():
        rm = torch.stack([hf(torch.tensor([tokenizer(p + c, add_special_tokens=False)["input_ids"]
                                           + [tokenizer.eos_token_id]])).logits[0, 0]
                          for p, c in zip(prompts, completions)])
    assert rm.abs().max() > 3.0 and rm.abs().min() < 3.0, rm  # some rows clip, some do not
    em = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    think = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0])

    rewards = sources(tokenizer, reward_funcs="exact_match,think_format", reward_weights="2.0,1.0,-0.5",
                      reward_model_name_or_path=reward_model_dir, reward_clip=3.0)
    assert [s.name for s in rewards.sources] == ["exact_match", "think_format", "reward_model"]
    assert [s.weight for s in rewards.sources] == [2.0, 1.0, -0.5]
    assert len(rewards.models) == 1
    assert not any(p.requires_grad for p in rewards.models[0].parameters())  # frozen
    total, parts = rewards.score(prompts, completions, extras, raw_prompts=prompts)
    torch.testing.assert_close(parts["rewards/reward_model"], rm, atol=1e-4, rtol=1e-4)
    assert parts["rewards/exact_match"].tolist() == em.tolist()
    assert parts["rewards/think_format"].tolist() == think.tolist()
    unclipped = 2.0 * em + 1.0 * think - 0.5 * rm
    torch.testing.assert_close(total, unclipped.clamp(-3.0, 3.0), atol=1e-4, rtol=1e-4)
    assert total.abs().max() <= 3.0

    # reward_clip 0 disables clipping
    unbounded = sources(tokenizer, reward_funcs="exact_match,think_format", reward_weights="2.0,1.0,-0.5",
                        reward_model_name_or_path=reward_model_dir, reward_clip=0)
    total, _ = unbounded.score(prompts, completions, extras, raw_prompts=prompts)
    torch.testing.assert_close(total, unclipped, atol=1e-4, rtol=1e-4)
    assert total.abs().max() > 3.0


def test_reward_model_only(reward_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    rewards = sources(tokenizer, reward_funcs="", reward_model_name_or_path=reward_model_dir, reward_clip=100)
    assert [s.name for s in rewards.sources] == ["reward_model"]
    prompts, completions = ["1+2=", "30+40="], ["3", "70"]
    total, parts = rewards.score(prompts, completions, [{}, {}], raw_prompts=prompts)
    assert list(parts) == ["rewards/reward_model"]
    torch.testing.assert_close(total, parts["rewards/reward_model"])
    assert total[0] != total[1]


@pytest.mark.parametrize("on_error", ["raise", "-1"])
def test_slow_reward_model_is_reported_not_waited_on(reward_model_dir, on_error):
    import time

    rewards = sources(reward_funcs="think_format", reward_model_name_or_path=reward_model_dir, reward_clip=0,
                      reward_timeout_s=0.3, reward_on_error=on_error)
    prompts, completions = ["1+2=", "30+40="], ["3", "70"]
    _, parts = rewards.score(prompts, completions, [{}, {}], raw_prompts=prompts)  # quick: scored in the thread
    assert parts["rewards/reward_model"][0] != parts["rewards/reward_model"][1]
    rewards.models[0].register_forward_hook(lambda *_: time.sleep(2))  # a scoring call that hangs
    start = time.monotonic()
    if on_error == "raise":
        with pytest.raises(UserError, match=f"reward model '{reward_model_dir}' took longer than reward_timeout_s=0.3 s "
                                            "on a batch of 2 completions"):
            rewards.score(prompts, completions, [{}, {}], raw_prompts=prompts)
    else:
        total, parts = rewards.score(prompts, completions, [{}, {}], raw_prompts=prompts)
        assert parts["rewards/reward_model"].tolist() == [-1.0, -1.0]
        assert parts["rewards/errors"].tolist() == [1.0, 1.0]
        assert total.tolist() == [-1.0, -1.0]  # think_format 0 + reward model -1
    assert time.monotonic() - start < 1.5


def test_reward_model_scores_are_not_clipped_by_default(reward_model_dir):
    """TRL does not clip: with reward_clip left at its default (0) a reward model's score reaches the advantages
    whole, beyond ±3 too."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    prompts, completions = ["12+34=", "5+5=", "99+1=", "hello", "7+8="], ["46", "10", "1000", "<think>hm</think>", "15"]
    hf = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1).eval()
    with torch.no_grad():
        rm = torch.stack([hf(torch.tensor([tokenizer(p + c, add_special_tokens=False)["input_ids"]
                                           + [tokenizer.eos_token_id]])).logits[0, 0]
                          for p, c in zip(prompts, completions)])
    assert rm.abs().max() > 3.0, rm  # a score the old default clip of 3 would have saturated
    rewards = sources(tokenizer, reward_model_name_or_path=reward_model_dir)
    assert rewards.clip == 0
    total, _ = rewards.score(prompts, completions, [{}] * 5, raw_prompts=prompts)
    torch.testing.assert_close(total, rm, atol=1e-4, rtol=1e-4)


def test_truncated_completion_is_scored_as_generated(reward_model_dir):
    """A completion cut at the length limit (no EOS) is scored on exactly the tokens the policy produced:
    the prompt as sampled from, then the completion's ids, no EOS and no end of turn appended. A finished
    row in the same batch keeps the render RM training scores (EOS / ``<|im_end|>\n``)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(str(reward_model_dir))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    raw_prompts = ["12+34=", "5+5=", [{"role": "user", "content": "70+81="}], [{"role": "user", "content": "2+2="}]]
    sampled = ["46", "10", "15", "4"]  # what a policy sampled; rows 0 and 2 hit the limit of 3 tokens
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in sampled]
    ids = [ids[0] + [ids[0][-1]], ids[1] + [eos], ids[2] + [ids[2][0]], ids[3] + [eos, pad]]
    completion_ids = torch.tensor([row + [pad] * (3 - len(row)) for row in ids])
    prompt_ids, prompt_mask = left_pad([encode_prompt(tokenizer, p) for p in raw_prompts], pad)
    gen = generation_from_ids(prompt_ids, prompt_mask, completion_ids, tokenizer)  # as every rollout engine builds it
    assert gen.truncated.tolist() == [True, False, True, False]
    assert gen.completions == ["466", "10", "151", "4"]

    hf = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1).eval()
    with torch.no_grad():  # by hand: each row's own unpadded tokens (the generated ones for truncated rows)
        generated = [hf(row[mask.bool()][None]).logits[0, 0] for row, mask in zip(gen.input_ids, gen.attention_mask)]
    rewards = sources(tokenizer, reward_funcs="", reward_model_name_or_path=reward_model_dir)
    texts = [p if isinstance(p, str) else tokenizer.decode(encode_prompt(tokenizer, p)) for p in raw_prompts]
    _, parts = rewards.score(texts, gen.completions, [{}] * 4, raw_prompts=raw_prompts, truncated=gen.truncated)
    scores = parts["rewards/reward_model"]
    torch.testing.assert_close(scores[[0, 2]], torch.stack(generated)[[0, 2]], atol=1e-5, rtol=0)
    _, as_finished = rewards.score(texts, gen.completions, [{}] * 4, raw_prompts=raw_prompts)  # the old scoring
    assert (scores[[0, 2]] - as_finished["rewards/reward_model"][[0, 2]]).abs().min() > 1e-3  # EOS moved the score
    torch.testing.assert_close(scores[[1, 3]], as_finished["rewards/reward_model"][[1, 3]])  # finished: unchanged
    torch.testing.assert_close(scores[1], generated[1], atol=1e-5, rtol=0)  # a text row's EOS is the sampled one


def test_missing_eos_penalty_is_subtracted_from_truncated_rows():
    # exact_match 1, 0, 1 (weight 2 -> 2, 0, 2), clipped to ±1.5 -> 1.5, 0, 1.5; rows 0 and 1 truncated lose 0.25
    rewards = sources(reward_funcs="exact_match", reward_weights="2", reward_clip=1.5, missing_eos_penalty=0.25)
    total, parts = rewards.score(["1+1=", "2+2=", "3+3="], ["2", "5", "6"], [{"answer": "2"}, {"answer": "4"}, {"answer": "6"}],
                                 truncated=torch.tensor([True, True, False]))
    assert parts["rewards/exact_match"].tolist() == [1.0, 0.0, 1.0]
    assert total.tolist() == [1.25, -0.25, 1.5]
    untruncated, _ = rewards.score(["1+1="], ["2"], [{"answer": "2"}])  # no flags: every row finished
    assert untruncated.tolist() == [1.5]


def test_reward_model_without_raw_prompts_is_an_error(reward_model_dir):
    rewards = sources(reward_funcs="", reward_model_name_or_path=reward_model_dir)
    with pytest.raises(ValueError, match="raw_prompts"):
        rewards.score(["1+2="], ["3"], [{}])


# ------------------------------------------------------------------ RL scoring reads where RM training read

CHAT_ROWS = [  # a chat prompt (the case that differed), a longer chat answer, and a text prompt
    {"prompt": [{"role": "user", "content": "12+34="}], "chosen": "46", "rejected": "45"},
    {"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": "5+5="}],
     "chosen": "<think>5 and 5</think>10", "rejected": "11"},
    {"prompt": "70+81=", "chosen": "151", "rejected": "141"},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sampled_completions(tokenizer, answers: list[str]) -> list[str]:
    """What rollout.generate returns for a policy that samples each answer then EOS: decoded, specials removed."""
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def test_rl_scoring_reads_the_token_rm_training_reads(tmp_path, reward_model_dir):
    """Chosen rows scored by the RM training collate and the same conversations scored as RL completions:
    same tokens, same reading position (``<|im_end|>\n``'s newline for chat rows), same scores."""
    path = write_jsonl(tmp_path / "pairs.jsonl", CHAT_ROWS)
    tokenizer = load_tokenizer(str(reward_model_dir))
    model = load_scalar_model(str(reward_model_dir), "reward_model_name_or_path", trainable=False)
    pairs = collate_preferences(preference_examples(read_rows(path), tokenizer, 256, 128), [0, 1, 2],
                                tokenizer.pad_token_id).tokens.to(model.device)
    trained_ids, trained_mask = pairs.input_ids[:3], pairs.attention_mask[:3]
    trained_scores = sequence_scores(model, trained_ids, trained_mask).cpu()
    trained_last = trained_ids.gather(1, last_token_index(trained_mask).unsqueeze(1)).squeeze(1).cpu()
    assert tokenizer.convert_ids_to_tokens(trained_last.tolist()) == ["Ċ", "Ċ", "<|im_end|>"]  # "\n" is Ċ

    prompts = prompt_examples(read_rows(path), tokenizer, 128)
    raw_prompts = [e.prompt for e in prompts]
    assert raw_prompts == [row["prompt"] for row in CHAT_ROWS]
    completions = sampled_completions(tokenizer, [row["chosen"] for row in CHAT_ROWS])
    assert completions == [row["chosen"] for row in CHAT_ROWS]
    rl_ids, rl_mask = rendered_sequences(tokenizer, raw_prompts, completions)
    rl_last = rl_ids.gather(1, last_token_index(rl_mask).unsqueeze(1)).squeeze(1)
    assert rl_last.tolist() == trained_last.tolist()
    assert (rl_ids * rl_mask).tolist() == (trained_ids * trained_mask).cpu().tolist()

    rewards = sources(tokenizer, reward_funcs="", reward_model_name_or_path=reward_model_dir, reward_clip=0)
    _, parts = rewards.score([e.prompt_text for e in prompts], completions, [e.extra for e in prompts],
                             raw_prompts=raw_prompts)
    assert trained_scores.abs().min() > 1e-3 and len(set(trained_scores.tolist())) == 3
    torch.testing.assert_close(parts["rewards/reward_model"], trained_scores, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the reward model on the command line


def test_causal_lm_as_reward_model_is_refused(cli, tiny_qwen, arith_data, tmp_path):
    """A policy folder given as the reward model would score every completion 0 (its new head starts at zero)."""
    out = tmp_path / "out"
    result = cli("grpo", "--model_name_or_path", tiny_qwen, "--dataset_name", arith_data["prompts"],
                 "--reward_model_name_or_path", tiny_qwen, "--output_dir", out, "--max_steps", "1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"posttrain: error: --reward_model_name_or_path: field 'reward_model_name_or_path': {tiny_qwen} is a causal LM "
        "(Qwen2ForCausalLM, no scalar score head); train one with `posttrain rm`")
    assert "Traceback" not in result.stderr
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_reward_model_alone_when_no_reward_funcs_given(cli, stage, tiny_qwen, reward_model_dir, tmp_path):
    """TRL prompt rows (no `answer`) with a reward model and no reward_funcs: the reward model is the only
    source (the exact_match default would stop with "field 'answer' is missing"). PPO's critic may still
    start from a causal LM."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{i}+{i}="} for i in range(8)])
    out = tmp_path / "out"
    extra = ["--num_generations", "2"] if stage == "grpo" else ["--critic_model_name_or_path", str(tiny_qwen)]
    result = cli(stage, "--model_name_or_path", tiny_qwen, "--dataset_name", prompts, "--reward_model_name_or_path",
                 reward_model_dir, "--output_dir", out, "--max_steps", "1", "--per_device_train_batch_size", "2",
                 "--max_completion_length", "2", "--progress", "false", *extra)
    assert result.returncode == 0, result.stderr
    [record] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [k for k in record if k.startswith("rewards/")] == ["rewards/reward_model"]
    assert "reward_funcs: []" in (out / "config.yaml").read_text()


def test_explicit_reward_funcs_stay_beside_a_reward_model(tmp_path, reward_model_dir):
    base = {"dataset_name": "unused.jsonl", "reward_model_name_or_path": str(reward_model_dir)}
    assert load_config("grpo", None, base).reward_funcs == []
    assert load_config("ppo", None, {**base, "reward_funcs": "exact_match"}).reward_funcs == ["exact_match"]
    config = tmp_path / "grpo.yaml"
    config.write_text("reward_funcs: [think_format]\n")
    assert load_config("grpo", str(config), base).reward_funcs == ["think_format"]
    assert load_config("grpo", None, {"dataset_name": "unused.jsonl"}).reward_funcs == ["exact_match"]  # no model


def test_no_reward_source_is_an_error():
    with pytest.raises(UserError, match="no reward source"):
        sources(reward_funcs="")

