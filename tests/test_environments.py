"""Multi-turn rollouts with environments and tools (posttrain.environments, posttrain.rollout.MultiTurn).

The trajectories are checked token by token against the chat template; the
maths (masks through GRPO's and PPO's losses) on the recipes' own rollouts.
"""

from __future__ import annotations

import time

import pytest
import torch
from agent_helpers import CALL, Calculator, ScriptedEngine

from posttrain.config import load_config
from posttrain.data import PromptExample
from posttrain.environments import (
    ToolCall,
    ToolRuntime,
    check_template,
    hermes_tool_calls,
    llama3_tool_calls,
    run_tool_calls,
    tool_suffix_ids,
)
from posttrain.errors import UserError
from posttrain.models import load_tokenizer
from posttrain.rollout import MultiTurn


def _cfg(stage, tiny_qwen, arith_data, tmp_path, **extra):
    fields = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(arith_data["prompts"]),
              "output_dir": str(tmp_path / "out"), "environment": "agent_helpers:Calculator",
              "max_completion_length": "200", "per_device_train_batch_size": "2"}
    if stage == "grpo":
        fields["num_generations"] = "2"
    fields.update({k: str(v) for k, v in extra.items()})
    return load_config(stage, None, fields)


def _prompts(n=2):
    return [PromptExample([], f"{i}+1=", {"answer": str(i + 1)}, f"{i}+1=") for i in range(n)]


# ------------------------------------------------------------------ parsing, schemas, running tools


def test_hermes_and_llama3_tool_calls_are_parsed_and_malformed_ones_flagged():
    calls = hermes_tool_calls('x <tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call> '
                              '<tool_call>{"name": "f"}</tool_call><tool_call>{oops</tool_call>')
    assert [(c.name, c.arguments, bool(c.error)) for c in calls] == [("add", {"a": 1}, False), ("f", {}, False),
                                                                     ("", {}, True)]
    assert hermes_tool_calls("the answer is 5") == []
    call, = llama3_tool_calls('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}')
    assert (call.name, call.arguments) == ("add", {"a": 1, "b": 2})
    assert llama3_tool_calls("5") == []


def test_environment_methods_become_json_schemas(tiny_qwen, arith_data, tmp_path):
    runtime = ToolRuntime.from_config(_cfg("grpo", tiny_qwen, arith_data, tmp_path), load_tokenizer(str(tiny_qwen)))
    add = next(s for s in runtime.schemas if s["function"]["name"] == "add")
    assert add["function"]["description"] == "Add two integers."
    assert add["function"]["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first number"}
    assert sorted(s["function"]["name"] for s in runtime.schemas) == ["add", "explode", "wait"]  # not reset/get_reward


def test_a_tool_without_docstring_args_is_a_user_error(tiny_qwen, arith_data, tmp_path):
    (tmp_path / "bad_tools.py").write_text("def f(x: int) -> int:\n    return x\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        cfg = _cfg("grpo", tiny_qwen, arith_data, tmp_path, environment="", tools="bad_tools:f")
        with pytest.raises(UserError, match="tool 'f' has no usable schema"):
            ToolRuntime.from_config(cfg, load_tokenizer(str(tiny_qwen)))
    finally:
        sys.path.remove(str(tmp_path))


def test_tool_errors_and_timeouts_answer_the_model_and_calls_run_concurrently():
    env = Calculator()
    env.reset(answer="5")
    table = {"add": env.add, "explode": env.explode, "wait": env.wait}
    calls = [(table, ToolCall("add", {"a": 2, "b": 3})), (table, ToolCall("explode", {"x": 1})),
             (table, ToolCall("nope", {})), (table, ToolCall("add", {"c": 1})),
             (table, ToolCall("", {}, "Error: the tool call is not valid JSON")),
             (table, ToolCall("wait", {"seconds": 5.0}))]
    start = time.perf_counter()
    out = run_tool_calls(calls, timeout_s=0.5)
    assert time.perf_counter() - start < 2.0
    assert out[0] == ("5", False)
    assert out[1] == ("Error: ValueError: no such luck", True)
    assert out[2][1] and "unknown tool 'nope'" in out[2][0]
    assert out[3][1] and out[3][0].startswith("Error: TypeError")
    assert out[4] == ("Error: the tool call is not valid JSON", True)
    assert out[5] == ("Error: tool 'wait' took longer than tool_timeout_s=0.5 s", True)
    # four 0.3 s calls side by side take about 0.3 s, not 1.2 s
    start = time.perf_counter()
    out = run_tool_calls([(table, ToolCall("wait", {"seconds": 0.3}))] * 4, timeout_s=5)
    assert out == [("done", False)] * 4 and time.perf_counter() - start < 0.9


# ------------------------------------------------------------------ the chat template


def test_tool_suffix_is_what_the_template_adds_after_the_model_turn(tiny_qwen):
    tok = load_tokenizer(str(tiny_qwen))
    schemas = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    suffix = tok.decode(tool_suffix_ids(tok, [("add", "5")], schemas))
    assert suffix == "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    check_template(tok, schemas)


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_qwen):
    tok = load_tokenizer(str(tiny_qwen))
    schemas = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    # Qwen3-like: an assistant turn's <think> block is dropped once a later assistant turn exists
    tok.chat_template = tok.chat_template.replace(
        "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}",
        "{{ '<|im_start|>assistant\n' + ((message['content'] or '').split('</think>')[-1] if not loop.last "
        "and messages[loop.index0 + 1:] | selectattr('role', 'equalto', 'assistant') | list else "
        "(message['content'] or '')) }}")
    assert "split('</think>')" in tok.chat_template
    with pytest.raises(UserError, match="rewrites earlier turns"):
        check_template(tok, schemas)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # ignores tools=
    with pytest.raises(UserError, match="ignores tools="):
        check_template(tok, schemas)


