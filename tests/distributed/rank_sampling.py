"""Each rank's rollout stream under torchrun: `rank_sampling.py SPEC.json` (one process per rank).

Writes, per rank, the first draws of the RNG that set-up leaves (the one any
weight initialisation, LoRA's adapters or a value head, draws from) to
``init-rank{R}.json``, then runs one `posttrain grpo` command whose reward, ``record_completions``,
appends every completion it scores to ``completions-rank{R}.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from posttrain import cli, distributed


def record_completions(prompts, completions, **_):
    """A reward that also records what this rank sampled: the completion's length."""
    with Path(f"completions-rank{distributed.rank()}.jsonl").open("a") as handle:
        handle.writelines(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(prompts, completions))
    return [len(c) / 4 for c in completions]


if __name__ == "__main__":
    from posttrain.config import load_config
    from posttrain.training import setup_run

    spec = json.loads(Path(sys.argv[1]).read_text())  # {"fields": the run's fields, "argv": its command line}
    with distributed.process_group():
        setup_run(load_config("grpo", None, spec["fields"]))
        Path(f"init-rank{distributed.rank()}.json").write_text(json.dumps(torch.rand(8).tolist()))
        sys.exit(cli.main(spec["argv"]))
