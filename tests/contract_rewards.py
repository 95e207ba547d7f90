"""Reward functions for tests/test_reward_contract.py (as `contract_rewards:NAME`): each keeps or breaks the
reward-function contract in one way, and records every call it gets."""

from __future__ import annotations

import threading
import time

CALLS: list[list[str]] = []  # the completions of every call, in call order
THREADS: list[str] = []  # the thread each call ran in
BAD_ROW = 2
BAD_VALUE: object = None  # what `one_bad_value` returns for row BAD_ROW; tests set it
SLEEP_S = 2.0


def _record(completions) -> None:
    CALLS.append(list(completions))
    THREADS.append(threading.current_thread().name)


def lengths(prompts, completions, **_):
    """A well-behaved reward with a side effect: the length of each completion."""
    _record(completions)
    return [float(len(c)) for c in completions]


def side_effect_then_raise(prompts, completions, **_):
    _record(completions)
    raise RuntimeError("scoring service said no\n(second line)")


def one_bad_value(prompts, completions, **_):
    _record(completions)
    values = [float(i) for i in range(len(completions))]
    values[BAD_ROW] = BAD_VALUE
    return values


def numpy_like_values(prompts, completions, **_):
    """Ints and numpy floats are real numbers."""
    import numpy as np

    return [int(i) if i % 2 else np.float32(i) for i in range(len(completions))]


def wrong_length(prompts, completions, **_):
    _record(completions)
    return [1.0] * (len(completions) + 1)


def a_generator(prompts, completions, **_):
    return (1.0 for _ in completions)


def sleepy(prompts, completions, **_):
    _record(completions)
    time.sleep(SLEEP_S)
    return [1.0] * len(completions)


def own_timeout_error(prompts, completions, **_):
    """Raises TimeoutError itself, quickly: an error of the function, not a reward_timeout_s overrun."""
    raise TimeoutError("the grader's HTTP call timed out")
