"""Batched sampling with the KV cache into typed containers.

Prompts are left-padded so every completion starts at the same column; the
sequence is then ``[prompt | completion]`` and the completion's log-probs come
from the last ``T`` logits only (``logits_to_keep``), never the prompt's.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, fields

import torch

from posttrain import distributed
from posttrain.data import left_pad
from posttrain.errors import UserError
from posttrain.losses import selective_log_softmax
from posttrain.models import unwrap_peft


@dataclass
class Generation:
    """Prompts and their sampled completions, laid out for scoring."""

    input_ids: torch.Tensor  # (B, P+T) left-padded prompt, then completion, pad after EOS
    attention_mask: torch.Tensor  # (B, P+T) 1 on real prompt tokens and completion tokens up to EOS
    completion_mask: torch.Tensor  # (B, T) 1 on completion tokens up to and including EOS
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens
    completions: list[str]  # (B,) decoded completions, special tokens removed
    sampling_logps: torch.Tensor | None = None  # (B, T) log-prob of each sampled token as `generate` drew it (on request)

    @property
    def completion_ids(self) -> torch.Tensor:  # (B, T)
        return self.input_ids[:, -self.completion_mask.shape[1]:]

    def to(self, device) -> Generation:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if torch.is_tensor(v):
                moved[k] = v.to(device)
        return Generation(**moved)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS (everything when there is none). (B, T), and truncated (B,)."""
    is_eos = completion_ids == eos_id
    after_first_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    truncated = ~is_eos.any(-1)
    return (~after_first_eos).long(), truncated


def sampling_config(max_new_tokens: int, temperature: float, greedy: bool, top_k: int, num_return_sequences: int,
                    pad_id: int, eos_id: int, output_scores: bool = False, top_p: float = 1.0, min_p: float = 0.0):
    """A GenerationConfig built from our own fields only.

    Nothing comes from the checkpoint's generation_config.json: a
    `repetition_penalty`, `no_repeat_ngram_size`, `min_new_tokens`, `min_p`,
    ... there would change the sampled distribution away from the one RL
    scores (softmax(z / temperature)). Every processor is set to its neutral
    value explicitly, so none is filled in from the model's defaults either.
    Only ``top_k``, ``top_p`` and ``min_p``, when asked for, truncate it; as
    in TRL, the scored distribution stays the untruncated softmax(z / T).
    """
    from transformers import GenerationConfig

    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature,
                                                     "top_k": top_k, "top_p": top_p, "min_p": min_p or None}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, num_return_sequences=num_return_sequences,
        pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None, use_cache=True, num_beams=1,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
        forced_bos_token_id=None, forced_eos_token_id=None, sequence_bias=None, renormalize_logits=False,
        exponential_decay_length_penalty=None, return_dict_in_generate=True, output_scores=output_scores,
        **{"min_p": None, **sampling})


