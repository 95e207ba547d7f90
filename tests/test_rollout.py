"""Rollouts score exactly the distribution they sample from.

- temperature: log-probs of softmax(z / T), equal to `generate`'s own processed scores;
- the checkpoint's generation_config.json (a repetition penalty) never reaches sampling;
- left padding: positions count real tokens, so absolute-position models score a
  left-padded row like the unpadded one.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from posttrain.config import load_config
from posttrain.data import prompt_examples, read_rows
from posttrain.models import load_causal_lm, load_tokenizer, token_logps
from posttrain.rewards import RewardSource, RewardSources, resolve_reward_func
from posttrain.rollout import build_engine, generate, sampling_stream


def _prompts(tokenizer, arith_data, n=8):
    return prompt_examples(read_rows(str(arith_data["prompts"]))[:n], tokenizer, 64)


def _exact_match():
    return RewardSources([RewardSource("exact_match", 1.0, func=resolve_reward_func("exact_match"))], 0)


def test_token_logps_at_temperature_equal_generate_scores(tiny_qwen, arith_data):
    tokenizer, model = load_tokenizer(str(tiny_qwen)), load_causal_lm(str(tiny_qwen), trainable=False)
    prompts = _prompts(tokenizer, arith_data)
    torch.manual_seed(0)
    gen = generate(model, tokenizer, [p.prompt_ids for p in prompts], 6, temperature=0.7, return_sampling_logps=True)
    mask, T = gen.completion_mask.bool(), gen.completion_mask.shape[1]
    scored = token_logps(model, gen.input_ids, gen.attention_mask, T, temperature=0.7)
    torch.testing.assert_close(scored[mask], gen.sampling_logps[mask], rtol=0, atol=2e-5)
    # without the temperature the scored distribution is another one (the defect this guards against)
    untempered = token_logps(model, gen.input_ids, gen.attention_mask, T)
    assert (untempered[mask] - gen.sampling_logps[mask]).abs().max() > 1e-2


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_rollout_old_and_ref_logps_are_of_the_sampled_distribution(tmp_path, tiny_qwen, arith_data, stage):
    """The recipe's own rollout: its cached old (and reference) log-probs equal log_softmax(scores)."""
    import importlib

    recipe = importlib.import_module(f"posttrain.recipes.{stage}")
    fields = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(arith_data["prompts"]),
              "output_dir": str(tmp_path), "temperature": "0.7", "max_completion_length": "6",
              "per_device_train_batch_size": "4"}
    if stage == "grpo":
        fields.update(num_generations="2", num_iterations="2")
    cfg = load_config(stage, None, fields)
    tokenizer = load_tokenizer(str(tiny_qwen))
    policy, ref = load_causal_lm(str(tiny_qwen)), load_causal_lm(str(tiny_qwen), trainable=False)
    prompts = _prompts(tokenizer, arith_data, 4)
    G = 2 if stage == "grpo" else 1
    head = recipe.ValueHead(policy.config.hidden_size) if stage == "ppo" else None
    with sampling_stream(cfg.seed, 0):  # the stream the recipe samples its rollout 0 from
        expected = generate(policy, tokenizer, [p.prompt_ids for p in prompts], 6, 0.7, num_return_sequences=G,
                            return_sampling_logps=True)
    if stage == "ppo":
        engine = build_engine(cfg, policy, tokenizer)
        rollout, _ = recipe.make_rollout(cfg, engine, policy, ref, None, head, _exact_match(), prompts, 0.05)
    else:
        rollout, _ = recipe.make_rollout(cfg, build_engine(cfg, policy, tokenizer), policy, ref, _exact_match(), prompts)
    assert torch.equal(rollout.input_ids, expected.input_ids), "same seed, same samples"
    mask = expected.completion_mask.bool()
    torch.testing.assert_close(rollout.old_logps[mask], expected.sampling_logps[mask], rtol=0, atol=2e-5)
    # policy and reference hold the same weights here: the reference scores at the same temperature
    torch.testing.assert_close(rollout.ref_logps[mask], expected.sampling_logps[mask], rtol=0, atol=2e-5)


