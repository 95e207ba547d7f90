"""report.json and report.html: the per-stage table, training curves and the
same held-out prompts answered by each stage's model, side by side.

    posttrain report runs/demo                     # a demo folder
    posttrain report runs/sft runs/dpo --output cmp.html   # any stage output_dirs
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from posttrain.errors import UserError
from posttrain.metrics import plot_metrics, read_metrics

POLICY_KEYS = ("accuracy", "greedy_accuracy", "reward_mean", "kl_to_ref")
# curves compared across stages, in this order, when a stage logged them
CURVES = ("loss", "reward", "rewards/accuracies", "rewards/margins", "logps/chosen", "accuracy", "kl",
          "eval/greedy_accuracy", "value_loss", "explained_variance", "entropy", "clip_ratio", "completion_length")


def stage_entry(result: dict) -> dict:
    """The report.json figures of one stage (DESIGN.md §6) from its summary and evaluation."""
    entry = {}
    evaluation = result.get("eval") or {}
    for key in POLICY_KEYS:
        if key in evaluation:
            entry[key] = evaluation[key]
    for key, value in (result.get("report") or {}).items():
        entry[key] = value
    final = result.get("final") or {}
    if "reward" in final:  # what the stage optimised, beside what it achieved: reward hacking shows here
        entry["train_reward"] = round(final["reward"], 4)
    entry["wall_s"] = result.get("wall_s")
    entry["peak_rss_mb"] = result.get("peak_rss_mb")
    if "model_copies" in result:
        entry["model_copies"] = sum(result["model_copies"].values())
        entry["copies_held"] = ", ".join(f"{k} {v}" for k, v in result["model_copies"].items() if v)
    return entry


def build_report(task: str, out: Path, stages, results: dict, total_s: float) -> dict:
    report = {
        "task": task,
        "eval_prompts": _count_eval_rows(out),
        "stages": {s.name: stage_entry(results[s.name]) for s in stages},
        "total_wall_s": round(total_s, 1),
    }
    report["_samples"] = {s.name: results[s.name]["eval"].get("samples", []) for s in stages if "eval" in results[s.name]}
    report["_runs"] = {s.name: str(out / s.name) for s in stages}
    return report


def _count_eval_rows(out: Path) -> int:
    path = out / "data" / "eval.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def write_report(report: dict, out: Path, html_path: Path | None = None) -> None:
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (out / "report.json").write_text(json.dumps(public, indent=1) + "\n")
    runs = {name: Path(p) for name, p in report.get("_runs", {}).items()}
    plots = comparison_plots(runs, out / "plots")
    (html_path or out / "report.html").write_text(render_html(public, report.get("_samples", {}), plots))


def comparison_plots(runs: dict[str, Path], plot_dir: Path) -> list[Path]:
    """One PNG per curve with every stage that logged it; also each run's own plots/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {name: read_metrics(path / "metrics.jsonl") for name, path in runs.items()}
    for name, path in runs.items():
        if records[name] and not (path / "plots" / "training.png").is_file():
            plot_metrics(str(path), name)
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in CURVES:
        lines = {n: [(r["step"], r[key]) for r in rs if isinstance(r.get(key), (int, float))] for n, rs in records.items()}
        lines = {n: pts for n, pts in lines.items() if pts}
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name, pts in lines.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, lw=1.3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plot_dir / f"{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}"></figure>'


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else html.escape(str(value))


COLUMN_ORDER = ("accuracy", "greedy_accuracy", "reward_mean", "kl_to_ref", "train_reward", "pair_accuracy", "wall_s",
                "peak_rss_mb", "model_copies", "copies_held")


def findings(stages: dict) -> list[str]:
    """Plain-language notes: what each stage gained over SFT, and reward hacking where it shows."""
    base = stages.get("sft", {})
    notes = []
    for name, entry in stages.items():
        if name == "sft" or "accuracy" not in entry or "accuracy" not in base:
            continue
        gain = entry["accuracy"] - base["accuracy"]
        note = (f"{name}: sampled accuracy {base['accuracy']:.3f} → {entry['accuracy']:.3f} ({gain:+.3f}), "
                f"greedy {base['greedy_accuracy']:.3f} → {entry['greedy_accuracy']:.3f}")
        if "train_reward" in entry and gain < 0.02:
            note += (f"; its training reward reached {entry['train_reward']:.2f} while held-out accuracy did not "
                     "rise: reward hacking — the policy found what its reward scores highly, not what is correct")
        notes.append(note)
    return notes


