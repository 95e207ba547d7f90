"""Environments and tools for multi-turn rollouts: the user API, tool schemas, tool-call parsing, running tools.

The API is TRL's ``environment_factory`` in its simplest shape. An environment
(``environment: module:Class``) is a class with a no-argument constructor and
``reset(**row) -> str | None``; one instance is made per trajectory and reset
with the prompt row's fields (an optional first observation, appended to the
prompt's last user turn). Its public methods are the tools the model may call:
each one's typed signature and Google-style docstring become the JSON schema
given to the chat template's ``tools=``. An optional ``get_reward() -> float``
makes the environment a reward source of its own (weight 1, ``rewards/<Class>``),
and every reward function receives ``environments=`` (one instance per
completion). Plain functions (``tools: [module:function, ...]``) are tools too.

Tool calls are parsed from each model turn (``tool_call_parser``): Hermes /
Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` or Llama-3's
JSON ``{"name": ..., "parameters": {...}}``, or ``module:function`` of your own
(text -> list of ``ToolCall``). The calls of a whole batch run at once, one
daemon thread each, under ``tool_timeout_s``; a tool that raises, times out,
is unknown or is called with bad arguments answers the model with an error
message (counted in ``tools/failure_frequency``) and the run goes on.

The tool turn is appended as token ids: the suffix the chat template adds for
those tool messages, found by rendering a short conversation with and without
them and diffing the ids (as TRL does), so the model's sampled ids are never
re-tokenised. ``check_template`` refuses, before training, a template that
ignores ``tools=`` or rewrites earlier turns when a later one is added.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from posttrain.errors import UserError

RESERVED = ("reset", "get_reward")  # environment methods that are not tools


@dataclass
class ToolCall:
    name: str
    arguments: dict
    error: str = ""  # a call that could not be parsed: answered with this message, never run


# ------------------------------------------------------------------ tool-call parsers

HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _call_from_json(text: str, arguments_key: str) -> ToolCall:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return ToolCall("", {}, f"Error: the tool call is not valid JSON ({err.msg})")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCall("", {}, 'Error: a tool call is a JSON object {"name": ..., "' + arguments_key + '": {...}}')
    arguments = data.get(arguments_key, data.get("arguments", {}))
    if not isinstance(arguments, dict):
        return ToolCall(data["name"], {}, f"Error: the {arguments_key} of a tool call must be a JSON object")
    return ToolCall(data["name"], arguments)


def hermes_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block of a model turn (Hermes, Qwen2.5/3)."""
    return [_call_from_json(body.strip(), "arguments") for body in HERMES_CALL.findall(text)]


