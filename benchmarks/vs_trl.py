"""posttrain against TRL, side by side: the same model, data, batches, lengths, steps, precision and threads.

    .venv/bin/python benchmarks/vs_trl.py sft|rm|dpo|grpo [--shape tiny|medium] [--steps N] [--repeats R]
                                          [--threads T] [--padding_free] [--smoke] [--output FILE.json]

Builds a random Qwen2 (fixed seed) and a byte-level BPE tokenizer trained here
with the shape's vocabulary, writes conversational data, then runs posttrain
(its CLI, ``python -m posttrain STAGE``) and TRL (``SFTTrainer``,
``RewardTrainer``, ``DPOTrainer``, ``GRPOTrainer``) alternately, A B A B, each
run in a fresh subprocess (so each peak RSS is that run's own, read with
``wait4``). Prints one JSON object: each side's median throughput (sft:
non-pad tokens/s; rm, dpo: pairs/s; grpo: completions/s), median peak RSS
(MB) and the ratios posttrain / TRL.

Timing: start-up and the first optimizer step are excluded the same way on
both sides. posttrain logs every step (``logging_steps: 1``) and the time is
``elapsed_s`` of step N minus that of step 1 in its metrics.jsonl; TRL gets a
callback that stamps ``time.perf_counter()`` at the end of every step, and
the time is the stamp of step N minus that of step 1. Both sides see exactly
the same batches: the data has ``steps x batch`` rows, posttrain's seeded
order is computed with its own functions and TRL reads the rows in that
order (``train_sampling_strategy: sequential``, ``shuffle_dataset: false``).
Tokens are counted with posttrain's tokenisation of those rows.

Matched settings: fp32 (``bf16: false``), AdamW at a constant learning rate,
no warm-up, no weight decay, gradient clipping at 1, no gradient
checkpointing, no evaluation, no checkpoints, no progress bars, one
micro-batch per step, dropout off, a reference model in DPO and GRPO (beta
0.04, ``precompute_ref_log_probs: false``), GRPO with the same rule reward
(``bench_reward`` below), ``num_generations``, ``max_completion_length``,
temperature 1, top_k 0, ``loss_type: grpo``, one iteration and TRL on
transformers ``generate`` (``use_vllm: false``); ``padding_free`` only with
``--padding_free``, then on both sides. TRL is imported only here, never by
posttrain (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's posttrain, not another installed one
STAGES = ("sft", "rm", "dpo", "grpo")
UNITS = {"sft": "tokens/s", "rm": "pairs/s", "dpo": "pairs/s", "grpo": "completions/s"}

# model and data shapes; lengths in tokens, drawn log-normal and clipped to [min_length, max_length]
SHAPES = {
    "tiny": dict(hidden=256, layers=4, heads=4, intermediate=1024, vocab=2048, batch=8, max_length=128, min_length=24,
                 median_length=64, prompts=2, generations=4, completion_length=32, steps=8, repeats=3),
    "medium": dict(hidden=768, layers=8, heads=12, intermediate=2048, vocab=32000, batch=8, max_length=512, min_length=64,
                   median_length=160, prompts=2, generations=4, completion_length=64, steps=4, repeats=3),
    "smoke": dict(hidden=32, layers=2, heads=2, intermediate=64, vocab=320, batch=2, max_length=48, min_length=12,
                  median_length=24, prompts=1, generations=2, completion_length=4, steps=2, repeats=1),
}
LEARNING_RATE, BETA, SEED = 1e-5, 0.04, 42
DPO_BETA = 0.1


def bench_reward(prompts, completions, **kwargs) -> list[float]:
    """The GRPO rule reward of both sides: the share of distinct characters in a completion (varies within a group)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(set(t)) / (1.0 + len(t)) for t in texts]


# ------------------------------------------------------------------ model, tokenizer and data


SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "qu", "ng", "st"]


def make_words(count: int, rng: random.Random) -> list[str]:
    words = set()
    while len(words) < count:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


class TextMaker:
    """Pseudo-words drawn Zipf-like, so the BPE learns whole words and sentences have a known token count."""

    def __init__(self, shape: dict, rng: random.Random):
        self.rng = rng
        self.words = make_words(max(200, shape["vocab"] * 2), rng)
        self.weights = [1.0 / (rank + 10) for rank in range(len(self.words))]

    def sentence(self, num_words: int) -> str:
        words = self.rng.choices(self.words, self.weights, k=max(1, num_words))
        return " ".join(words).capitalize() + "."