def render_html(report: dict, samples: dict[str, list], plots: list[Path]) -> str:
    stages = report["stages"]
    present = {k for entry in stages.values() for k in entry}
    columns = [c for c in COLUMN_ORDER if c in present] + sorted(present - set(COLUMN_ORDER))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["stage"] + columns)
    rows = "".join("<tr><td>" + html.escape(name) + "</td>" + "".join(f"<td>{_fmt(e.get(c))}</td>" for c in columns) + "</tr>"
                   for name, e in stages.items())
    side = ""
    if samples:
        names = list(samples)
        first = samples[names[0]]
        side_head = "<th>prompt</th><th>answer</th>" + "".join(f"<th>{html.escape(n)} greedy / sampled</th>" for n in names)
        side_rows = ""
        for i, row in enumerate(first):
            cells = ""
            for n in names:
                s = samples[n][i] if i < len(samples[n]) else {}
                ok = "ok" if s.get("greedy", "").strip() == str(row.get("answer")) else "bad"
                cells += f'<td class="{ok}">{html.escape(s.get("greedy", ""))} / {html.escape(s.get("sampled", ""))}</td>'
            side_rows += f"<tr><td><code>{html.escape(row['prompt'])}</code></td><td>{html.escape(str(row.get('answer')))}</td>{cells}</tr>"
        side = f"<h2>Held-out prompts, answered by each stage</h2><table><tr>{side_head}</tr>{side_rows}</table>"
    figures = "".join(_img(p) for p in plots)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>posttrain report: {html.escape(str(report['task']))}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}}td:first-child{{text-align:left}}
.ok{{background:#e6f4e6}}.bad{{background:#fbe9e9}}figure{{display:inline-block;margin:4px}}img{{max-width:380px}}</style>
</head><body><h1>posttrain report — task <code>{html.escape(str(report['task']))}</code></h1>
<p>{report.get('eval_prompts')} held-out prompts that no stage trained on. accuracy: exact match of completions sampled at
temperature 1.0; greedy_accuracy: greedy decoding; kl_to_ref: mean per-sequence KL to the SFT model on the sampled
completions; wall_s: training time of the stage; peak_rss_mb: the stage process's peak resident memory.
Total wall time: {_fmt(report.get('total_wall_s'))} s.</p>
<h2>Stages</h2><table><tr>{head}</tr>{rows}</table>
<ul>{"".join(f"<li>{html.escape(n)}</li>" for n in findings(stages))}</ul>
<h2>Training curves</h2>{figures}
{side}
</body></html>
"""


def report_main(run_dirs: list[str], output: str) -> None:
    """`posttrain report RUN...`: a demo folder (has report.json) or stage output_dirs."""
    first = Path(run_dirs[0])
    if len(run_dirs) == 1 and (first / "report.json").is_file():
        report = json.loads((first / "report.json").read_text())
        runs = {name: first / name for name in report["stages"] if (first / name).is_dir()}
        report["_runs"] = {k: str(v) for k, v in runs.items()}
        write_report(report, first, Path(output) if output else None)
        print(f"wrote {output or first / 'report.html'}")
        return
    stages, runs = {}, {}
    for run in run_dirs:
        path = Path(run)
        if not (path / "metrics.jsonl").is_file():
            raise UserError(f"{run}: not a run folder (no metrics.jsonl)")
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
        stages[path.name] = {"wall_s": summary.get("wall_s"), "peak_rss_mb": summary.get("peak_rss_mb"),
                             **{k: v for k, v in (summary.get("final") or {}).items() if isinstance(v, (int, float))}}
        runs[path.name] = str(path)
    report = {"task": "runs", "eval_prompts": None, "stages": stages, "_runs": runs}
    target = Path(output) if output else first / "report.html"
    plots = comparison_plots({k: Path(v) for k, v in runs.items()}, target.parent / "plots")
    target.write_text(render_html(report, {}, plots))
    print(f"wrote {target}")
