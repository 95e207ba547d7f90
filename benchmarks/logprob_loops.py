"""Token log-probs and entropy, forward + backward: one Python iteration per sequence vs chunks of positions.

    .venv/bin/python benchmarks/logprob_loops.py [--batch 128 --tokens 16 --vocab 259] [--repeats 30]

Prints one JSON object with the median seconds of each and their ratio, both
measured alternately in this one process (the default shape is the demo's:
RL batches of short completions over the tiny model's byte vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from posttrain.losses import entropy_from_logits, selective_log_softmax  # noqa: E402


def per_row_logps(logits, index):
    return torch.stack([row.float().gather(-1, i.unsqueeze(-1)).squeeze(-1) - row.float().logsumexp(-1)
                        for row, i in zip(logits, index)])


def per_row_entropy(logits):
    return torch.stack([-(row.float().softmax(-1) * row.float().log_softmax(-1)).sum(-1) for row in logits])


def timed(fn) -> float:
    start = time.perf_counter()
    fn().sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=259)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(args.batch, args.tokens, args.vocab, requires_grad=True)
    index = torch.randint(0, args.vocab, (args.batch, args.tokens))
    cases = {"logps_per_row": lambda: per_row_logps(logits, index),
             "logps_chunked": lambda: selective_log_softmax(logits, index),
             "entropy_per_row": lambda: per_row_entropy(logits),
             "entropy_chunked": lambda: entropy_from_logits(logits)}
    times = {name: [] for name in cases}
    for _ in range(args.repeats):  # alternate, so machine load hits every case alike
        for name, fn in cases.items():
            times[name].append(timed(fn))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(json.dumps({"shape": [args.batch, args.tokens, args.vocab], "median_s": medians,
                      "speedup_logps": medians["logps_per_row"] / medians["logps_chunked"],
                      "speedup_entropy": medians["entropy_per_row"] / medians["entropy_chunked"]}, indent=1))


if __name__ == "__main__":
    main()