# ------------------------------------------------------------------ token-exact trajectories


def _multi_turn(tiny_qwen, arith_data, tmp_path, script, budget=200, **extra):
    tok = load_tokenizer(str(tiny_qwen))
    cfg = _cfg("grpo", tiny_qwen, arith_data, tmp_path, max_completion_length=budget, **extra)
    runtime = ToolRuntime.from_config(cfg, tok)
    engine = ScriptedEngine(tok, script, budget)
    return tok, runtime, engine, MultiTurn(engine, tok, runtime, budget, cfg.max_turns)


def test_trajectory_is_sampled_ids_then_template_suffix_then_sampled_ids(tiny_qwen, arith_data, tmp_path):
    tok, runtime, engine, sampler = _multi_turn(tiny_qwen, arith_data, tmp_path, [CALL, "5"])
    gen, episodes = sampler.sample(_prompts(), group_size=2)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tok.eos_token_id]
    suffix = tool_suffix_ids(tok, [("add", "5")], runtime.schemas)
    expected = ids(CALL) + eos + suffix + ids("5") + eos
    T = gen.completion_mask.shape[1]
    assert T == len(expected)
    for row in range(4):
        assert gen.completion_ids[row].tolist() == expected
        assert gen.completion_mask[row].tolist() == [1.0] * (len(ids(CALL)) + 1) + [0.0] * len(suffix) + [1.0] * 2
        assert gen.attention_mask[row, -T:].tolist() == [1] * T
    # the second turn's context is the first one's ids, extended: never re-rendered
    first_context, second_context = engine.calls[0][0], engine.calls[1][0]
    assert second_context == first_context + ids(CALL) + eos + suffix
    assert "(a calculator is available)" in tok.decode(first_context) and "<tools>" in tok.decode(first_context)
    assert gen.completions == ["5"] * 4 and not gen.truncated.any()
    # the engine's sampling log-probs travel with the ids they belong to; tool tokens get 0
    first_turn = [-(k + 1) / 100 for k in range(len(ids(CALL)) + 1)]
    torch.testing.assert_close(gen.sampling_logps[0], torch.tensor(first_turn + [0.0] * len(suffix) + [-0.01, -0.02]))
    assert episodes.turns.tolist() == [2] * 4 and episodes.tool_calls.tolist() == [1] * 4
    assert [env.calls for env in episodes.environments] == [1] * 4
    assert len({id(env) for env in episodes.environments}) == 4, "one environment instance per trajectory"
    stats = episodes.stats()
    assert float(stats["tools/call_frequency"]) == 1.0 and float(stats["tools/failure_frequency"]) == 0.0