@contextlib.contextmanager
def _clean_generation_defaults(model, config):
    """Swap the model's own generation defaults for ``config`` while it generates.

    transformers fills every field left unset in the config passed to
    `generate` from `model.generation_config`; with the model's defaults
    replaced by our own config there is nothing left to leak.
    """
    target = unwrap_peft(model)
    saved = target.generation_config
    target.generation_config = config
    try:
        yield
    finally:
        target.generation_config = saved


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as `generate` derives them from a left-padded mask: real tokens count 0, 1, ...; padding 0."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def prefill_groups(model, ids: torch.Tensor, mask: torch.Tensor, group_size: int):
    """The KV cache of every prompt but its last token, computed once and repeated for the G rows of its group.

    `generate` continues from a cache when it is handed the whole input: it
    runs only the tokens the cache lacks (here each prompt's last one, for
    all N·G rows), so the prompt's keys and values are computed N times, not
    N·G, and the completions sample from exactly the distribution they would
    without the cache reuse.
    """
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=generation_position_ids(mask[:, :-1]),
                use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(group_size)
    return cache


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             greedy: bool = False, num_return_sequences: int = 1, top_k: int = 0,
             return_sampling_logps: bool = False, reuse_prompt_cache: bool = True,
             cache: str = "dynamic", top_p: float = 1.0, min_p: float = 0.0) -> Generation:
    """Sample completions for a batch of prompts in one `generate` call (KV cache on).

    With ``num_return_sequences = G`` the G completions of a prompt are
    consecutive rows, the layout `group_advantages` expects; with
    ``reuse_prompt_cache`` each prompt is prefilled once and its cache shared
    by its G rows (`prefill_groups`). Sampling is from softmax(z / temperature)
    (and top-k when set) and nothing else. ``return_sampling_logps`` also keeps
    the log-probability of each sampled token under the distribution
    `generate` actually drew it from. Generation stops at the step every row
    has emitted EOS (later tokens of a finished row are padding). ``cache``:
    `dynamic`, or `static` (a preallocated cache; transformers then compiles
    the forward on CUDA). Under FSDP2 every rank keeps stepping until all
    ranks are done (synced_gpus), since each forward gathers weights from all
    of them; the prompt cache is not reused there.
    """
    was_training = model.training
    model.eval()
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    G = num_return_sequences
    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    synced = distributed.generation_kwargs(model)
    reuse = reuse_prompt_cache and G > 1 and cache == "dynamic" and not synced and ids.shape[1] > 1
    config = sampling_config(max_new_tokens, temperature, greedy, top_k, 1 if reuse else G, pad_id, eos_id,
                             output_scores=return_sampling_logps, top_p=top_p, min_p=min_p)
    if cache == "static":
        config.cache_implementation = "static"
    inputs = {"input_ids": ids, "attention_mask": mask}
    if reuse:
        prefix = prefill_groups(model, ids, mask, G)
        inputs = {"input_ids": ids.repeat_interleave(G, 0), "attention_mask": mask.repeat_interleave(G, 0),
                  "past_key_values": prefix}
    with _clean_generation_defaults(model, config):
        out = model.generate(**inputs, generation_config=config, **synced)
    if was_training:
        model.train()
    gen = generation_from_ids(ids, mask, out.sequences[:, ids.shape[1]:], tokenizer, G)
    if return_sampling_logps and out.scores:
        scores = torch.stack(out.scores, dim=1)  # (B, T, V) the processed logits sampled from
        gen.sampling_logps = selective_log_softmax(scores, gen.completion_ids[:, :scores.shape[1]])
    return gen


def generation_from_ids(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, tokenizer,
                        num_return_sequences: int = 1) -> Generation:
    """Lay out left-padded prompts (B, P) and their completions (B·G, T) for scoring.

    Tokens after a completion's first EOS become padding; a completion with
    no EOS is truncated. Any rollout engine builds its `Generation` here.
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_ids = prompt_ids.repeat_interleave(num_return_sequences, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(num_return_sequences, dim=0).to(prompt_ids.device)
    completion_ids = completion_ids.to(prompt_ids.device)
    if completion_ids.shape[1] == 0:  # every prompt already at the limit: one EOS column keeps shapes valid
        completion_ids = torch.full((prompt_ids.shape[0], 1), eos_id, device=prompt_ids.device)
    completion_mask, truncated = completion_mask_from_ids(completion_ids, eos_id)
    completion_ids = completion_ids * completion_mask + pad_id * (1 - completion_mask)
    sequences = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Generation(sequences, attention_mask, completion_mask.float(), truncated, texts)


class HFEngine:
    """The rollout engine boundary, implemented with transformers `generate` and its KV cache.

    A rollout engine turns prompts into a `Generation` and is told when the
    policy's weights changed. This one samples from the very module being
    trained, so there is nothing to load; an engine that keeps its own copy
    of the weights (a serving engine) copies them in ``load_weights``.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 cache: str = "dynamic", top_p: float = 1.0, min_p: float = 0.0, greedy: bool = False):
        self.model, self.tokenizer, self.greedy = model, tokenizer, greedy
        self.max_new_tokens, self.temperature, self.top_k, self.cache = max_new_tokens, temperature, top_k, cache
        self.top_p, self.min_p = top_p, min_p

    def generate(self, prompt_ids: list[list[int]], num_return_sequences: int = 1,
                 max_new_tokens: int | None = None) -> Generation:
        """``max_new_tokens`` (default: the engine's own) is a multi-turn trajectory's remaining budget."""
        return generate(self.model, self.tokenizer, prompt_ids, max_new_tokens or self.max_new_tokens, self.temperature,
                        greedy=self.greedy, num_return_sequences=num_return_sequences, top_k=self.top_k, cache=self.cache,
                        top_p=self.top_p, min_p=self.min_p)

    def load_weights(self, model) -> None:
        """Weights are shared with ``model`` already."""