class SamplingLogpsEngine:
    """The hf engine's sampling, keeping `generate`'s own log-probs of the tokens it drew."""

    def __init__(self, cfg, model, tokenizer):
        self.cfg, self.model, self.tokenizer, self.last = cfg, model, tokenizer, None

    def generate(self, prompt_ids, num_return_sequences=1):
        self.last = generate(self.model, self.tokenizer, prompt_ids, self.cfg.max_completion_length, self.cfg.temperature,
                             num_return_sequences=num_return_sequences, return_sampling_logps=True)
        return self.last


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_bf16_rollout_samples_at_the_precision_it_scores(tmp_path, tiny_qwen, arith_data, stage):
    """bf16: the rollout samples under the autocast its old log-probs are scored under, so the log-probs
    `generate` drew each token with equal the cached old ones (fp32 sampling: mean |dlogp| about 1e-3)."""
    import importlib

    recipe = importlib.import_module(f"posttrain.recipes.{stage}")
    fields = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(arith_data["prompts"]), "bf16": "true",
              "output_dir": str(tmp_path), "temperature": "0.7", "max_completion_length": "6",
              "per_device_train_batch_size": "4", **({"num_generations": "2", "num_iterations": "2"} if stage == "grpo" else {})}
    cfg = load_config(stage, None, fields)
    tokenizer = load_tokenizer(str(tiny_qwen))
    policy, ref = load_causal_lm(str(tiny_qwen)), load_causal_lm(str(tiny_qwen), trainable=False)
    engine, prompts = SamplingLogpsEngine(cfg, policy, tokenizer), _prompts(tokenizer, arith_data, 4)
    torch.manual_seed(1)
    if stage == "ppo":
        head = recipe.ValueHead(policy.config.hidden_size)
        rollout, _ = recipe.make_rollout(cfg, engine, policy, ref, None, head, _exact_match(), prompts, 0.05)
    else:
        rollout, _ = recipe.make_rollout(cfg, engine, policy, ref, _exact_match(), prompts)
    mask = engine.last.completion_mask.bool()
    gap = (rollout.old_logps[mask] - engine.last.sampling_logps[mask]).abs()
    assert float(gap.max()) < 1e-6, f"mean |dlogp| {float(gap.mean()):.2e}, max {float(gap.max()):.2e}"