def test_budget_counts_tool_tokens_and_cut_trajectories_are_truncated(tiny_qwen, arith_data, tmp_path):
    tok, runtime, _, sampler = _multi_turn(tiny_qwen, arith_data, tmp_path, [CALL, "5"], budget=len(CALL) + 10)
    gen, episodes = sampler.sample(_prompts(1), group_size=2)
    assert gen.truncated.all(), "no room for the tool result: the trajectory is cut"
    assert episodes.turns.tolist() == [1, 1] and gen.completion_mask.sum(-1).tolist() == [len(CALL) + 1] * 2
    suffix = len(tool_suffix_ids(tok, [("add", "5")], runtime.schemas))
    budget = len(CALL) + 1 + suffix + 1  # the answer "5" fits, its EOS does not
    tok, runtime, _, sampler = _multi_turn(tiny_qwen, arith_data, tmp_path, [CALL, "5"], budget=budget)
    gen, episodes = sampler.sample(_prompts(1), group_size=2)
    assert gen.truncated.all() and gen.completion_mask.shape[1] == budget
    assert episodes.turns.tolist() == [2, 2]


def test_max_turns_bounds_the_rounds_of_tool_calls(tiny_qwen, arith_data, tmp_path):
    _, _, engine, sampler = _multi_turn(tiny_qwen, arith_data, tmp_path, [CALL], budget=400, max_turns=2)
    gen, episodes = sampler.sample(_prompts(1), group_size=2)
    assert episodes.turns.tolist() == [3, 3] and episodes.tool_calls.tolist() == [2, 2]
    assert not gen.truncated.any()


def test_failed_tools_are_counted_and_answered(tiny_qwen, arith_data, tmp_path):
    bad = '<tool_call>{"name": "explode", "arguments": {"x": 1}}</tool_call>'
    tok, _, _, sampler = _multi_turn(tiny_qwen, arith_data, tmp_path, [bad, "5"])
    gen, episodes = sampler.sample(_prompts(1), group_size=2)
    assert "Error: ValueError: no such luck" in episodes.transcripts[0]
    assert float(episodes.stats()["tools/failure_frequency"]) == 1.0


# ------------------------------------------------------------------ masks and maths in the recipes


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_a_one_turn_environment_trains_bit_identically_to_single_turn(tmp_path, tiny_qwen, arith_data, stage):
    from agent_helpers import run_recipe

    fields = {"model_name_or_path": tiny_qwen, "dataset_name": arith_data["prompts"], "max_steps": 2,
              "reward_funcs": "agent_helpers:printable_frac", "max_completion_length": 6,
              "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1}
    if stage == "grpo":
        fields.update(num_generations=2, beta=0.1, num_iterations=2)
    plain = run_recipe(stage, tmp_path / "plain", **fields)
    env = run_recipe(stage, tmp_path / "env", environment="agent_helpers:NoTools", **fields)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "env")
    assert all(torch.equal(a[k], b[k]) for k in a), "same samples, same updates, same weights"
    for r, s in zip(plain, env):
        assert {k: v for k, v in r.items() if k in s and "time" not in k and not k.endswith("_s")} == \
               {k: v for k, v in s.items() if k in r and "time" not in k and not k.endswith("_s")}
        assert s["num_turns"] == 1.0 and s["tools/call_frequency"] == 0.0


def _tool_rollout(stage, tmp_path, tiny_qwen, arith_data, **extra):
    """A recipe's own rollout of real multi-turn trajectories (the first turn forced to call `add`)."""
    import importlib

    from posttrain.data import prompt_examples, read_rows
    from posttrain.models import load_policy_and_reference
    from posttrain.rewards import RewardSources
    from posttrain.rollout import build_engine

    recipe = importlib.import_module(f"posttrain.recipes.{stage}")
    cfg = _cfg(stage, tiny_qwen, arith_data, tmp_path, rollout_engine="agent_helpers:forced_call_engine",
               max_completion_length=140, reward_funcs="agent_helpers:used_calculator", **extra)
    tokenizer, policy, ref = load_policy_and_reference(cfg)
    prompts = prompt_examples(read_rows(str(arith_data["prompts"]))[:2], tokenizer, 64)
    torch.manual_seed(0)
    engine = build_engine(cfg, policy, tokenizer)
    rewards = RewardSources.from_config(cfg, tokenizer)
    if stage == "grpo":
        rollout, stats = recipe.make_rollout(cfg, engine, policy, ref, rewards, prompts)
        return cfg, recipe, policy, None, rollout, stats
    head = recipe.ValueHead(policy.config.hidden_size)
    rollout, stats = recipe.make_rollout(cfg, engine, policy, ref, None, head, rewards, prompts, cfg.kl_coef)
    return cfg, recipe, policy, head, rollout, stats