@contextlib.contextmanager
def sampling_stream(seed: int, step: int):
    """Draw the rollout of ``step`` from this rank's own random stream: seeded from (seed + rank, step).

    Every rank takes the same seed at set-up, so weights initialised there
    agree (``training.setup_run``); sampling from that shared stream would
    draw the same completions on every rank. The stream is derived afresh
    from (seed + rank, step) for each rollout and the process's own RNG is
    put back after it, so nothing else (weight init, PPO's mini-batch order)
    changes, and a resumed run samples at each step exactly what the
    uninterrupted one did, with no state to checkpoint.
    """
    # the CPU generator keeps only 32 bits of a seed: the pair is hashed into 32 bits, not packed into 64
    key = hashlib.sha256(f"{seed + distributed.rank()}:{step}".encode()).digest()
    cuda = distributed.device().type == "cuda"
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else [], device_type="cuda"):
        torch.manual_seed(int.from_bytes(key[:4], "little"))
        yield


def build_engine(cfg, model, tokenizer):
    """``rollout_engine``: `hf`, or `module:factory` called as factory(cfg=..., model=..., tokenizer=...);
    wrapped in a `MultiTurn` when the run has an environment or tools."""
    if cfg.rollout_engine == "hf":
        if cfg.generation_cache == "static" and distributed.device().type != "cuda":
            raise UserError(f"field 'generation_cache': static needs a CUDA device (this run is on "
                            f"{distributed.device().type}); use dynamic")
        engine = HFEngine(model, tokenizer, cfg.max_completion_length, cfg.temperature, cfg.top_k,
                          cfg.generation_cache, cfg.top_p, cfg.min_p)
    else:
        from posttrain.rewards import resolve_callable

        engine = resolve_callable(cfg.rollout_engine, "rollout_engine")(cfg=cfg, model=model, tokenizer=tokenizer)
    return multi_turn(cfg, engine, tokenizer)


def multi_turn(cfg, engine, tokenizer):
    """``engine`` wrapped in a `MultiTurn` when the run has an environment or tools (its template checked), else itself."""
    from posttrain.environments import ToolRuntime, check_template

    runtime = ToolRuntime.from_config(cfg, tokenizer) if hasattr(cfg, "environment") else None
    if runtime is None:
        return engine
    check_template(tokenizer, runtime.schemas)
    return MultiTurn(engine, tokenizer, runtime, cfg.max_completion_length, cfg.max_turns, cfg.max_prompt_length)


def sample(engine, prompts: list, group_size: int = 1) -> tuple[Generation, Episodes | None]:
    """``group_size`` completions per prompt (`PromptExample`s), groups in consecutive rows: one turn each, or
    multi-turn trajectories (with their `Episodes`) when ``engine`` is a `MultiTurn`."""
    if isinstance(engine, MultiTurn):
        return engine.sample(prompts, group_size)
    return engine.generate([p.prompt_ids for p in prompts], num_return_sequences=group_size), None


