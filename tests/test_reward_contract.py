"""The reward-function contract (posttrain.rewards), on real RewardSources built by from_config.

The functions live in tests/contract_rewards.py, imported as `contract_rewards:NAME` the way a user's own
module is; the working-directory import itself is tested with a module written into a temporary folder.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.data import prompt_examples, read_rows
from posttrain.errors import UserError
from posttrain.models import load_tokenizer
from posttrain.rewards import RewardError, check_required_fields, parse_on_error, parse_timeout, resolve_callable

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PROMPTS = ["12+34=", "5+5=", "99+1=", "<|im_start|>user\n" + "a long prompt " * 10 + "<|im_end|>\n<|im_start|>assistant\n"]
COMPLETIONS = ["46", "10", "100", "x"]
EXTRAS = [{"answer": "46"}, {"answer": "11"}, {"answer": "100"}, {"answer": "y"}]


@pytest.fixture(autouse=True)
def helpers(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    import contract_rewards

    contract_rewards.CALLS.clear()
    contract_rewards.THREADS.clear()
    return contract_rewards


def sources(**fields):
    from posttrain.rewards import RewardSources

    overrides = {"dataset_name": "unused.jsonl", "reward_clip": "0"}
    overrides.update({k: str(v) for k, v in fields.items()})
    return RewardSources.from_config(load_config("grpo", None, overrides), None)


def score(rewards, n: int = 4):
    return rewards.score(PROMPTS[:n], COMPLETIONS[:n], EXTRAS[:n])


# ------------------------------------------------------------------ 1. once per batch


@pytest.mark.parametrize("timeout", ["0", "5"])  # direct call, and in the worker thread
def test_called_once_per_batch(helpers, timeout):
    rewards = sources(reward_funcs="contract_rewards:lengths", reward_timeout_s=timeout)
    total, parts = score(rewards)
    assert parts["rewards/contract_rewards:lengths"].tolist() == [2.0, 2.0, 3.0, 1.0]
    assert total.tolist() == [2.0, 2.0, 3.0, 1.0]
    assert helpers.CALLS == [COMPLETIONS]
    assert "rewards/errors" not in parts  # reward_on_error: raise -> nothing to count
    assert (helpers.THREADS[0] == "MainThread") == (timeout == "0")  # 0: no thread at all


@pytest.mark.parametrize("on_error", ["raise", "0"])
def test_raising_function_is_called_once_and_named(helpers, on_error, capsys):
    rewards = sources(reward_funcs="contract_rewards:side_effect_then_raise", reward_on_error=on_error)
    if on_error == "raise":
        with pytest.raises(RewardError) as info:
            score(rewards)
        message = str(info.value)
        assert message.startswith("reward function 'contract_rewards:side_effect_then_raise' raised RuntimeError: "
                                  "scoring service said no (second line) at contract_rewards.py:")
        assert "called once on a batch of 4 completions" in message
        assert "\n" not in message
        assert isinstance(info.value, UserError)  # the CLI's exit code 2
    else:
        total, parts = score(rewards)
        assert total.tolist() == [0.0] * 4  # the whole batch: which row failed is not known
        assert parts["rewards/errors"].tolist() == [1.0] * 4
        assert "warning: reward function 'contract_rewards:side_effect_then_raise' raised" in capsys.readouterr().err
    assert helpers.CALLS == [COMPLETIONS]  # once, never again row by row


# ------------------------------------------------------------------ 2. what it returns


@pytest.mark.parametrize("value, shown", [
    (True, "True (bool)"), ("1.5", "'1.5' (str)"), (None, "None (NoneType)"),
    (math.nan, "nan (float)"), (math.inf, "inf (float)"), (-math.inf, "-inf (float)"), (10**400, "(int)"),
])
def test_non_numbers_are_rejected_naming_function_row_and_value(helpers, monkeypatch, value, shown):
    monkeypatch.setattr(helpers, "BAD_VALUE", value)
    rewards = sources(reward_funcs="contract_rewards:one_bad_value")
    with pytest.raises(RewardError) as info:
        score(rewards)
    message = str(info.value)
    assert message.startswith("reward function 'contract_rewards:one_bad_value' returned ")
    assert shown in message
    assert "for row 2 (prompt '99+1=', completion '100'): rewards must be finite numbers" in message
    assert "\n" not in message
    assert helpers.CALLS == [COMPLETIONS]


def test_a_long_prompt_is_shortened_to_its_start_and_end(helpers, monkeypatch):
    monkeypatch.setattr(helpers, "BAD_ROW", 3)
    rewards = sources(reward_funcs="contract_rewards:one_bad_value")
    with pytest.raises(RewardError, match=r"for row 3 \(prompt '<\|im_start\|>user\\na long.*….*<\|im_start\|>assistant\\n'"):
        score(rewards)


def test_ints_and_numpy_floats_are_numbers():
    _, parts = score(sources(reward_funcs="contract_rewards:numpy_like_values"))
    assert parts["rewards/contract_rewards:numpy_like_values"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("name, fragment", [
    ("wrong_length", "returned 5 values for 4 completions"),
    ("a_generator", "returned generator <generator object"),
])
def test_not_a_list_of_the_right_length(helpers, name, fragment):
    with pytest.raises(RewardError, match=f"reward function 'contract_rewards:{name}' {fragment}"):
        score(sources(reward_funcs=f"contract_rewards:{name}"))


# ------------------------------------------------------------------ 3. reward_on_error


def test_on_error_scores_the_bad_rows_and_counts_them(helpers, monkeypatch, capsys):
    monkeypatch.setattr(helpers, "BAD_VALUE", math.nan)
    rewards = sources(reward_funcs="exact_match,contract_rewards:one_bad_value", reward_weights="1.0,2.0",
                      reward_on_error="0")
    total, parts = score(rewards)
    assert parts["rewards/exact_match"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert parts["rewards/contract_rewards:one_bad_value"].tolist() == [0.0, 1.0, 0.0, 3.0]  # row 2 scored 0
    assert parts["rewards/errors"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert total.tolist() == [1.0, 2.0, 1.0, 6.0]
    logged = {k: float(v.mean()) for k, v in parts.items()}  # what the recipes log
    assert logged["rewards/errors"] == 0.25
    assert "returned nan (float) for row 2" in capsys.readouterr().err  # the first failure is shown once...
    score(rewards)
    assert capsys.readouterr().err == ""  # ...later ones are only counted
    assert len(helpers.CALLS) == 2


def test_on_error_negative_scores_a_failed_batch(helpers):
    rewards = sources(reward_funcs="exact_match,contract_rewards:wrong_length", reward_on_error="-1")
    total, parts = score(rewards)
    assert parts["rewards/contract_rewards:wrong_length"].tolist() == [-1.0] * 4
    assert parts["rewards/errors"].tolist() == [1.0] * 4
    assert total.tolist() == [0.0, -1.0, 0.0, -1.0]


def test_on_error_with_no_failure_logs_a_zero_error_rate():
    _, parts = score(sources(reward_funcs="contract_rewards:lengths", reward_on_error="0.5"))
    assert parts["rewards/errors"].tolist() == [0.0] * 4


@pytest.mark.parametrize("field, value", [
    ("reward_on_error", "zero"), ("reward_on_error", "nan"), ("reward_on_error", "inf"), ("reward_on_error", ""),
    ("reward_timeout_s", "-1"), ("reward_timeout_s", "inf"),
])
def test_invalid_on_error_or_timeout_names_the_field(field, value):
    with pytest.raises(UserError, match=f"field '{field}'"):
        sources(reward_funcs="exact_match", **{field: value})


@pytest.mark.parametrize("field, value", [("reward_on_error", "zero"), ("reward_on_error", None),
                                          ("reward_timeout_s", -0.5), ("reward_timeout_s", math.nan)])
def test_from_config_checks_the_values_itself(field, value):
    """Even on a config that did not come through load_config's checks (a config object built in code)."""
    from posttrain.rewards import RewardSources

    cfg = load_config("grpo", None, {"dataset_name": "unused.jsonl", "reward_funcs": "exact_match"})
    setattr(cfg, field, value)
    with pytest.raises(UserError, match=f"field '{field}'"):
        RewardSources.from_config(cfg, None)