def _tool_positions(rollout):
    T = rollout.mask.shape[1]
    observation = (rollout.attention_mask[:, -T:] == 1) & (rollout.mask == 0)
    assert observation.any() and rollout.mask.any()
    return observation


def _grads(modules):
    return [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]


def test_grpo_observation_tokens_contribute_no_gradient(tmp_path, tiny_qwen, arith_data):
    cfg, recipe, policy, _, rollout, stats = _tool_rollout("grpo", tmp_path, tiny_qwen, arith_data, beta=0.1,
                                                          num_iterations=2, loss_type="dapo")
    assert float(stats["tools/call_frequency"]) == 1.0 and float(stats["rewards/Calculator"]) == 1.0
    observation = _tool_positions(rollout)
    T = rollout.mask.shape[1]

    def grads():
        policy.zero_grad()
        loss, _ = recipe.grpo_loss(cfg, policy, rollout, T, rollout.mask.sum())
        loss.backward()
        return loss.detach(), _grads([policy])

    loss, before = grads()
    # what an observation token would change: its old and reference log-probs (ratio and KL there)
    rollout.old_logps = rollout.old_logps + 3.0 * observation
    rollout.ref_logps = rollout.ref_logps - 2.0 * observation
    loss_after, after = grads()
    assert torch.equal(loss, loss_after) and all(torch.equal(a, b) for a, b in zip(before, after))


def test_ppo_reward_sits_on_the_last_model_token_and_observations_carry_no_loss(tmp_path, tiny_qwen, arith_data):
    cfg, recipe, policy, head, rollout, stats = _tool_rollout("ppo", tmp_path, tiny_qwen, arith_data, critic="shared")
    observation = _tool_positions(rollout)
    assert (rollout.advantages[observation] == 0).all() and (rollout.returns[observation] == 0).all()
    from posttrain.losses import last_token_index

    last = last_token_index(rollout.mask)
    assert (rollout.mask[torch.arange(len(last)), last] == 1).all()
    assert (last > rollout.mask.sum(-1) - 1).all(), "the last model token follows the tool turn"
    scores = torch.tensor([1.0, 2.0])
    token_rewards = recipe.shape_rewards(scores, torch.zeros_like(rollout.mask), rollout.mask, 0.0)
    assert torch.equal(token_rewards[torch.arange(2), last], scores) and token_rewards.count_nonzero() == 2
    T = rollout.mask.shape[1]

    def grads():
        policy.zero_grad()
        head.zero_grad()
        logps, _, values = recipe.actor_critic_forward(policy, None, head, rollout.input_ids, rollout.attention_mask, T)
        from posttrain.losses import ppo_policy_loss, value_loss

        pg, _ = ppo_policy_loss(logps, rollout.old_logps, rollout.advantages, rollout.mask, cfg.epsilon)
        (pg + value_loss(values, rollout.values, rollout.returns, rollout.mask, 0.2)).backward()
        return _grads([policy, head])

    before = grads()
    rollout.old_logps = rollout.old_logps + 3.0 * observation
    rollout.values = rollout.values + 5.0 * observation
    after = grads()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ------------------------------------------------------------------ the README's example, as a user runs it