def build_model(shape: dict, out: Path, text: TextMaker) -> tuple[Path, object]:
    """A random Qwen2 (seeded) and a byte-level BPE with the shape's vocabulary, saved with save_pretrained."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    from posttrain.models import CHATML_TEMPLATE, EOS, IM_START, PAD, QWEN2_SPLIT

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=shape["vocab"], special_tokens=[PAD, EOS, IM_START],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [text.sentence(40) for _ in range(2000)] + text.words + ["user", "assistant", "system"]
    core.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD,
                                        additional_special_tokens=[IM_START], clean_up_tokenization_spaces=False,
                                        model_max_length=4096)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(out))
    config = Qwen2Config(vocab_size=max(len(tokenizer), shape["vocab"]), hidden_size=shape["hidden"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["heads"], intermediate_size=shape["intermediate"],
                         max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out))
    return out, tokenizer


def lognormal_length(shape: dict, rng: random.Random) -> int:
    length = int(rng.lognormvariate(math.log(shape["median_length"]), 0.6))
    return max(shape["min_length"], min(shape["max_length"], length))


def fit_words(tokenizer, text: TextMaker, tokens: int) -> str:
    """A sentence of about ``tokens`` tokens (never more)."""
    words = max(1, tokens // 2)
    sentence = text.sentence(words)
    while len(tokenizer(sentence, add_special_tokens=False)["input_ids"]) > tokens and words > 1:
        words = max(1, int(words * 0.85))
        sentence = text.sentence(words)
    return sentence


def make_rows(stage: str, shape: dict, count: int, tokenizer, text: TextMaker, rng: random.Random) -> list[dict]:
    """``count`` conversational rows whose total length is log-normal within [min_length, max_length]."""
    rows = []
    overhead = 12  # the chat template's role markers, per row
    for _ in range(count):
        total = lognormal_length(shape, rng) - overhead
        prompt_tokens = max(4, int(total * rng.uniform(0.15, 0.35)))
        user = [{"role": "user", "content": fit_words(tokenizer, text, prompt_tokens)}]
        if stage == "sft":
            answer = fit_words(tokenizer, text, max(2, total - prompt_tokens))
            rows.append({"messages": user + [{"role": "assistant", "content": answer}]})
        elif stage in ("rm", "dpo"):
            longest = max(2, total - prompt_tokens)
            chosen = fit_words(tokenizer, text, longest)
            rejected = fit_words(tokenizer, text, max(2, int(longest * rng.uniform(0.5, 1.0))))
            rows.append({"prompt": user, "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"prompt": user})
    return rows


def posttrain_order(stage: str, count: int, shape: dict) -> list[list[int]]:
    """posttrain's batches of the first epoch (their membership depends on the seed only, not on lengths)."""
    from posttrain.data import length_grouped_batches
    from posttrain.training import PromptStream

    if stage == "grpo":
        stream = PromptStream(count, shape["prompts"], SEED)
        return [stream.next() for _ in range(count // shape["prompts"])]
    return length_grouped_batches([0] * count, shape["batch"], SEED, 0, group=False)


def batch_items(stage: str, rows: list[dict], batches: list[list[int]], tokenizer, shape: dict) -> list[float]:
    """Items each batch carries: non-pad tokens (sft, as posttrain tokenises the rows), pairs, or completions."""
    if stage == "grpo":
        return [float(len(b) * shape["generations"]) for b in batches]
    if stage in ("rm", "dpo"):
        return [float(len(b)) for b in batches]
    from posttrain.data import Row, sft_examples

    examples = sft_examples([Row(f"row {i}", r) for i, r in enumerate(rows)], tokenizer, shape["max_length"],
                            shape["max_length"] - 1)
    return [float(sum(len(examples[i].prompt_ids) + len(examples[i].completion_ids) for i in b)) for b in batches]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ the two sides


def child_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
                PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "benchmarks")]), HF_HUB_OFFLINE="1",
                HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
                TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")