def llama3_tool_calls(text: str) -> list[ToolCall]:
    """Llama-3's JSON tool call: the whole turn is ``{"name": ..., "parameters": {...}}`` (after an optional
    ``<|python_tag|>``); any other turn is an answer."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not (body.startswith("{") and body.endswith("}")):
        return []
    return [_call_from_json(body, "parameters")]


PARSERS = {"hermes": hermes_tool_calls, "llama3_json": llama3_tool_calls}


def resolve_parser(name: str, chat_template: str | None) -> Callable[[str], list[ToolCall]]:
    """``tool_call_parser``: auto (llama3_json when the template speaks Llama-3's ipython role, else hermes),
    a built-in name, or ``module:function``."""
    if name == "auto":
        template = chat_template or ""
        return llama3_tool_calls if ("<|python_tag|>" in template or "ipython" in template) else hermes_tool_calls
    if name in PARSERS:
        return PARSERS[name]
    from posttrain.rewards import resolve_callable

    return resolve_callable(name, "tool_call_parser")


# ------------------------------------------------------------------ schemas and tool tables


def tool_schema(func: Callable, owner: str) -> dict:
    """The JSON schema of a tool from its type hints and Google-style docstring (transformers' get_json_schema)."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(func)
    except Exception as err:  # noqa: BLE001 - DocstringParsingException / TypeHintParsingException: user code
        raise UserError(f"{owner}: tool {func.__name__!r} has no usable schema: {' '.join(str(err).split())} "
                        "(each argument needs a type hint and an `Args:` line in the docstring)") from None


def environment_tools(instance) -> list[Callable]:
    """The public methods of an environment instance (bound), except reset and get_reward."""
    return [getattr(instance, name) for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
            if not name.startswith("_") and name not in RESERVED]


def _resolve_class(name: str):
    from posttrain.rewards import resolve_callable

    return resolve_callable(name, "environment")


def environment_reward_source(name: str):
    """An environment class's get_reward() as a rule reward named after the class (weight 1), or None."""
    env_class = _resolve_class(name)
    if not callable(getattr(env_class, "get_reward", None)):
        return None
    from posttrain.rewards import RewardSource

    def environment_reward(environments=None, **_):
        if environments is None:
            raise ValueError("get_reward needs the rollout's environments (multi-turn rollouts only)")
        return [env.get_reward() for env in environments]

    return RewardSource(env_class.__name__, 1.0, func=environment_reward)


class ToolRuntime:
    """What a multi-turn rollout needs: the environment class, the tools, their schemas, the parser and limits."""

    def __init__(self, env_class, tools: list[Callable], parser: Callable, max_tool_response_length: int,
                 timeout_s: float):
        self.env_class, self.tools, self.parser = env_class, tools, parser
        self.max_tool_response_length, self.timeout_s = max_tool_response_length, timeout_s
        probe = self.new_environment() if env_class is not None else None
        names = [f.__name__ for f in tools] + [f.__name__ for f in (environment_tools(probe) if probe else [])]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise UserError(f"field 'tools': two tools are named {duplicate!r}")
        owner = "field 'environment'" if probe is not None else "field 'tools'"
        self.schemas = [tool_schema(f, "field 'tools'") for f in tools]
        self.schemas += [tool_schema(f, owner) for f in (environment_tools(probe) if probe else [])]

    @classmethod
    def from_config(cls, cfg, tokenizer) -> ToolRuntime | None:
        """None when the run has neither an environment nor tools (single-turn rollouts)."""
        if not cfg.environment and not cfg.tools:
            return None
        from posttrain.rewards import resolve_callable

        env_class = _resolve_class(cfg.environment) if cfg.environment else None
        if env_class is not None and not callable(getattr(env_class, "reset", None)):
            raise UserError(f"field 'environment': {cfg.environment} has no reset(**row) method")
        tools = [resolve_callable(name, "tools") for name in cfg.tools]
        parser = resolve_parser(cfg.tool_call_parser, getattr(tokenizer, "chat_template", None))
        return cls(env_class, tools, parser, cfg.max_tool_response_length, cfg.tool_timeout_s)

    def new_environment(self):
        try:
            return self.env_class()
        except Exception as err:  # noqa: BLE001 - user code
            raise UserError(f"field 'environment': {self.env_class.__name__}() raised "
                            f"{type(err).__name__}: {' '.join(str(err).split())}") from None

    def reset(self, rows: list[dict]) -> tuple[list, list[str | None]]:
        """One fresh environment per row, reset with the row's fields: (instances, first observations)."""
        if self.env_class is None:
            return [None] * len(rows), [None] * len(rows)
        envs = [self.new_environment() for _ in rows]
        observations = []
        for env, row in zip(envs, rows):
            observation = env.reset(**row)
            if observation is not None and not isinstance(observation, str):
                raise UserError(f"field 'environment': {self.env_class.__name__}.reset() returned "
                                f"{type(observation).__name__}; it returns a string (a first observation) or None")
            observations.append(observation)
        return envs, observations

    def table(self, env) -> dict[str, Callable]:
        """name -> callable for one trajectory: the plain tools and its own environment's methods."""
        return {f.__name__: f for f in self.tools + (environment_tools(env) if env is not None else [])}

    def run(self, calls: list[tuple[dict, ToolCall]]) -> list[tuple[str, bool]]:
        """Run every (tool table, call) of a batch at once: (content for the model, failed) per call."""
        return run_tool_calls(calls, self.timeout_s)


def _one_call(table: dict, call: ToolCall) -> str:
    if call.error:
        raise _ToolFailure(call.error)
    if call.name not in table:
        raise _ToolFailure(f"Error: unknown tool {call.name!r}; tools: {', '.join(table) or 'none'}")
    return str(table[call.name](**call.arguments))


class _ToolFailure(Exception):
    """A call answered with this message as it stands (not prefixed with the exception's type)."""


def run_tool_calls(calls: list[tuple[dict, ToolCall]], timeout_s: float) -> list[tuple[str, bool]]:
    """Each call in a daemon thread of its own, all waited on together for at most ``timeout_s`` (0: no limit).

    A tool that raises answers ``Error: <Type>: <message>``; one still
    running at the deadline answers a timeout error and is left behind (a
    thread cannot be killed; being a daemon, it does not keep the process
    from exiting). Tools must therefore be safe to run concurrently across
    environment instances.
    """
    futures = [concurrent.futures.Future() for _ in calls]

    def work(future, table, call):
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(_one_call(table, call))
            except BaseException as err:  # noqa: BLE001 - user code: reported to the model
                future.set_exception(err)

    for future, (table, call) in zip(futures, calls):
        threading.Thread(target=work, args=(future, table, call), name="posttrain tool", daemon=True).start()
    concurrent.futures.wait(futures, timeout=timeout_s or None)
    out = []
    for future, (_, call) in zip(futures, calls):
        if not future.done():
            out.append((f"Error: tool {call.name!r} took longer than tool_timeout_s={timeout_s:g} s", True))
        elif isinstance(future.exception(), _ToolFailure):
            out.append((str(future.exception()), True))
        elif future.exception() is not None:
            err = future.exception()
            out.append((f"Error: {type(err).__name__}: {' '.join(str(err).split())}", True))
        else:
            out.append((future.result(), False))
    return out


# ------------------------------------------------------------------ the chat template, token-exact


def render_ids(tokenizer, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> list[int]:
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=True, return_dict=False,
                                            add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        raise UserError(f"the chat template rejects a multi-turn rollout's messages: {' '.join(str(err).split())}; "
                        "set chat_template_path to a template with tools and the tool role") from None
    return list(out["input_ids"] if isinstance(out, dict) else out)


def prompt_messages(prompt, observation: str | None) -> list[dict]:
    """A row's prompt as messages, with the environment's first observation appended to its last user turn (TRL)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if observation:
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + observation}
    return messages


def tool_suffix_ids(tokenizer, results: list[tuple[str, str]], tools: list[dict]) -> list[int]:
    """The ids the template adds after an assistant turn that called tools, for (name, content) results,
    up to and including the next generation prompt.

    Rendered on a short conversation with and without the tool messages; the
    shorter render is cut after its last EOS (the model's turn ends there:
    what the template puts after the EOS, ChatML's newline, belongs to the suffix).
    """
    calls = [{"type": "function", "function": {"name": name, "arguments": {}}} for name, _ in results]
    head = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    tail = [{"role": "tool", "name": name, "content": content} for name, content in results]
    prefix = render_ids(tokenizer, head, tools, add_generation_prompt=False)
    full = render_ids(tokenizer, head + tail, tools, add_generation_prompt=True)
    eos = [i for i, t in enumerate(prefix) if t == tokenizer.eos_token_id]
    prefix = prefix[:eos[-1] + 1] if eos else prefix
    if full[:len(prefix)] != prefix:
        raise UserError("the chat template renders an assistant turn differently once tool results follow it; "
                        "multi-turn rollouts need renders that extend each other (set chat_template_path)")
    return full[len(prefix):]


def clip_tool_response(tokenizer, content: str, max_tokens: int) -> str:
    """The content cut to its first ``max_tokens`` tokens (0: whole)."""
    if not max_tokens:
        return content
    ids = tokenizer(content, add_special_tokens=False)["input_ids"]
    return content if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def check_template(tokenizer, schemas: list[dict]) -> None:
    """Refuse, with one line, a template multi-turn rollouts cannot use: one that ignores ``tools=``, rejects
    tool messages, or rewrites an earlier turn once a later one is added (as Qwen3's drops earlier <think>
    blocks): a rollout appends to the ids already sampled, so each render must extend the one before."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("field 'environment': the tokenizer has no chat template; set chat_template_path")
    if not schemas:
        return
    user = [{"role": "user", "content": "x"}]
    if render_ids(tokenizer, user, schemas, True) == render_ids(tokenizer, user, None, True):
        raise UserError("the chat template ignores tools=, so the model would never see its tools; "
                        "set chat_template_path to a template that renders them")
    name = schemas[0]["function"]["name"]
    call = [{"type": "function", "function": {"name": name, "arguments": {}}}]
    first = user + [{"role": "assistant", "content": "<think>a</think>b", "tool_calls": call},
                    {"role": "tool", "name": name, "content": "1"}]
    second = first + [{"role": "assistant", "content": "<think>c</think>d", "tool_calls": call},
                      {"role": "tool", "name": name, "content": "2"}]
    shorter, longer = render_ids(tokenizer, first, schemas, True), render_ids(tokenizer, second, schemas, True)
    if longer[:len(shorter)] != shorter:
        raise UserError("the chat template rewrites earlier turns when a later one is added (as Qwen3's removes "
                        "earlier <think> blocks), so sampled turns could not be kept token-exact; set "
                        "chat_template_path to a template whose renders extend each other")
    tool_suffix_ids(tokenizer, [(name, "1")], schemas)