def _readme_example() -> str:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block, = [b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if "calculator_env.py" in b]
    return block


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_readme_environment_runs_under_the_cli(tmp_path, tiny_qwen, arith_data, cli, stage):
    """The README's environment, saved as the README names it, trains via the CLI; its tool runs (the first turn
    is forced to call `add`, which a random model would never write), and its rewards are logged."""
    import json
    import shutil
    from pathlib import Path

    (tmp_path / "calculator_env.py").write_text(_readme_example())
    shutil.copy(Path(__file__).with_name("agent_helpers.py"), tmp_path / "agent_helpers.py")
    extra = ["--num_generations", "2"] if stage == "grpo" else ["--critic", "shared"]
    out = tmp_path / "out"
    result = cli(stage, "--model_name_or_path", tiny_qwen, "--dataset_name", arith_data["prompts"],
                 "--environment", "calculator_env:Calculator", "--reward_funcs", "calculator_env:solved",
                 "--max_turns", "2", "--max_completion_length", "160", "--per_device_train_batch_size", "2",
                 "--max_steps", "2", "--logging_steps", "1", "--output_dir", out, "--log_completions", "true",
                 "--rollout_engine", "agent_helpers:forced_call_engine", "--eval_dataset_name", arith_data["eval"],
                 "--eval_max_rows", "2", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert len(trained) == 2 and all(r["tools/call_frequency"] == 1.0 for r in trained)
    assert all(r["tools/failure_frequency"] == 0.0 and r["rewards/Calculator"] == pytest.approx(0.1) for r in trained)
    assert all("rewards/calculator_env:solved" in r and r["num_turns"] >= 1 for r in trained)
    assert any("eval/reward" in r for r in records)
    sample = json.loads((out / "completions.jsonl").read_text().splitlines()[0])
    assert '"name": "add"' in sample["completion"] and "<tool_response>\n5\n</tool_response>" in sample["completion"]


def test_environment_config_errors_are_one_line_user_errors(tmp_path, tiny_qwen, arith_data, cli):
    base = ["--model_name_or_path", tiny_qwen, "--dataset_name", arith_data["prompts"], "--output_dir", tmp_path / "o",
            "--max_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "2"]
    result = cli("grpo", *base, "--max_turns", "-1")
    assert result.returncode == 2 and "field 'max_turns' must be >= 0" in result.stderr
    result = cli("grpo", *base, "--environment", "no_such_module:Env")
    assert result.returncode == 2 and "environment: cannot import module 'no_such_module'" in result.stderr
    (tmp_path / "envs.py").write_text("class NoReward:\n    def reset(self, **row):\n        return None\n")
    result = cli("grpo", *base, "--environment", "envs:NoReward", cwd=tmp_path)
    assert result.returncode == 2 and "no reward source" in result.stderr, result.stderr[-500:]
    help_text = cli("grpo", "--help").stdout
    assert "--environment" in help_text and "--max_tool_response_length" in help_text


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_multi_turn_run_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_qwen, arith_data, stage):
    """SIGKILL after a checkpoint, then --resume_from_checkpoint latest: environments are rebuilt from their rows,
    and the final weights and losses equal an uninterrupted run's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from posttrain.metrics import read_metrics

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    extra = ["--num_generations", "2"] if stage == "grpo" else ["--critic", "shared", "--num_ppo_epochs", "1"]

    def command(out, *more):
        return [sys.executable, "-m", "posttrain", stage, "--model_name_or_path", str(tiny_qwen), "--dataset_name",
                str(arith_data["prompts"]), "--environment", "agent_helpers:Calculator", "--reward_funcs",
                "agent_helpers:printable_frac", "--rollout_engine", "agent_helpers:forced_call_engine",
                "--max_completion_length", "150", "--per_device_train_batch_size", "2", "--max_steps", "6",
                "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--num_threads", "1",
                "--progress", "false", "--seed", "0", "--output_dir", str(out), *extra, *more]

    full, broken = tmp_path / "full", tmp_path / "broken"
    assert subprocess.run(command(full), env=env, capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(command(broken), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(broken.glob("checkpoint-2")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (broken / "model.safetensors").exists(), "killed before the end"
    done = subprocess.run(command(broken, "--resume_from_checkpoint", "latest"), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_file(str(full / "model.safetensors")), load_file(str(broken / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] for out in (full, broken)]
    assert losses[0] == losses[1][-len(losses[0]):] and len(losses[0]) == 6
    assert all(r["tools/call_frequency"] == 1.0 for r in read_metrics(broken / "metrics.jsonl") if "loss" in r)


def test_multi_turn_grpo_with_lora(tmp_path, tiny_qwen, arith_data):
    """LoRA adapters train on tool-masked trajectories (the reference is the adapters switched off)."""
    from agent_helpers import run_recipe

    records = run_recipe("grpo", tmp_path, model_name_or_path=tiny_qwen, dataset_name=arith_data["prompts"],
                         environment="agent_helpers:Calculator", reward_funcs="agent_helpers:used_calculator",
                         rollout_engine="agent_helpers:scripted_engine", max_completion_length=150,
                         per_device_train_batch_size=2, num_generations=2, max_steps=2, logging_steps=1,
                         use_peft="true", lora_r=4, learning_rate=1e-2, beta=0.1)
    trained = [r for r in records if "loss" in r]
    assert len(trained) == 2 and trained[0]["tools/call_frequency"] == 0.5 and trained[0]["frac_reward_zero_std"] == 0.0
    assert trained[1]["kl"] > 0, "the adapters moved the policy away from the reference"
    assert (tmp_path / "adapter").is_dir()