def sample_and_score(cfg, engine, rewards, prompts: list, group_size: int, step: int):
    """Rollout ``step``'s completions (``group_size`` per prompt, groups in consecutive rows) from this rank's
    sampling stream, at the precision their log-probs are scored at, and their rewards.

    Returns (Generation, Episodes or None, the prompt text of each row, scores (B·G,) on the completions'
    device, {"rewards/<source>": (B·G,)}); grpo, rloo and online_dpo sample this way.
    """
    from posttrain.training import autocast

    with sampling_stream(cfg.seed, step), autocast(cfg.bf16):
        gen, episodes = sample(engine, prompts, group_size)  # episodes: multi-turn only (mask 0 on tool tokens)
    texts = [p.prompt_text for p in prompts for _ in range(group_size)]
    extras = [p.extra for p in prompts for _ in range(group_size)]
    raw = [p.prompt for p in prompts for _ in range(group_size)]
    scores, parts = rewards.score(texts, gen.completions, extras, raw_prompts=raw, truncated=gen.truncated,
                                  environments=episodes and episodes.environments)
    return gen, episodes, texts, scores.to(gen.completion_mask.device), parts


# ------------------------------------------------------------------ multi-turn trajectories


@dataclass
class Episodes:
    """What a multi-turn rollout adds to its `Generation`, one entry per trajectory (row)."""

    environments: list  # (B,) the trajectory's own environment instance (None with plain tools only)
    turns: torch.Tensor  # (B,) model turns sampled
    tool_calls: torch.Tensor  # (B,) tool calls made
    tool_failures: torch.Tensor  # (B,) calls answered with an error (raised, timed out, unknown tool, malformed)
    transcripts: list[str]  # (B,) everything after the prompt, model and tool turns, decoded

    def stats(self) -> dict[str, torch.Tensor]:
        calls = self.tool_calls.sum()
        return {"num_turns": self.turns.float().mean(), "tools/call_frequency": self.tool_calls.float().mean(),
                "tools/failure_frequency": self.tool_failures.sum() / calls.clamp_min(1)}


