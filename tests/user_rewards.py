"""A user's own reward functions, referenced as `user_rewards:NAME` by tests/test_rewards.py."""

from __future__ import annotations

CALLS: list[dict] = []  # every call of `record_fields`, with its keyword arguments


def length(prompts, completions, **_):
    """Length of each completion in characters."""
    return [float(len(c)) for c in completions]


def record_fields(prompts, completions, **fields):
    CALLS.append({"prompts": prompts, "completions": completions, **fields})
    return [1.0 if c == a else 0.0 for c, a in zip(completions, fields["answer"])]


def explode_on_bad(prompts, completions, **_):
    for c in completions:
        if "bad" in c:
            raise ValueError(f"cannot score {c!r}")
    return [0.0] * len(completions)


def one_short(prompts, completions, **_):
    return [0.0] * (len(completions) - 1)


def not_numbers(prompts, completions, **_):
    return ["high"] * len(completions)


def returns_scalar(prompts, completions, **_):
    return 1.0


NOT_CALLABLE = 3