def test_parse_on_error_and_timeout():
    assert parse_on_error("raise") is None and parse_on_error(" Raise ") is None
    assert parse_on_error("0") == 0.0 and parse_on_error("-1") == -1.0 and parse_on_error(2) == 2.0
    assert parse_timeout("0") == 0.0 and parse_timeout(2) == 2.0
    for bad in ("zero", "", "nan", "-inf", True, None):
        with pytest.raises(UserError):
            parse_on_error(bad)


# ------------------------------------------------------------------ 4. reward_timeout_s


def test_slow_function_is_reported_not_waited_on(helpers):
    rewards = sources(reward_funcs="contract_rewards:sleepy", reward_timeout_s="0.5")
    start = time.monotonic()
    with pytest.raises(RewardError) as info:
        score(rewards)
    assert time.monotonic() - start < 1.5  # not the 2 s the function sleeps
    assert str(info.value) == ("reward function 'contract_rewards:sleepy' took longer than reward_timeout_s=0.5 s "
                               "on a batch of 4 completions")
    assert helpers.CALLS == [COMPLETIONS]


def test_slow_function_with_on_error_scores_the_batch(helpers, monkeypatch):
    monkeypatch.setattr(helpers, "SLEEP_S", 1.0)
    rewards = sources(reward_funcs="exact_match,contract_rewards:sleepy", reward_timeout_s="0.2", reward_on_error="-1")
    total, parts = score(rewards)
    assert parts["rewards/contract_rewards:sleepy"].tolist() == [-1.0] * 4
    assert parts["rewards/errors"].tolist() == [1.0] * 4
    assert parts["rewards/exact_match"].tolist() == [1.0, 0.0, 1.0, 0.0]  # the other source still scores


