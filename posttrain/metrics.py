"""metrics.jsonl writer, progress bar, run summary and plots/*.png."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

from posttrain import distributed


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLogger:
    """Appends one JSON object per logged step; on resume drops lines past the checkpoint."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int = 0, elapsed_s: float = 0.0,
                 progress: bool = True, desc: str = "train"):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.start_time = time.time() - elapsed_s
        self.main = distributed.is_main()
        if self.main:
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.bar = None
        if progress and self.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, leave=False)

    @property
    def elapsed_s(self) -> float:
        return time.time() - self.start_time

    def log(self, step: int, values: dict) -> dict:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}, "elapsed_s": round(self.elapsed_s, 3)}
        if self.main:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.bar is not None:
                shown = {k: f"{record[k]:.3g}" for k in ("loss", "reward", "accuracy") if isinstance(record.get(k), float)}
                self.bar.set_postfix(shown, refresh=False)
        return record

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(output_dir: str, values: dict) -> None:
    """summary.json: wall time, peak memory and the stage's final figures."""
    if distributed.is_main():
        Path(output_dir, "summary.json").write_text(json.dumps(values, indent=1))


PLOT_KEYS = ("loss", "accuracy", "reward", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "kl", "entropy", "value_loss", "policy_loss", "explained_variance",
             "clip_ratio", "completion_length", "learning_rate", "eval/greedy_accuracy", "reward_std",
             "eval/loss", "eval/reward", "eval/pair_accuracy", "eval/rewards/accuracies", "eval/rewards/margins")


def plot_metrics(output_dir: str, title: str = "") -> list[Path]:
    """One PNG per logged key in plots/, plus plots/training.png with them all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(Path(output_dir) / "metrics.jsonl")
    if not records or not distributed.is_main():
        return []
    keys = [k for k in PLOT_KEYS if any(isinstance(r.get(k), (int, float)) for r in records)]
    out = Path(output_dir) / "plots"
    out.mkdir(exist_ok=True)
    paths = []
    cols = 3
    rows = max(1, math.ceil(len(keys) / cols))
    grid, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for key, ax in zip(keys, axes.flat):
        xs = [r["step"] for r in records if isinstance(r.get(key), (int, float))]
        ys = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        ax.plot(xs, ys, lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        fig, single = plt.subplots(figsize=(4.5, 3))
        single.plot(xs, ys, lw=1.2)
        single.set_xlabel("step")
        single.set_title(f"{title} {key}".strip())
        fig.tight_layout()
        path = out / f"{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    grid.suptitle(title)
    grid.tight_layout()
    grid.savefig(out / "training.png", dpi=80)
    plt.close(grid)
    return paths
