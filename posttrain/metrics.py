"""metrics.jsonl writer, logging backends (tensorboard, wandb), progress bar, run summary and plots/*.png."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Protocol

from posttrain import distributed
from posttrain.errors import UserError


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Backend(Protocol):
    """Somewhere logged records go besides metrics.jsonl; opened, fed and closed on rank 0 only."""

    def log(self, step: int, values: dict) -> None:
        """Record the scalar values of one logged step."""

    def close(self, failed: bool = False) -> None:
        """Flush and release; ``failed`` when the run ends with an error."""


def _scalars(values: dict) -> dict:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardBackend:
    """Event files under ``log_dir`` via torch's SummaryWriter, one scalar series per metric."""

    def __init__(self, log_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events past its checkpoint, as metrics.jsonl drops those lines
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, values: dict) -> None:
        for key, value in _scalars(values).items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbBackend:
    """A Weights & Biases run, offline (files under output_dir/wandb/) unless WANDB_MODE or WANDB_API_KEY is set."""

    def __init__(self, output_dir: str, run_name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise UserError("report_to: wandb is not installed (pip install wandb), or drop it from report_to") from None
        online = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "posttrain", name=run_name or None,
                              dir=str(output_dir), config=config, mode=None if online else "offline")

    def log(self, step: int, values: dict) -> None:
        self.run.log(_scalars(values), step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_backends(cfg, start_step: int = 0) -> list[Backend]:
    """The backends named in ``report_to`` (rank 0; none elsewhere). `none` and `jsonl` add none: metrics.jsonl is always written."""
    if not distributed.is_main():
        return []
    from dataclasses import asdict

    backends: list[Backend] = []
    for name in dict.fromkeys(getattr(cfg, "report_to", ())):
        if name == "tensorboard":
            backends.append(TensorBoardBackend(Path(cfg.output_dir) / "runs", start_step))
        elif name == "wandb":
            backends.append(WandbBackend(cfg.output_dir, cfg.run_name, asdict(cfg)))
    return backends


class MetricsLogger:
    """Appends one JSON object per logged step (and hands it to each backend); on resume drops lines past the checkpoint.

    Used as a context manager it also closes on an error.
    """

    def __init__(self, output_dir: str, total_steps: int, start_step: int = 0, elapsed_s: float = 0.0,
                 progress: bool = True, desc: str = "train", backends: list[Backend] | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.start_time = time.time() - elapsed_s
        self.main = distributed.is_main()
        self.backends = list(backends or [])
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
            for backend in self.backends:
                backend.log(step, {k: v for k, v in record.items() if k != "step"})
            if self.bar is not None:
                shown = {k: f"{record[k]:.3g}" for k in ("loss", "reward", "accuracy") if isinstance(record.get(k), float)}
                self.bar.set_postfix(shown, refresh=False)
        return record

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, failed: bool = False) -> None:
        """Close the bar and every backend (once; later calls do nothing)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close(failed)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.close(failed=kind is not None)
        return False


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
    from matplotlib.ticker import MaxNLocator

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
        marker = "o" if len(xs) <= 30 else None  # single logged points stay visible
        ax.plot(xs, ys, lw=1.2, marker=marker, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        fig, single = plt.subplots(figsize=(5, 3))
        single.plot(xs, ys, lw=1.2, marker=marker, markersize=3)
        single.set_xlabel("step")
        single.set_title(f"{title} {key}".strip())
        for axis in (ax, single):
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
            axis.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    grid.suptitle(title)
    grid.tight_layout()
    grid.savefig(out / "training.png", dpi=100)
    plt.close(grid)
    return paths
