"""Reward sources for PPO, GRPO and eval: rule functions and reward models.

A rule reward is called on a batch: ``f(prompts, completions, **fields) ->
list[float]``, where ``fields`` are the prompt rows' extra columns as lists
(e.g. ``answer``). Built-ins: ``exact_match`` (the arith task's verifiable
reward) and ``think_format`` (a bonus for a non-empty reasoning block,
as in DeepSeek-R1's format reward), and TRL's ``accuracy_reward`` and
``think_format_reward``. ``module:function`` (or TRL's dotted
``module.function``) names one of your own. A reward model folder scores
prompt + completion with its scalar head, re-rendered from the raw prompt and
the completion text with its own tokenizer exactly as RM training renders a
row, so the score is read at the token it was trained on; a completion cut at
max_completion_length (no EOS) is scored as sampled, without the EOS or end of
turn it never produced. Sources are weighted and summed, clipped to
``[-reward_clip, reward_clip]`` when reward_clip > 0 (not by default, as in
TRL), and ``missing_eos_penalty`` is subtracted from truncated completions.

The contract of a rule reward: it is called exactly once per batch (never again
row by row: it may have side effects or cost money) and returns a list or tuple
of one finite real number per completion (``bool``, ``"1.5"``, None, NaN and
inf are errors). Raising, breaking that, a built-in's row without its field
(``answer`` for exact_match) and running past ``reward_timeout_s`` are a
RewardError (exit code 2) naming the function, and the row where it is known;
with ``reward_on_error`` a number, the offending rows (the whole batch when the
call failed) are scored with it instead and flagged in ``rewards/errors``.
``check_required_fields`` rejects a prompt file whose rows lack a built-in's
field, by file:line, before training starts.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import math
import numbers
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain import distributed
from posttrain.config import parse_on_error  # noqa: F401 - re-exported: part of the reward contract
from posttrain.data import Example, collate_examples, encode_prompt, encode_response
from posttrain.errors import UserError
from posttrain.tasks.arith import exact_match

THINK_BLOCK = re.compile(r"<think>.+?</think>", re.DOTALL)


def think_format(prompts: list[str], completions: list[str], **_) -> list[float]:
    """0.5 when a completion contains a non-empty <think>...</think> block, else 0."""
    return [0.5 if THINK_BLOCK.search(c) else 0.0 for c in completions]


def accuracy_reward(prompts: list[str], completions: list[str], solution: list | None = None,
                    answer: list | None = None, **_) -> list[float]:
    """TRL's name, posttrain's exact match: 1.0 when the completion, stripped, equals the row's `solution`
    (or, where it has none, its `answer`), else 0.0. No math parsing: `1/2` and `0.5` differ."""
    solution, answer = solution or [None] * len(completions), answer or [None] * len(completions)
    gold = [s if s is not None else a for s, a in zip(solution, answer)]
    if any(g is None for g in gold):
        row = next(i for i, g in enumerate(gold) if g is None)
        raise ValueError(f"accuracy_reward needs a `solution` or `answer` field in every prompt row (row {row + 1} has none)")
    return [float(c.strip() == str(g).strip()) for c, g in zip(completions, gold)]


def think_format_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """TRL's format reward: 1.0 when a completion opens with one <think>...</think> block (and holds no other
    <think>), else 0.0."""
    return [float(c.startswith("<think>") and c.count("<think>") == 1 and "</think>" in c) for c in completions]


BUILTIN = {"exact_match": exact_match, "think_format": think_format, "accuracy_reward": accuracy_reward,
           "think_format_reward": think_format_reward}


def resolve_reward_func(name: str) -> Callable:
    """A built-in name, or `module:function` (or TRL's dotted `module.function`) importable from the working directory."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name and "." not in name:
        raise UserError(f"reward_funcs: unknown reward {name!r}; built-ins: {', '.join(BUILTIN)}; "
                        "or give module:function")
    return resolve_callable(name, "reward_funcs")


def resolve_callable(name: str, field: str) -> Callable:
    """`module:function` or `package.module.function`, imported from the working directory (for `posttrain` as
    for `python -m posttrain`)."""
    module_name, _, func_name = name.partition(":") if ":" in name else name.rpartition(".")
    if not module_name or not func_name:
        raise UserError(f"{field}: {name!r} is not of the form module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"{field}: cannot import module {module_name!r} ({err})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"{field}: {module_name!r} has no function {func_name!r}")
    return func


@dataclass
class RewardSource:
    name: str
    weight: float
    func: Callable | None = None  # rule reward
    model: torch.nn.Module | None = None  # reward model (AutoModelForSequenceClassification)
    tokenizer: object | None = None  # the reward model's own tokenizer (the one it was trained with)
    path: str = ""  # the reward model's folder, for messages
    warned: bool = field(default=False, repr=False)  # reward_on_error a number: the first failure was printed


class RewardError(UserError):
    """A reward function or model broke the contract: raised, returned a non-number, or ran past the timeout."""


# What each built-in reads from a prompt row: checked before training (check_required_fields) and on every batch.
REQUIRED_FIELDS = {"exact_match": ("answer",)}


def parse_timeout(value, field: str = "reward_timeout_s") -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds >= 0 or math.isinf(seconds):
        raise UserError(f"field {field!r} must be a number of seconds >= 0 (0: no limit), got {value!r}")
    return seconds


def check_required_fields(reward_funcs: list[str], examples: list, sources: list[str] | None = None) -> None:
    """Before training: every prompt row holds the fields the built-in rewards read (``answer`` for exact_match).

    ``examples`` are ``PromptExample``s (their ``extra`` dicts are checked);
    ``sources`` the rows' "file:line" (``[row.source for row in rows]``, the
    rows ``prompt_examples`` was given), named in the error.
    """
    if sources is not None and len(sources) != len(examples):
        raise ValueError(f"check_required_fields: {len(sources)} sources for {len(examples)} prompt rows")
    for name in reward_funcs:
        for needed in REQUIRED_FIELDS.get(str(name), ()):
            for i, example in enumerate(examples):
                where = sources[i] if sources is not None else f"prompt row {i + 1}"
                if needed not in example.extra:
                    raise UserError(f"{where}: field {needed!r} is missing (needed by reward {name})")
                if example.extra[needed] is None:
                    raise UserError(f"{where}: field {needed!r} is null (needed by reward {name})")


def _short(text, limit: int = 60) -> str:
    """``text`` shortened for a one-line message: its start and end (a chat prompt's end is its last turn)."""
    text = str(text)
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def _where(err: BaseException) -> str:
    """` at file:line` of the innermost frame of ``err``'s traceback (where the user's code raised), or ""."""
    frames = traceback.extract_tb(err.__traceback__)
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


def _is_number(value) -> bool:
    """A finite real number: not a bool, not a string like "1.5", not None, NaN or ±inf."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


class RewardTimeout(RewardError):
    pass


def run_with_timeout(fn: Callable, timeout_s: float, what: str, batch: int):
    """``fn()``, or RewardTimeout when it runs past ``timeout_s`` seconds (0: call it directly, no limit).

    It runs in a worker thread the caller waits on with a timeout. A thread
    cannot be killed, so one that never returns stays behind: the error stops
    the run (the CLI exits with code 2 after a UserError) and the process exit
    ends it. The thread is a daemon for that reason: a
    ``ThreadPoolExecutor``'s workers are joined at interpreter exit, so a hung
    reward function would keep the process from exiting. With
    ``reward_on_error`` a number the run goes on and the hung call keeps its
    thread (and any device memory it holds) until it returns.
    """
    if not timeout_s:
        return fn()
    future: concurrent.futures.Future = concurrent.futures.Future()
    grad = torch.is_grad_enabled()  # grad mode and the current CUDA device are per thread: carry them over
    cuda_device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def work():
        if not future.set_running_or_notify_cancel():
            return
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)
            with torch.set_grad_enabled(grad):
                result = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller, which reports it
            future.set_exception(err)
        else:
            future.set_result(result)

    threading.Thread(target=work, name=f"posttrain reward {what}", daemon=True).start()
    # wait() rather than result(timeout=): a function that raises TimeoutError itself is an error of its own
    done, _ = concurrent.futures.wait([future], timeout=timeout_s)
    if not done:
        raise RewardTimeout(f"{what} took longer than reward_timeout_s={timeout_s:g} s on a batch of {batch} completions")
    return future.result()


def call_reward_func(source: RewardSource, prompts: list[str], completions: list[str], extras: list[dict],
                     on_error: float | None = None, timeout_s: float = 0.0,
                     environments: list | None = None) -> tuple[list[float], list[bool]]:
    """Run one rule reward once on the batch: (values, errors), one of each per completion.

    The function is called exactly once (it may have side effects or cost
    money). Every way it can break the contract -- raising, running past
    ``timeout_s``, returning something other than a list of one finite real
    number per completion (``bool``, ``"1.5"``, None, NaN and inf are not), or a
    built-in's row missing its field -- is a RewardError naming the function
    (and the row, where the row is known) when ``on_error`` is None. With
    ``on_error`` a number, each offending row (every row, when the call
    itself failed) is scored ``on_error`` instead and flagged in ``errors``.
    ``environments`` (multi-turn rollouts: one environment instance per
    completion) is passed on as the keyword ``environments``, as TRL does.
    """
    n = len(completions)
    what = f"reward function {source.name!r}"
    errors = [False] * n

    def at_row(i: int) -> str:
        return f"row {i} (prompt {_short(prompts[i])!r}, completion {_short(completions[i], 40)!r})"

    def failed(message: str, rows: list[int]) -> None:
        if on_error is None:
            raise RewardError(message)
        if not source.warned:
            source.warned = True
            print(f"posttrain: warning: {message}; scoring reward_on_error={on_error:g} instead "
                  "(these and later failures are counted in rewards/errors)", file=sys.stderr)
        for i in rows:
            errors[i] = True

    for name in _required_fields(source):
        missing = [i for i, extra in enumerate(extras) if extra.get(name) is None]
        if missing:
            failed(f"{what} needs field {name!r} in every prompt row; {at_row(missing[0])} has none"
                   + (f" ({len(missing)} rows of {n})" if len(missing) > 1 else ""), missing)

    columns = {k: [row.get(k) for row in extras] for row in extras for k in row}
    if environments is not None:
        columns["environments"] = environments
    try:
        values = run_with_timeout(lambda: source.func(prompts=prompts, completions=completions, **columns),
                                  timeout_s, what, n)
    except RewardTimeout as err:
        failed(str(err), list(range(n)))
        return [on_error] * n, errors
    except Exception as err:  # noqa: BLE001 - user code: report it, do not crash deep inside
        detail = " ".join(str(err).split())  # one line
        failed(f"{what} raised {type(err).__name__}: {_short(detail, 200)}{_where(err)}; it was called once on a batch of "
               f"{n} completions, so which row failed is not known", list(range(n)))
        return [on_error] * n, errors
    if not isinstance(values, (list, tuple)):
        failed(f"{what} returned {type(values).__name__} {_short(repr(values), 40)}: it must return a list of {n} "
               "numbers, one per completion", list(range(n)))
        return [on_error] * n, errors
    if len(values) != n:
        failed(f"{what} returned {len(values)} values for {n} completions: it must return one number per completion",
               list(range(n)))
        return [on_error] * n, errors
    bad = [i for i, v in enumerate(values) if not _is_number(v)]
    if bad:
        v = values[bad[0]]
        failed(f"{what} returned {_short(repr(v), 40)} ({type(v).__name__}) for {at_row(bad[0])}: rewards must be finite "
               "numbers" + (f" ({len(bad)} such rows of {n})" if len(bad) > 1 else ""), bad)
    return [on_error if errors[i] else float(v) for i, v in enumerate(values)], errors


def _required_fields(source: RewardSource) -> tuple[str, ...]:
    """The fields a built-in reads (by its name, when the source is that built-in)."""
    return REQUIRED_FIELDS.get(source.name, ()) if BUILTIN.get(source.name) is source.func else ()


def rendered_sequences(tokenizer, raw_prompts: list[str | list[dict]], completions: list[str],
                       truncated: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask) (B, L) of each prompt + completion, rendered as in RM training.

    The same data path as an RM training row (encode_prompt + encode_response,
    collated by collate_examples): a chat prompt's completion becomes its
    templated assistant turn (ending ``<|im_end|>\n`` in ChatML), a text
    prompt's completion gets EOS. Sampled ids would end at the EOS instead,
    one token away from where the reward model learned to put its score.
    A ``truncated`` row (no EOS sampled) is the rendered prompt + the
    completion's own tokens: an unfinished answer is not scored as finished.
    """
    truncated = [False] * len(completions) if truncated is None else [bool(t) for t in truncated]
    examples = [Example(encode_prompt(tokenizer, prompt), encode_response(tokenizer, prompt, completion, finished=not cut))
                for prompt, completion, cut in zip(raw_prompts, completions, truncated)]
    batch = collate_examples(examples, tokenizer.pad_token_id)
    return batch.input_ids, batch.attention_mask


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


class RewardSources:
    """All reward sources of a run; ``score`` gives the weighted, clipped, EOS-penalised total and each part.

    ``on_error``: None (``reward_on_error: raise``) makes any broken reward
    function a RewardError; a number scores each failed row of a source with
    it instead (that source's value, weighted like any other) and adds
    ``rewards/errors`` to the parts. ``timeout_s`` bounds each rule call and
    each reward-model scoring call (0: no limit); a reward model's timeout
    stops a distributed run whatever ``on_error`` says. ``missing_eos_penalty``
    is subtracted from the total of each truncated completion (TRL's option).
    """

    def __init__(self, sources: list[RewardSource], clip: float, tokenizer=None, on_error: float | None = None,
                 timeout_s: float = 0.0, missing_eos_penalty: float = 0.0):
        self.sources, self.clip, self.tokenizer = sources, clip, tokenizer
        self.on_error, self.timeout_s, self.missing_eos_penalty = on_error, timeout_s, missing_eos_penalty

    @classmethod
    def from_config(cls, cfg, tokenizer) -> RewardSources:
        from posttrain.models import load_scalar_model, load_tokenizer, require_scalar_head

        on_error, timeout_s = parse_on_error(cfg.reward_on_error), parse_timeout(cfg.reward_timeout_s)
        names = list(cfg.reward_funcs)
        weights = list(cfg.reward_weights) or [1.0] * (len(names) + bool(cfg.reward_model_name_or_path))
        sources = [RewardSource(n, float(w), func=resolve_reward_func(n)) for n, w in zip(names, weights)]
        if cfg.reward_model_name_or_path:
            path, field = cfg.reward_model_name_or_path, "reward_model_name_or_path"
            require_scalar_head(path, field)
            model = distributed.wrap(load_scalar_model(path, field, trainable=False), cfg.fsdp, cfg.bf16, frozen=True)
            rm_tokenizer = load_tokenizer(path, field) if _has_tokenizer(path) else tokenizer
            sources.append(RewardSource("reward_model", float(weights[len(names)]), model=model, tokenizer=rm_tokenizer,
                                        path=str(path)))
        if getattr(cfg, "environment", ""):  # an environment's get_reward(): a source of weight 1, as in TRL
            from posttrain.environments import environment_reward_source

            sources += [s for s in [environment_reward_source(cfg.environment)] if s is not None]
        if not sources:
            raise UserError("no reward source: set reward_funcs or reward_model_name_or_path (or give the environment "
                            "a get_reward method)")
        return cls(sources, cfg.reward_clip, tokenizer, on_error=on_error, timeout_s=timeout_s,
                   missing_eos_penalty=cfg.missing_eos_penalty)

    @property
    def models(self) -> list[torch.nn.Module]:
        return [s.model for s in self.sources if s.model is not None]

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str], extras: list[dict],
              raw_prompts: list[str | list[dict]] | None = None,
              truncated: torch.Tensor | None = None,
              environments: list | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B,) total reward and {"rewards/<name>": (B,)} per source (+ "rewards/errors", 0/1 per row, when
        ``on_error`` is a number: its mean is the share of rows some source failed on).

        ``prompts`` are the texts rule rewards see; ``raw_prompts`` are the
        rows' own prompts (a string or a list of messages, ``PromptExample.prompt``),
        which reward models need to re-render each row as RM training did.
        ``truncated`` (B,) bool (``Generation.truncated``; None: all finished)
        marks completions without EOS: reward models score them without one,
        and the total of each loses ``missing_eos_penalty``. ``environments``
        (one instance per completion, multi-turn rollouts) reach rule rewards
        as the keyword ``environments``.
        """
        truncated = torch.zeros(len(completions), dtype=torch.bool) if truncated is None else truncated.bool().cpu()
        parts = {}
        total = torch.zeros(len(completions))
        errors = torch.zeros(len(completions))
        for source in self.sources:
            if source.func is not None:
                values, failed = call_reward_func(source, prompts, completions, extras, self.on_error, self.timeout_s,
                                                 environments)
                values, failed = torch.tensor(values, dtype=torch.float32), torch.tensor(failed, dtype=torch.bool)
            else:
                values, failed = self.model_scores(source, raw_prompts, completions, truncated)
            errors = torch.maximum(errors, failed.float())
            parts[f"rewards/{source.name}"] = values
            total += source.weight * values
        if self.clip > 0:
            total = total.clamp(-self.clip, self.clip)
        if self.missing_eos_penalty:  # after the clip, so a clipped score still pays it (TRL subtracts it last)
            total = total - self.missing_eos_penalty * truncated.float()
        if self.on_error is not None:
            parts["rewards/errors"] = errors
        return total, parts

    def model_scores(self, source: RewardSource, raw_prompts: list[str | list[dict]] | None, completions: list[str],
                     truncated: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) scores of one reward model on the rendered rows (``truncated`` ones without EOS), read at each
        row's last real token, and (B,) bool: the rows scored ``on_error`` because the call ran past the
        timeout (all or none)."""
        from posttrain.models import sequence_scores

        if raw_prompts is None or len(raw_prompts) != len(completions):
            raise ValueError(f"reward source {source.name!r} is a reward model: score() needs raw_prompts, "
                             "one raw prompt (a string or a list of messages) per completion")
        n = len(completions)

        def run() -> torch.Tensor:
            ids, mask = rendered_sequences(source.tokenizer or self.tokenizer, raw_prompts, completions,
                                           None if truncated is None else truncated.tolist())
            device = source.model.device
            return sequence_scores(source.model, ids.to(device), mask.to(device)).float().cpu()

        try:
            scores = run_with_timeout(run, self.timeout_s, f"reward model {source.path or source.name!r}", n)
        except RewardTimeout as err:
            if self.on_error is None:
                raise
            if distributed.is_distributed():  # the call left running would issue FSDP/NCCL collectives out of step
                raise RewardTimeout(f"{err} (in a distributed run this stops the run even with reward_on_error set: "
                                    "the unfinished scoring call would go on communicating with the other ranks)") from None
            if not source.warned:
                source.warned = True
                print(f"posttrain: warning: {err}; scoring reward_on_error={self.on_error:g} instead "
                      "(these and later failures are counted in rewards/errors)", file=sys.stderr)
            return torch.full((n,), self.on_error), torch.ones(n, dtype=torch.bool)
        return scores, torch.zeros(n, dtype=torch.bool)