class MultiTurn:
    """An engine that samples trajectories: model turn, tool calls, tool turn, model turn, ... token-exact.

    The first turn of a group samples its G rows in one call, as single-turn
    rollouts do (bit-identical when no tool is called). Each later turn samples
    one continuation per trajectory still calling tools, from its whole context
    ``[prompt | turns so far]`` as ids. Tool turns are the template's suffix ids
    (`environments.tool_suffix_ids`); they are attended to but carry mask 0.
    ``max_completion_length`` bounds every model and tool token after the
    prompt: a tool turn that would reach it is not appended and, like a model
    turn cut by it, makes the trajectory truncated. At most ``max_turns`` rounds
    of tool calls run; the model's turn after the last round ends the trajectory.
    """

    def __init__(self, engine, tokenizer, runtime, max_completion_length: int, max_turns: int, max_prompt_length: int = 0):
        import inspect

        self.engine, self.tokenizer, self.runtime = engine, tokenizer, runtime
        self.budget, self.max_turns, self.max_prompt_length = max_completion_length, max_turns, max_prompt_length
        self.takes_budget = "max_new_tokens" in inspect.signature(engine.generate).parameters
        model = getattr(engine, "model", None)
        self.lockstep = model is not None and bool(distributed.generation_kwargs(model))  # FSDP2: every rank generates

    def load_weights(self, model) -> None:
        self.engine.load_weights(model)

    def _prompt_ids(self, prompt, observation: str | None) -> list[int]:
        """The row's prompt ids with its first observation; rendered with the tools' schemas when there are tools
        (a text prompt without tools stays text, as single-turn rollouts encode it)."""
        from posttrain.environments import prompt_messages, render_ids

        if not observation and not self.runtime.schemas:
            return prompt.prompt_ids
        if isinstance(prompt.prompt, str) and not self.runtime.schemas:
            ids = self.tokenizer(prompt.prompt + observation, add_special_tokens=False)["input_ids"]
        else:
            ids = render_ids(self.tokenizer, prompt_messages(prompt.prompt, observation), self.runtime.schemas, True)
        return ids[-self.max_prompt_length:] if self.max_prompt_length else ids

    def _turn(self, contexts: list[list[int]], budgets: list[int], group_size: int = 1):
        """Sample one turn per context (G per context): (ids up to and including EOS, truncated, the engine's
        sampling log-probs of those ids or None) per row."""
        kwargs = {"max_new_tokens": max(budgets)} if self.takes_budget else {}
        gen = self.engine.generate(contexts, num_return_sequences=group_size, **kwargs)
        out = []
        for i in range(gen.completion_ids.shape[0]):
            n = int(gen.completion_mask[i].sum())
            ids = gen.completion_ids[i][:n].tolist()
            budget = budgets[i // group_size]  # a row with a smaller budget than the call's is cut to its own
            logps = gen.sampling_logps[i][:min(n, budget)].tolist() if gen.sampling_logps is not None else None
            out.append((ids[:budget], bool(gen.truncated[i]) or len(ids) > budget, logps))
        return out

    @torch.no_grad()
    def sample(self, prompts: list, group_size: int = 1) -> tuple[Generation, Episodes]:
        from posttrain.environments import clip_tool_response, tool_suffix_ids

        G, tok, runtime = group_size, self.tokenizer, self.runtime
        rows = [{"prompt": p.prompt, **p.extra} for p in prompts for _ in range(G)]
        envs, observations = runtime.reset(rows)
        prompt_ids = [self._prompt_ids(prompts[i // G], obs) for i, obs in enumerate(observations)]
        B = len(rows)
        # 1. first turn: a group's rows share their prompt, so sample them together (the single-turn layout)
        if all(prompt_ids[i] == prompt_ids[i - i % G] for i in range(B)):
            first = self._turn(prompt_ids[::G], [self.budget] * len(prompts), G)
        else:
            first = self._turn(prompt_ids, [self.budget] * B)
        traj = [ids for ids, _, _ in first]
        mask = [[1] * len(ids) for ids in traj]
        truncated = [cut for _, cut, _ in first]
        logps = [lp for _, _, lp in first]  # the engine's sampling log-probs, 0 on tool tokens (None: not given)
        last = [tok.decode(ids, skip_special_tokens=True) for ids in traj]
        turns, calls_made, failures = [1] * B, [0] * B, [0] * B
        tables = [runtime.table(env) for env in envs]
        pending = [i for i in range(B) if not truncated[i]]
        # 2. rounds of tool calls: parse, run the batch's calls at once, append tool turns, sample the next turns
        for _ in range(self.max_turns):
            calls = {i: runtime.parser(last[i]) for i in pending}
            pending = [i for i in pending if calls[i]]
            if not (distributed.any_rank(bool(pending)) if self.lockstep else pending):
                break
            flat = [(tables[i], call) for i in pending for call in calls[i]]
            results = iter(runtime.run(flat))
            ready = []
            for i in pending:
                answered = []
                for call in calls[i]:
                    content, failed = next(results)
                    calls_made[i] += 1
                    failures[i] += failed
                    answered.append((call.name or "unknown", clip_tool_response(tok, content, runtime.max_tool_response_length)))
                suffix = tool_suffix_ids(tok, answered, runtime.schemas)
                if len(traj[i]) + len(suffix) >= self.budget:  # no room for the result and a reply
                    truncated[i] = True
                    continue
                traj[i], mask[i] = traj[i] + suffix, mask[i] + [0] * len(suffix)
                logps[i] = logps[i] + [0.0] * len(suffix) if logps[i] is not None else None
                ready.append(i)
            if ready or (self.lockstep and distributed.any_rank(bool(ready))):
                contexts = [prompt_ids[i] + traj[i] for i in ready] or [prompt_ids[0]]  # (a rank's stand-in row)
                sampled = self._turn(contexts, [self.budget - len(traj[i]) for i in ready] or [1])
                for i, (ids, cut, lp) in zip(ready, sampled):
                    traj[i], mask[i] = traj[i] + ids, mask[i] + [1] * len(ids)
                    logps[i] = logps[i] + lp if logps[i] is not None and lp is not None else None
                    truncated[i], turns[i] = cut, turns[i] + 1
                    last[i] = tok.decode(ids, skip_special_tokens=True)
            pending = [i for i in ready if not truncated[i]]
        gen = trajectory_generation(prompt_ids, traj, mask, truncated, last, tok,
                                    sampling_logps=None if any(lp is None for lp in logps) else logps)
        episodes = Episodes(envs, torch.tensor(turns), torch.tensor(calls_made), torch.tensor(failures),
                            [tok.decode(ids, skip_special_tokens=True) for ids in traj])
        return gen, episodes


def trajectory_generation(prompt_ids: list[list[int]], trajectories: list[list[int]], model_masks: list[list[int]],
                          truncated: list[bool], texts: list[str], tokenizer, device=None,
                          sampling_logps: list[list[float]] | None = None) -> Generation:
    """Lay out prompts and their trajectories (model and tool ids) for scoring, as `generation_from_ids` does:
    the attention covers every trajectory token, the completion mask only the model's; ``sampling_logps``
    (the engine's, per trajectory token, 0 on tool tokens) become `Generation.sampling_logps`."""
    pad_id = tokenizer.pad_token_id
    ids, prompt_mask = left_pad(prompt_ids, pad_id)
    T = max(1, max(len(t) for t in trajectories))
    completion = torch.full((len(trajectories), T), pad_id, dtype=ids.dtype)
    live, model = torch.zeros_like(completion), torch.zeros(len(trajectories), T)
    for i, (t, m) in enumerate(zip(trajectories, model_masks)):
        completion[i, :len(t)] = torch.tensor(t, dtype=ids.dtype)
        live[i, :len(t)], model[i, :len(m)] = 1, torch.tensor(m, dtype=model.dtype)
    if not any(trajectories):  # as generation_from_ids: one EOS column keeps shapes valid
        completion[:, 0], live[:, 0], model[:, 0] = tokenizer.eos_token_id, 1, 1
    device = device or distributed.device()
    gen = Generation(torch.cat([ids, completion], 1).to(device), torch.cat([prompt_mask, live], 1).to(device),
                     model.to(device), torch.tensor(truncated, device=device), list(texts))
    if sampling_logps is not None:
        gen.sampling_logps = torch.zeros(len(trajectories), T, device=device)
        for i, lp in enumerate(sampling_logps):
            gen.sampling_logps[i, :len(lp)] = torch.tensor(lp, device=device)
    return gen


@dataclass
class Rollout:
    """One PPO rollout batch, with everything the epochs reuse cached at sampling time."""

    input_ids: torch.Tensor  # (B, P+T) prompt (left-padded) + completion
    attention_mask: torch.Tensor  # (B, P+T)
    mask: torch.Tensor  # (B, T) 1 on completion tokens up to and including EOS
    old_logps: torch.Tensor  # (B, T) log π_old(a_t|s_t), cached at rollout
    ref_logps: torch.Tensor  # (B, T) log π_ref(a_t|s_t)
    values: torch.Tensor  # (B, T) V_old(s_t), cached at rollout
    advantages: torch.Tensor  # (B, T) Â_t from GAE (whitened)
    returns: torch.Tensor  # (B, T) R_t = Â_t + V_old(s_t) (before whitening)
    scores: torch.Tensor  # (B,) sequence reward from the reward sources

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


@dataclass
class GroupRollout:
    """One GRPO rollout batch: N prompts x G completions, groups in consecutive rows."""

    input_ids: torch.Tensor  # (N·G, P+T) prompt (left-padded) + completion
    attention_mask: torch.Tensor  # (N·G, P+T)
    mask: torch.Tensor  # (N·G, T) completion tokens that count (truncated ones zeroed when masked)
    advantages: torch.Tensor  # (N·G,) Â_i = group-relative reward, shared by the tokens of completion i
    kept: torch.Tensor  # (N·G,) bool: the completion counts (False: its group was filtered out)
    old_logps: torch.Tensor | None  # (N·G, T) log π_old, cached when num_iterations > 1
    ref_logps: torch.Tensor | None  # (N·G, T) log π_ref, cached when beta > 0

    def select(self, index: torch.Tensor) -> GroupRollout:
        pick = {f.name: getattr(self, f.name) for f in fields(self)}
        return GroupRollout(**{k: v[index] if v is not None else None for k, v in pick.items()})
