"""The pre-flight memory estimate (posttrain/memory.py) against the measured peak of a real run, on CPU.

    .venv/bin/python benchmarks/memory_estimate.py --stage sft [--hidden_size 512 --layers 4 --vocab 8000] [--dtype bfloat16]

Builds a random Qwen2 of the given shape and rows long enough to fill
max_length, then runs the stage's recipe for ``--steps`` optimizer steps in a
child process. The measured figure is the child's peak resident memory
(ru_maxrss) minus its resident memory just before the recipe starts (every
library it uses, plotting included, already imported), so the interpreter and
libraries do not count. Prints one JSON object: estimate, measured, and their
ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401  (the final plots import it; it must not count)
import importlib
import torch
torch.set_num_threads(1)
from posttrain.config import load_config
from posttrain import memory
stage, fields = sys.argv[1], json.loads(sys.argv[2])
recipe = importlib.import_module(f"posttrain.recipes.{stage}")
import transformers.models.qwen2.modeling_qwen2  # noqa: F401
cfg = load_config(stage, None, fields)
estimate = memory.estimate(cfg)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


before = rss_bytes()
recipe.main(cfg)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "estimate": estimate["bytes"]}))
"""


def write_data(folder: Path, stage: str, rows: int, chars: int) -> Path:
    """Rows whose prompt and responses are long runs of digits (one token per character with the embedded tokenizer)."""
    import random

    rng = random.Random(0)

    def text(n):
        return "".join(rng.choice("0123456789+=") for _ in range(n))

    path = folder / f"{stage}.jsonl"
    with path.open("w") as f:
        for _ in range(rows):
            if stage == "sft":
                row = {"prompt": text(chars // 4), "completion": text(chars)}
            else:
                row = {"prompt": text(chars // 4), "chosen": text(chars), "rejected": text(chars)}
            f.write(json.dumps(row) + "\n")
    return path


def build_model(folder: Path, hidden_size: int, layers: int, vocab: int, intermediate: int, dtype: str = "float32") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from posttrain.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(["0123456789+= abcdefghijklmnopqrstuvwxyz"], folder)
    heads = max(1, hidden_size // 64)
    config = Qwen2Config(vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden_size, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                         max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    # saved in the dtype the run loads, as a checkpoint of that dtype is (no float32 file to read and cast at load)
    AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


def measure(stage: str, model_dir: Path, data: Path, output_dir: Path, batch: int, length: int, steps: int,
            extra: dict | None = None) -> dict:
    fields = {"model_name_or_path": str(model_dir), "dataset_name": str(data), "output_dir": str(output_dir),
              "per_device_train_batch_size": str(batch), "max_length": str(length), "max_prompt_length": str(length // 4),
              "max_steps": str(steps), "logging_steps": "1", "progress": "false", **(extra or {})}
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CHILD, stage, json.dumps(fields)], capture_output=True, text=True,
                          env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    measured = result["peak"] - result["before"]
    estimate = result["estimate"]["total"]
    return {"stage": stage, "estimate_mib": round(estimate / 2**20, 1), "measured_mib": round(measured / 2**20, 1),
            "ratio": round(estimate / measured, 3), "parts_mib": {k: round(v / 2**20, 1) for k, v in result["estimate"].items()},
            "table": done.stderr[done.stderr.find("memory estimate"):].split("\n\n")[0].splitlines()[:12]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--intermediate_size", type=int, default=1376)
    parser.add_argument("--batch", type=int, default=4, help="rows (sft) or pairs (dpo) per micro-batch")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the runs' dtype field")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir = build_model(folder / "model", args.hidden_size, args.layers, args.vocab, args.intermediate_size,
                                args.dtype)
        for stage in args.stage:
            data = write_data(folder, stage, rows=args.batch * args.steps, chars=args.max_length * 2)
            results.append(measure(stage, model_dir, data, folder / f"out_{stage}", args.batch, args.max_length,
                                   args.steps, {"dtype": args.dtype}))
    print(json.dumps({"shape": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
