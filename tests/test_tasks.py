"""The built-in arith task: its reward, its carry helpers and the statistics of its datasets."""

from __future__ import annotations

import json

import pytest

from posttrain.tasks import arith


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _operands(prompt: str) -> tuple[int, int]:
    assert prompt.endswith("=")
    a, b = prompt[:-1].split("+")
    return int(a), int(b)


# ------------------------------------------------------------------ reward


def test_exact_match_values():
    prompts = ["57+68="] * 6
    completions = ["125", " 125\n", "115", "1250", "", "12 5"]
    assert arith.exact_match(prompts, completions, answer=["125"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_exact_match_strips_the_answer_and_accepts_numbers():
    assert arith.exact_match(["1+2="], ["3"], answer=[" 3 "]) == [1.0]
    assert arith.exact_match(["1+2=", "2+2="], ["3", "5"], answer=[3, 4]) == [1.0, 0.0]


def test_exact_match_ignores_other_fields_and_needs_answer():
    assert arith.exact_match(["1+2="], ["3"], answer=["3"], level=[1]) == [1.0]
    with pytest.raises(ValueError, match="answer"):
        arith.exact_match(["1+2="], ["3"])


def test_exact_match_is_the_builtin_reward():
    from posttrain.rewards import BUILTIN

    assert BUILTIN["exact_match"] is arith.exact_match


# ------------------------------------------------------------------ carry helpers


@pytest.mark.parametrize("a,b,carry,dropped", [
    (57, 68, True, 115),   # 7+8=15 carries; 125 without the carry's 10
    (12, 34, False, 46),
    (15, 15, True, 20),    # 5+5=10 is a carry
    (19, 10, False, 29),   # 9+0=9 is not
    (99, 99, True, 188),
    (10, 10, False, 20),
    (91, 19, True, 100),   # 110 - 10
])
def test_has_carry_and_dropped_carry(a, b, carry, dropped):
    assert arith.has_carry(a, b) is carry
    assert arith.dropped_carry(a, b) == dropped
    assert (arith.dropped_carry(a, b) == a + b) is (not carry)


def test_prompt_of():
    assert arith.prompt_of(57, 68) == "57+68="


# ------------------------------------------------------------------ datasets


def test_sft_drops_the_carry_at_carry_error_rate(arith_data):
    rows = _rows(arith_data["sft"])
    assert len(rows) == 2000
    carry_total = carry_wrong = 0
    for row in rows:
        a, b = _operands(row["prompt"])
        completion = int(row["completion"])
        if arith.has_carry(a, b):
            carry_total += 1
            assert completion in (a + b, arith.dropped_carry(a, b)), row
            carry_wrong += completion != a + b
        else:
            assert completion == a + b, f"a row without a carry must be correct: {row}"
    assert carry_total > 500  # about 45% of two-digit pairs carry
    assert abs(carry_wrong / carry_total - 0.6) <= 0.05


def test_preference_chosen_correct_rejected_wrong(arith_data):
    rows = _rows(arith_data["preference"])
    assert len(rows) == 512
    carry_rows = 0
    for row in rows:
        a, b = _operands(row["prompt"])
        assert row["chosen"] == str(a + b)
        assert row["rejected"] != row["chosen"]
        if arith.has_carry(a, b):
            carry_rows += 1
            assert row["rejected"] == str(arith.dropped_carry(a, b))  # the taught habit
        else:
            assert abs(int(row["rejected"]) - (a + b)) in (1, 10)  # a near miss
    assert carry_rows / len(rows) >= 0.8  # four in five pairs target the carry


def test_prompt_rows_carry_the_answer(arith_data):
    for path in (arith_data["prompts"], arith_data["eval"]):
        for row in _rows(path):
            a, b = _operands(row["prompt"])
            assert set(row) == {"prompt", "answer"}
            assert row["answer"] == str(a + b)


def test_eval_pairs_are_held_out(arith_data):
    eval_prompts = {r["prompt"] for r in _rows(arith_data["eval"])}
    assert len(eval_prompts) == 64  # distinct pairs
    for role in ("sft", "preference", "prompts"):
        assert not eval_prompts & {r["prompt"] for r in _rows(arith_data[role])}, role


def test_write_datasets_is_a_function_of_the_seed(tmp_path):
    sizes = dict(num_sft=200, num_preference=50, num_prompts=50, num_eval=20)
    a = arith.write_datasets(tmp_path / "a", seed=3, **sizes)
    b = arith.write_datasets(tmp_path / "b", seed=3, **sizes)
    c = arith.write_datasets(tmp_path / "c", seed=4, **sizes)
    assert set(a) == {"sft", "preference", "prompts", "eval"}
    for role in a:
        assert a[role].name == arith.FILES[role]
        assert a[role].read_bytes() == b[role].read_bytes()
    assert a["sft"].read_bytes() != c["sft"].read_bytes()


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_carry_error_rate_extremes(tmp_path, rate):
    paths = arith.write_datasets(tmp_path, seed=1, carry_error_rate=rate, num_sft=300, num_preference=10,
                                 num_prompts=10, num_eval=10)
    for row in _rows(paths["sft"]):
        a, b = _operands(row["prompt"])
        expected = arith.dropped_carry(a, b) if rate == 1.0 else a + b
        assert int(row["completion"]) == expected
