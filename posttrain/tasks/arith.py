"""Built-in synthetic task: two-digit addition with a verifiable reward.

    posttrain data arith --output_dir data/arith

Prompts are bare strings like ``"57+68="`` and completions the sum, ``"125"``.
Operands run from 50 to 99, so every sum has three digits and each digit sits
at a fixed distance from the operand digits it depends on: a 0.8M-parameter
model learns the column addition in a few hundred steps (with operands from
10, answers of two or three digits made it several times slower and erratic).
The SFT demonstrations are flawed on purpose and *systematically*: a share
(``carry_error_rate``) of the sums whose ones column carries drop that carry
(57+68 -> "115"), so the SFT model learns a wrong habit that shows under greedy
decoding. Only the preference pairs (chosen = correct, rejected = the dropped
carry) and the verifiable reward can correct it — which is what alignment is
for. Every file is a deterministic function of the seed; ``eval.jsonl`` holds
pairs of operands that no training file contains.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAME = "arith"
FILES = {
    "sft": "sft.jsonl",  # {"prompt", "completion"}: flawed demonstrations
    "preference": "preference.jsonl",  # {"prompt", "chosen", "rejected"}
    "prompts": "prompts.jsonl",  # {"prompt", "answer"}: for PPO / GRPO
    "eval": "eval.jsonl",  # {"prompt", "answer"}: held out from every stage
}


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def dropped_carry(a: int, b: int) -> int:
    """The habit the demonstrations teach: forget the carry out of the ones column."""
    return a + b - 10 if has_carry(a, b) else a + b


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


def _near_miss(a: int, b: int, rng: random.Random) -> int:
    """A plausible wrong sum for a pair without a carry: one digit off by one."""
    wrong = a + b + rng.choice((-10, -1, 1, 10))
    return wrong if wrong >= 0 else a + b + 1


def write_datasets(
    output_dir: str | Path,
    seed: int = 0,
    carry_error_rate: float = 0.6,
    num_sft: int = 40000,
    num_preference: int = 4000,
    num_prompts: int = 4000,
    num_eval: int = 300,
    operands: tuple[int, int] = (50, 99),
) -> dict[str, Path]:
    """Write the four .jsonl files of the task; returns their paths by role."""
    rng = random.Random(seed)
    low, high = operands
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    rng.shuffle(pairs)
    eval_pairs, train_pairs = pairs[:num_eval], pairs[num_eval:]

    def sample(n):
        return [train_pairs[rng.randrange(len(train_pairs))] for _ in range(n)]

    sft = []
    for a, b in sample(num_sft):  # many rows: with few, a tiny model memorises instead of adding
        wrong = has_carry(a, b) and rng.random() < carry_error_rate
        sft.append({"prompt": prompt_of(a, b), "completion": str(dropped_carry(a, b) if wrong else a + b)})

    preference = []
    carry_pairs = [p for p in train_pairs if has_carry(*p)]
    for i in range(num_preference):
        # four in five pairs target the taught habit; the rest keep the model
        # honest on sums without a carry
        a, b = carry_pairs[rng.randrange(len(carry_pairs))] if i % 5 else train_pairs[rng.randrange(len(train_pairs))]
        rejected = dropped_carry(a, b) if has_carry(a, b) else _near_miss(a, b, rng)
        preference.append({"prompt": prompt_of(a, b), "chosen": str(a + b), "rejected": str(rejected)})

    prompts = [{"prompt": prompt_of(a, b), "answer": str(a + b)} for a, b in sample(num_prompts)]
    evaluation = [{"prompt": prompt_of(a, b), "answer": str(a + b)} for a, b in eval_pairs]

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, rows in (("sft", sft), ("preference", preference), ("prompts", prompts), ("eval", evaluation)):
        paths[role] = out / FILES[role]
        paths[role].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def exact_match(prompts: list[str], completions: list[str], answer: list[str] | None = None, **_) -> list[float]:
    """1.0 when the completion, stripped, equals the row's `answer`, else 0.0."""
    if answer is None:
        raise ValueError("exact_match needs an `answer` field in every prompt row")
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]