def test_a_function_raising_timeout_error_itself_is_its_own_error():
    rewards = sources(reward_funcs="contract_rewards:own_timeout_error", reward_timeout_s="5")
    with pytest.raises(RewardError, match="raised TimeoutError: the grader's HTTP call timed out"):
        score(rewards)


def test_a_hung_function_does_not_keep_the_process_from_exiting(tmp_path):
    """The worker thread cannot be killed; after the error the process exits anyway (no join at exit)."""
    (tmp_path / "hangs.py").write_text("import time\n\ndef score(prompts, completions, **_):\n    time.sleep(600)\n")
    script = (
        "import sys\n"
        "from posttrain.errors import UserError\n"
        "from posttrain.rewards import RewardSource, RewardSources, resolve_reward_func\n"
        "r = RewardSources([RewardSource('hangs:score', 1.0, func=resolve_reward_func('hangs:score'))], 0, timeout_s=0.3)\n"
        "try:\n"
        "    r.score(['p'], ['c'], [{}])\n"
        "except UserError as err:\n"
        "    print(err, file=sys.stderr)\n"
        "    sys.exit(2)\n"
    )
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert done.returncode == 2, done.stderr
    assert "reward function 'hangs:score' took longer than reward_timeout_s=0.3 s on a batch of 1 completions" in done.stderr
    assert time.monotonic() - start < 100  # far from the 600 s the function sleeps


# ------------------------------------------------------------------ 5. module:function from the working directory


MYREWARD = "def score(prompts, completions, **_):\n    return [float(len(c)) for c in completions]\n"


@pytest.fixture
def myreward_dir(tmp_path, monkeypatch):
    """A folder holding myreward_cwd.py, the working directory, and not on sys.path."""
    (tmp_path / "myreward_cwd.py").write_text(MYREWARD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "myreward_cwd", raising=False)
    yield tmp_path
    sys.modules.pop("myreward_cwd", None)


def test_module_function_imports_from_the_working_directory(myreward_dir):
    func = resolve_callable("myreward_cwd:score", "reward_funcs")
    assert func(["p"], ["abc"]) == [3.0]
    assert Path(func.__code__.co_filename).parent == myreward_dir


def test_module_function_imports_from_the_working_directory_in_a_fresh_process(tmp_path):
    (tmp_path / "myreward.py").write_text(MYREWARD)
    code = ("import sys; from posttrain.rewards import resolve_reward_func; "
            "assert not any(p in ('', '.') for p in sys.path), sys.path; "
            "print(resolve_reward_func('myreward:score')(['p'], ['abcd']))")
    # PYTHONSAFEPATH: python does not put the working directory on sys.path itself (as for the console script)
    env = dict(os.environ, PYTHONSAFEPATH="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[4.0]"


# ------------------------------------------------------------------ 6. fields a built-in needs


@pytest.fixture
def prompt_file(tmp_path):
    def write(rows) -> str:
        path = tmp_path / "prompts.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    return write


@pytest.mark.parametrize("bad, fragment", [
    ({"prompt": "3+3="}, "prompts.jsonl:3: field 'answer' is missing (needed by reward exact_match)"),
    ({"prompt": "3+3=", "answer": None}, "prompts.jsonl:3: field 'answer' is null (needed by reward exact_match)"),
])
def test_a_row_without_the_answer_is_named_by_file_and_line(prompt_file, tiny_qwen, bad, fragment):
    rows = read_rows(prompt_file([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": 4}, bad]))
    examples = prompt_examples(rows, load_tokenizer(str(tiny_qwen)), 32)
    with pytest.raises(UserError) as info:
        check_required_fields(["think_format", "exact_match"], examples, [r.source for r in rows])
    assert str(info.value).endswith(fragment)
    check_required_fields(["think_format", "contract_rewards:lengths"], examples, [r.source for r in rows])  # no needs
    check_required_fields(["exact_match"], examples[:2], [r.source for r in rows[:2]])  # the good rows pass


def test_exact_match_at_scoring_time_never_matches_a_missing_answer(capsys):
    """A None answer is a failed row, not the text "None" (arith.exact_match alone would compare str(None))."""
    extras = [{"answer": "46"}, {"answer": None}, {}]
    with pytest.raises(RewardError, match=r"reward function 'exact_match' needs field 'answer' in every prompt row; "
                                          r"row 1 \(prompt '5\+5=', completion 'None'\) has none \(2 rows of 3\)"):
        sources(reward_funcs="exact_match").score(PROMPTS[:3], ["46", "None", "None"], extras)
    total, parts = sources(reward_funcs="exact_match", reward_on_error="0").score(PROMPTS[:3], ["46", "None", "None"], extras)
    assert parts["rewards/exact_match"].tolist() == [1.0, 0.0, 0.0]
    assert parts["rewards/errors"].tolist() == [0.0, 1.0, 1.0]