def run_measured(command: list[str], threads: int, log: Path) -> float:
    """Run a child to completion; returns its peak RSS in MB (its own, from wait4)."""
    with log.open("w") as handle:
        child = subprocess.Popen(command, cwd=REPO, env=child_env(threads), stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {child.returncode}:\n{tail}")
    return usage.ru_maxrss / 1024


def posttrain_args(stage: str, spec: dict) -> dict:
    """posttrain's flags for a run matched to TRL's (field -> value)."""
    shape = spec["shape"]
    args = {"model_name_or_path": spec["model"], "dataset_name": spec["data_posttrain"], "output_dir": spec["out"],
            "overwrite_output_dir": "true", "max_steps": spec["steps"], "learning_rate": spec["learning_rate"],
            "lr_scheduler_type": "constant", "warmup_ratio": 0, "weight_decay": 0, "max_grad_norm": 1.0,
            "gradient_accumulation_steps": 1, "max_length": shape["max_length"], "logging_steps": 1, "save_steps": 0,
            "progress": "false", "num_threads": spec["threads"], "seed": SEED, "bf16": "false",
            "gradient_checkpointing": "false"}
    if stage == "grpo":
        args.update(per_device_train_batch_size=shape["prompts"], num_generations=shape["generations"],
                    max_completion_length=shape["completion_length"], temperature=1.0, top_k=0, beta=BETA,
                    loss_type="grpo", scale_rewards="group", num_iterations=1, epsilon=0.2,
                    reward_funcs="vs_trl:bench_reward", reward_clip=0, max_prompt_length=shape["max_length"] - 1)
    else:
        args.update(per_device_train_batch_size=shape["batch"], max_prompt_length=shape["max_length"] - 1)
    if stage == "rm":
        args.update(eval_split=0)
    if stage == "dpo":
        args.update(beta=DPO_BETA, loss_type="sigmoid", precompute_ref_log_probs="false")
    if spec["padding_free"]:
        args.update(padding_free="true")
    return args


def posttrain_command(stage: str, spec: dict) -> list[str]:
    args = posttrain_args(stage, spec)
    return [sys.executable, "-m", "posttrain", stage] + [x for k, v in args.items() for x in (f"--{k}", str(v))]


def posttrain_seconds(out: Path, steps: int) -> float:
    records = {r["step"]: r["elapsed_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    return records[steps] - records[1]


def trl_main(spec_paths: list[str]) -> None:
    """The TRL side, in its own process: each spec's trainer, configured as posttrain is, trained in turn
    (one spec per process when measuring; ``--smoke`` runs every stage in one process)."""
    for spec_path in spec_paths:
        trl_run(json.loads(Path(spec_path).read_text()))


def trl_run(spec: dict) -> None:
    """Build the stage's TRL trainer, train, write the step stamps."""
    import torch

    torch.set_num_threads(spec["threads"])
    import trl
    from datasets import load_dataset
    from transformers import TrainerCallback

    stage, shape = spec["stage"], spec["shape"]
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    common = dict(output_dir=spec["out"], max_steps=spec["steps"], learning_rate=spec["learning_rate"],
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  gradient_accumulation_steps=1, logging_strategy="no", save_strategy="no", eval_strategy="no",
                  report_to="none", dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
                  bf16=False, fp16=False, gradient_checkpointing=False, use_liger_kernel=False, seed=SEED,
                  use_cpu=True, train_sampling_strategy="sequential", model_init_kwargs={"dtype": "float32"})
    data = load_dataset("json", data_files=spec["data_trl"], split="train")
    if stage == "sft":
        # TRL refuses padding_free without packing unless max_length is None; the rows are built within max_length
        max_length = None if spec["padding_free"] else shape["max_length"]
        config = trl.SFTConfig(per_device_train_batch_size=shape["batch"], max_length=max_length, packing=False,
                               padding_free=spec["padding_free"], shuffle_dataset=False, **common)
        trainer = trl.SFTTrainer(model=spec["model"], args=config, train_dataset=data)
    elif stage == "rm":
        config = trl.RewardConfig(per_device_train_batch_size=shape["batch"], max_length=shape["max_length"],
                                  disable_dropout=True, center_rewards_coefficient=None, **common)
        trainer = trl.RewardTrainer(model=spec["model"], args=config, train_dataset=data)
    elif stage == "dpo":
        config = trl.DPOConfig(per_device_train_batch_size=shape["batch"], max_length=shape["max_length"], beta=DPO_BETA,
                               loss_type=["sigmoid"], precompute_ref_log_probs=False, padding_free=spec["padding_free"],
                               disable_dropout=True, **common)
        trainer = trl.DPOTrainer(model=spec["model"], args=config, train_dataset=data)
    else:
        completions = shape["prompts"] * shape["generations"]
        config = trl.GRPOConfig(per_device_train_batch_size=completions, generation_batch_size=completions,
                                num_generations=shape["generations"], max_completion_length=shape["completion_length"],
                                temperature=1.0, top_k=0, top_p=1.0, beta=BETA, loss_type="grpo", scale_rewards="group",
                                num_iterations=1, epsilon=0.2, use_vllm=False, shuffle_dataset=False,
                                disable_dropout=True, log_completions=False, mask_truncated_completions=False, **common)
        trainer = trl.GRPOTrainer(model=spec["model"], reward_funcs=[bench_reward], args=config, train_dataset=data)
    trainer.add_callback(Stamp())
    trainer.train()
    # SFT's count of the non-pad tokens it trained on: the same rows tokenised the same way give posttrain's count
    tokens = getattr(trainer, "_total_train_tokens", None) if stage == "sft" else None
    Path(spec["stamps"]).write_text(json.dumps({"stamps": stamps, "num_tokens": None if tokens is None else float(tokens)}))


def trl_seconds(stamps_path: Path, steps: int) -> float:
    stamps = json.loads(stamps_path.read_text())["stamps"]
    if len(stamps) != steps:
        raise RuntimeError(f"TRL ran {len(stamps)} steps, expected {steps}")
    return stamps[-1] - stamps[0]


# ------------------------------------------------------------------ the comparison


def prepare(stage: str, shape_name: str, steps: int, threads: int, padding_free: bool, work: Path,
            built: tuple | None = None) -> tuple[dict, list]:
    """Both data files in ``work`` (and the model and tokenizer, unless ``built`` holds them): the run spec and
    the items of each of the ``steps`` batches."""
    shape = SHAPES[shape_name]
    work.mkdir(parents=True, exist_ok=True)
    model_dir, tokenizer, text = built or build(shape_name, work)
    rng = random.Random(f"{SEED}-{stage}")
    per_step = shape["prompts"] if stage == "grpo" else shape["batch"]
    rows = make_rows(stage, shape, steps * per_step, tokenizer, text, rng)
    batches = posttrain_order(stage, len(rows), shape)[:steps]
    items = batch_items(stage, rows, batches, tokenizer, shape)
    spec = {"stage": stage, "shape": shape, "steps": steps, "threads": threads, "padding_free": padding_free,
            "learning_rate": LEARNING_RATE, "model": str(model_dir),
            "data_posttrain": str(write_jsonl(work / "posttrain.jsonl", rows)),
            "data_trl": str(write_jsonl(work / "trl.jsonl", [rows[i] for b in batches for i in b])),
            "stamps": str(work / "stamps.json")}
    return spec, items


def build(shape_name: str, work: Path) -> tuple[Path, object, TextMaker]:
    shape = SHAPES[shape_name]
    text = TextMaker(shape, random.Random(SEED))
    model_dir, tokenizer = build_model(shape, work / "model", text)
    return model_dir, tokenizer, text


def run_posttrain(spec: dict, log: Path) -> tuple[float, float]:
    """(seconds of steps 2..N, peak RSS MB) of one posttrain run."""
    rss = run_measured(posttrain_command(spec["stage"], spec), spec["threads"], log)
    return posttrain_seconds(Path(spec["out"]), spec["steps"]), rss


def run_trl(specs: list[dict], work: Path, log: Path) -> tuple[list[float], float]:
    """(seconds of steps 2..N of each spec, peak RSS MB of the process) of one TRL process."""
    paths = []
    for i, spec in enumerate(specs):
        paths.append(work / f"trl-spec-{spec['stage']}-{i}.json")
        paths[-1].write_text(json.dumps(spec))
    rss = run_measured([sys.executable, str(Path(__file__).resolve()), "--trl-child", *map(str, paths)],
                       specs[0]["threads"], log)
    return [trl_seconds(Path(spec["stamps"]), spec["steps"]) for spec in specs], rss


def trl_tokens(spec: dict) -> float | None:
    """The non-pad tokens TRL's SFTTrainer counted over the whole (last) run."""
    return json.loads(Path(spec["stamps"]).read_text())["num_tokens"]


def summarise(spec: dict, items: list, shape_name: str, repeats: int, results: dict) -> dict:
    stage, shape = spec["stage"], spec["shape"]
    timed_items = sum(items[1:])  # steps 2..N
    runs = {side: [{"seconds": round(sec, 6), "items_per_s": round(timed_items / sec, 3), "peak_rss_mb": round(rss, 1)}
                   for sec, rss in pairs] for side, pairs in results.items()}
    summary = {side: {"items_per_s": statistics.median(r["items_per_s"] for r in rs),
                      "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs), "runs": rs}
               for side, rs in runs.items()}
    return {"stage": stage, "shape": shape_name, "unit": UNITS[stage], "steps": spec["steps"],
            "timed_steps": spec["steps"] - 1, "repeats": repeats, "threads": spec["threads"],
            "padding_free": spec["padding_free"], "items_per_step": items, "trl_num_tokens": trl_tokens(spec),
            "model": {k: shape[k] for k in ("hidden", "layers", "heads", "intermediate", "vocab")},
            "batch": {"rows": shape["batch"], "max_length": shape["max_length"]} if stage != "grpo" else
            {"prompts": shape["prompts"], "num_generations": shape["generations"],
             "max_completion_length": shape["completion_length"]},
            **summary,
            "ratio": {"throughput": round(summary["posttrain"]["items_per_s"] / summary["trl"]["items_per_s"], 3),
                      "peak_rss": round(summary["posttrain"]["peak_rss_mb"] / summary["trl"]["peak_rss_mb"], 3)}}


def compare(stage: str, shape_name: str, steps: int, repeats: int, threads: int, padding_free: bool, work: Path,
            built: tuple | None = None) -> dict:
    """``repeats`` runs of each side, alternating A B A B, each in a fresh process."""
    spec, items = prepare(stage, shape_name, steps, threads, padding_free, work, built)
    results: dict = {"posttrain": [], "trl": []}
    for repeat in range(repeats):
        run_spec = dict(spec, out=str(work / f"out-{repeat}"))
        results["posttrain"].append(run_posttrain(run_spec, work / f"posttrain-{repeat}.log"))
        seconds, rss = run_trl([run_spec], work, work / f"trl-{repeat}.log")
        results["trl"].append((seconds[0], rss))
    return summarise(spec, items, shape_name, repeats, results)


def smoke(stages: list[str], threads: int, padding_free: bool, work: Path) -> dict:
    """Both sides still run every stage: one model, 2 steps, one posttrain process per stage, one TRL process
    for all of them (so TRL's peak RSS there is that process's, not one stage's)."""
    built = build("smoke", work)
    prepared = {s: prepare(s, "smoke", SHAPES["smoke"]["steps"], threads, padding_free, work / s, built) for s in stages}
    specs = {s: dict(spec, out=str(work / s / "out")) for s, (spec, _) in prepared.items()}
    posttrain = {s: run_posttrain(spec, work / s / "posttrain.log") for s, spec in specs.items()}
    seconds, rss = run_trl(list(specs.values()), work, work / "trl.log")
    return {s: {**summarise(specs[s], prepared[s][1], "smoke", 1, {"posttrain": [posttrain[s]], "trl": [(sec, rss)]}),
                "smoke": True} for s, sec in zip(stages, seconds)}


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--trl-child":
        trl_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="+", choices=STAGES, help="one stage, or several (then one JSON object keyed by stage)")
    parser.add_argument("--shape", choices=("tiny", "medium"), default="tiny")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run, >= 2 (0: the shape's default)")
    parser.add_argument("--repeats", type=int, default=0, help="runs of each side (0: the shape's default)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and torch threads of both sides")
    parser.add_argument("--padding_free", action="store_true", help="padding_free: true on both sides")
    parser.add_argument("--smoke", action="store_true", help="a very small model, 2 steps, 1 run per side: both sides still run")
    parser.add_argument("--output", default="", help="also write the JSON object to this file")
    parser.add_argument("--workdir", default="", help="keep models, data and logs here (default: a temporary folder)")
    args = parser.parse_args()
    steps = args.steps or SHAPES[args.shape]["steps"]
    repeats = args.repeats or SHAPES[args.shape]["repeats"]
    if steps < 2:
        parser.error("--steps must be >= 2 (the first step is not timed)")
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        work = Path(args.workdir or tmp)
        if args.smoke:
            result = smoke(args.stage, args.threads, args.padding_free, work)
        else:
            built = build(args.shape, work)  # one model for every stage of the shape
            result = {}
            for stage in args.stage:
                result[stage] = compare(stage, args.shape, steps, repeats, args.threads, args.padding_free, work / stage, built)
                if args.output:  # what is done so far survives an interrupted run
                    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
        if len(args.stage) == 1:
            result = result[args.stage[0]]
    text = json.dumps(result, indent=1)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