def test_checkpoint_generation_config_does_not_leak_into_sampling(tmp_path, tiny_qwen, arith_data, monkeypatch):
    from transformers.generation import logits_process

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_qwen, model_dir)
    gen_config = json.loads((model_dir / "generation_config.json").read_text())
    gen_config.update(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=3, top_k=5)
    (model_dir / "generation_config.json").write_text(json.dumps(gen_config))

    calls = {"n": 0}
    real_call = logits_process.RepetitionPenaltyLogitsProcessor.__call__

    def counting_call(self, *args, **kwargs):
        calls["n"] += 1
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(logits_process.RepetitionPenaltyLogitsProcessor, "__call__", counting_call)
    tokenizer, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir), trainable=False)
    assert model.generation_config.repetition_penalty == 1.5  # the folder's defaults did load
    prompts = _prompts(tokenizer, arith_data)
    torch.manual_seed(0)
    gen = generate(model, tokenizer, [p.prompt_ids for p in prompts], 6, temperature=1.0, return_sampling_logps=True)
    assert calls["n"] == 0, "the checkpoint's repetition penalty ran during sampling"
    mask, T = gen.completion_mask.bool(), gen.completion_mask.shape[1]
    torch.testing.assert_close(token_logps(model, gen.input_ids, gen.attention_mask, T)[mask], gen.sampling_logps[mask],
                               rtol=0, atol=2e-5)
    assert model.generation_config.repetition_penalty == 1.5, "the model's own config is restored afterwards"
    # the leak would have shown: with the model's defaults, the penalty processor runs
    model.generate(input_ids=gen.input_ids[:, :2], max_new_tokens=2, do_sample=True,
                   pad_token_id=tokenizer.pad_token_id)
    assert calls["n"] > 0


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tiny_qwen):
    """A random tiny GPT-2 (absolute position embeddings) with the tiny tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_left_padded_row_scores_like_the_unpadded_row_with_absolute_positions(tiny_gpt2):
    from posttrain.data import left_pad

    tokenizer, model = load_tokenizer(str(tiny_gpt2)), load_causal_lm(str(tiny_gpt2), trainable=False)
    short = tokenizer("12+34=46", add_special_tokens=False)["input_ids"]
    long = tokenizer("99+99=198 and more", add_special_tokens=False)["input_ids"]
    ids, mask = left_pad([short, long], tokenizer.pad_token_id)
    padded = token_logps(model, ids, mask)[0, -(len(short) - 1):]
    alone = token_logps(model, torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))[0]
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)


# ------------------------------------------------- a group's prompt prefilled once; early stop at EOS


def _ragged_prompt_ids(tokenizer, arith_data, n):
    """Prompts of different lengths (so rows are left-padded), down to a single token."""
    ids = [p.prompt_ids for p in _prompts(tokenizer, arith_data, n)]
    return [row[min(i * 2, len(row) - 1):] for i, row in enumerate(ids)]


def test_group_prompt_cache_samples_logps_equal_to_the_scored_ones(tiny_qwen, arith_data):
    tokenizer, model = load_tokenizer(str(tiny_qwen)), load_causal_lm(str(tiny_qwen), trainable=False)
    prompt_ids = _ragged_prompt_ids(tokenizer, arith_data, 4)
    torch.manual_seed(0)
    gen = generate(model, tokenizer, prompt_ids, 8, temperature=0.7, num_return_sequences=3,
                   return_sampling_logps=True)
    assert gen.input_ids.shape[0] == 12
    # a group's rows share the prompt and (sampling) differ in their completions
    assert torch.equal(gen.input_ids[0, :-8], gen.input_ids[2, :-8])
    assert not torch.equal(gen.completion_ids[0], gen.completion_ids[1])
    mask, T = gen.completion_mask.bool(), gen.completion_mask.shape[1]
    scored = token_logps(model, gen.input_ids, gen.attention_mask, T, temperature=0.7)
    torch.testing.assert_close(scored[mask], gen.sampling_logps[mask], rtol=0, atol=2e-5)


def test_greedy_with_the_group_prompt_cache_equals_greedy_without(tiny_qwen, arith_data):
    tokenizer, model = load_tokenizer(str(tiny_qwen)), load_causal_lm(str(tiny_qwen), trainable=False)
    prompt_ids = _ragged_prompt_ids(tokenizer, arith_data, 5)
    reused = generate(model, tokenizer, prompt_ids, 12, greedy=True, num_return_sequences=2)
    # transformers refuses greedy with num_return_sequences > 1: the plain run repeats each prompt itself
    plain = generate(model, tokenizer, [row for row in prompt_ids for _ in range(2)], 12, greedy=True)
    assert torch.equal(reused.input_ids, plain.input_ids)
    assert reused.completions == plain.completions


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, kwargs, output: calls.append(kwargs["input_ids"].shape),
                                         with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("group", [1, 3])
def test_generation_stops_at_the_step_every_row_has_emitted_eos(tiny_qwen, arith_data, group):
    """A head biased towards EOS: every row ends within a few tokens, and no forward runs past the last one."""
    tokenizer, model = load_tokenizer(str(tiny_qwen)), load_causal_lm(str(tiny_qwen), trainable=False)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tokenizer.eos_token_id] = 4.0  # EOS is most of the mass, not all of it: rows end at different steps
    model.lm_head = biased
    prompt_ids = _ragged_prompt_ids(tokenizer, arith_data, 6)
    max_new_tokens = 40
    calls, handle = _count_forwards(model)
    torch.manual_seed(0)
    try:
        gen = generate(model, tokenizer, prompt_ids, max_new_tokens, num_return_sequences=group)
    finally:
        handle.remove()
    lengths = gen.completion_mask.sum(-1)
    T = gen.completion_mask.shape[1]
    assert not gen.truncated.any() and lengths.max() == T < max_new_tokens // 2
    assert lengths.min() < T, "rows end at different steps"
    # one forward per sampled column (+ the group's prefill): none after the last row's EOS
    prefill = 1 if group > 1 else 0
    assert len(calls) == T + prefill
    if group > 1:  # the prefill saw the N prompts once; generate's first forward only their last token
        assert calls[0][0] == len(prompt_ids) and calls[1] == (len(prompt_ids) * group, 1)
    # a finished row is padded with the pad token (distinct from EOS), and scored only up to its EOS
    ids = gen.completion_ids
    for row, n in enumerate(lengths.long().tolist()):
        assert ids[row, n - 1] == tokenizer.eos_token_id and (ids[row, n:] == tokenizer.pad_token_id).all()


def test_static_generation_cache_is_refused_without_cuda(tmp_path, tiny_qwen, arith_data):
    from posttrain.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    cfg = load_config("grpo", None, {"model_name_or_path": str(tiny_qwen), "dataset_name": str(arith_data["prompts"]),
                                     "output_dir": str(tmp_path), "generation_cache": "static"})
    tokenizer, model = load_tokenizer(str(tiny_qwen)), load_causal_lm(str(tiny_qwen), trainable=False)
    with pytest.raises(UserError, match="generation_cache.*CUDA"):
        build_engine(cfg, model, tokenizer)
