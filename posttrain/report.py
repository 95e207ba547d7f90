"""report.json and report.html: the per-stage table, training curves and the
same held-out prompts answered by each stage's model, side by side.

    posttrain report runs/demo                     # a demo folder
    posttrain report runs/sft runs/dpo --output cmp.html   # any stage output_dirs
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import textwrap
from pathlib import Path

import yaml

from posttrain.errors import UserError
from posttrain.metrics import plot_metrics, read_metrics

POLICY_KEYS = ("accuracy", "greedy_accuracy", "reward_mean", "kl_to_ref")


def stage_entry(result: dict, train_reward_start: float | None = None) -> dict:
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
        if train_reward_start is not None:
            entry["train_reward_start"] = round(train_reward_start, 4)
        entry["train_reward"] = round(final["reward"], 4)
    entry["wall_s"] = result.get("wall_s")
    entry["peak_rss_mb"] = result.get("peak_rss_mb")
    if "model_copies" in result:
        entry["model_copies"] = sum(result["model_copies"].values())
        entry["copies_held"] = ", ".join(f"{k} {v}" for k, v in result["model_copies"].items() if v)
    return entry


def first_logged(path: Path, key: str) -> float | None:
    """The first logged value of ``key`` in a metrics.jsonl: the mean over the first logging window."""
    return first_logged_in(read_metrics(path), key)


def first_logged_in(records: list[dict], key: str) -> float | None:
    return next((r[key] for r in records if isinstance(r.get(key), (int, float))), None)


def build_report(task: str, out: Path, stages, results: dict, total_s: float) -> dict:
    entries = {s.name: stage_entry(results[s.name], first_logged(out / s.name / "metrics.jsonl", "reward")) for s in stages}
    for name, label in stage_verdicts(entries).items():
        entries[name]["verdict"] = label
    report = {
        "task": task,
        "eval_prompts": _count_eval_rows(out),
        "stages": entries,
        "total_wall_s": round(total_s, 1),
    }
    report["_samples"] = {s.name: results[s.name]["eval"].get("samples", []) for s in stages if "eval" in results[s.name]}
    report["_runs"] = {s.name: str(out / s.name) for s in stages}
    return report


def _count_eval_rows(out: Path) -> int:
    path = out / "data" / "eval.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


# ------------------------------------------------------------------ verdicts

REWARD_TOL = 0.05  # a training reward "moved" when it changed by more than this (reward units)
ACCURACY_TOL = 0.02  # held-out accuracy "moved" when it changed by more than this (2 points)


def verdict(train_reward_start: float | None, train_reward_end: float | None, accuracy_before: float,
            accuracy_after: float, reward_tol: float = REWARD_TOL, accuracy_tol: float = ACCURACY_TOL) -> str:
    """What a stage did, judged on held-out accuracy against its starting model (SFT) and its own training reward.

    A change counts when it exceeds its tolerance (``> reward_tol`` in reward units between the first and last
    logged training reward; ``> accuracy_tol`` in held-out accuracy):

    - "improved":         held-out accuracy rose (whatever the training reward did);
    - "reward hacking":   the training reward rose while held-out accuracy fell — the policy found what its
                          reward scores highly, not what is correct;
    - "regressed":        held-out accuracy fell, the training reward did not rise (or the stage has none);
    - "no held-out gain": the training reward rose, held-out accuracy stayed within tolerance;
    - "no learning":      neither rose: accuracy within tolerance and the training reward flat, falling or absent.

    Stages without a training reward (DPO) pass None for both reward arguments.
    """
    accuracy_change = accuracy_after - accuracy_before
    reward_rose = (train_reward_start is not None and train_reward_end is not None
                   and train_reward_end - train_reward_start > reward_tol)
    if accuracy_change > accuracy_tol:
        return "improved"
    if accuracy_change < -accuracy_tol:
        return "reward hacking" if reward_rose else "regressed"
    return "no held-out gain" if reward_rose else "no learning"


def stage_verdicts(stages: dict) -> dict[str, str]:
    """`verdict` of every policy stage measured against SFT's held-out accuracy."""
    base = stages.get("sft", {})
    if "accuracy" not in base:
        return {}
    return {name: verdict(e.get("train_reward_start"), e.get("train_reward"), base["accuracy"], e["accuracy"])
            for name, e in stages.items() if name != "sft" and "accuracy" in e}


def findings(stages: dict) -> list[str]:
    """Plain-language notes: what each stage gained over SFT, with its verdict."""
    base = stages.get("sft", {})
    notes = []
    for name, label in stage_verdicts(stages).items():
        entry = stages[name]
        gain = entry["accuracy"] - base["accuracy"]
        note = f"{name}: {label} — held-out sampled accuracy {base['accuracy']:.3f} → {entry['accuracy']:.3f} ({gain:+.3f})"
        if "greedy_accuracy" in entry and "greedy_accuracy" in base:
            note += f", greedy {base['greedy_accuracy']:.3f} → {entry['greedy_accuracy']:.3f}"
        if entry.get("train_reward_start") is not None and entry.get("train_reward") is not None:
            note += f"; training reward {entry['train_reward_start']:.3f} → {entry['train_reward']:.3f}"
        if label == "reward hacking":
            note += ": the policy found what its reward scores highly, not what is correct"
        notes.append(note)
    return notes


# ------------------------------------------------------------------ plots

# Stages are drawn in families, one figure each, so that a curve shares its axes only with curves of the same
# meaning and scale: SFT's cross-entropy (0-3.5 nats) never flattens an RL loss near 0, a reward model's score
# margin never sits beside DPO's implicit-reward margin, reward-model scores never beside 0/1 rule rewards, and
# a 60-step RL run gets its own x axis rather than a corner of SFT's 600 steps.
FAMILY_TITLES = {"sft": "supervised fine-tuning (SFT)", "rm": "reward model training (RM)",
                 "dpo": "preference optimisation (DPO)", "run": "other runs"}
RL_KINDS = ("ppo", "grpo")
REWARD_NAMES = {"reward_model": "reward-model score"}  # rewards/<source> -> what the source is
X_LABELS = {"sft": "optimizer step", "rm": "optimizer step", "dpo": "optimizer step", "rl": "RL step (one rollout batch)"}

# (metric key, the stage kinds whose values of that key share one meaning and scale, panel title with units);
# panels are drawn in this order, and a key logged by two kinds with different meanings gets one panel per kind
PANELS = (
    ("loss", ("sft",), "training loss: cross-entropy (nats/token)"),
    ("eval/loss", ("sft",), "held-out loss (nats/token)"),
    ("loss", ("rm",), "training loss: −log σ(r_chosen − r_rejected)"),
    ("accuracy", ("rm",), "training pair accuracy (r_chosen > r_rejected)"),
    ("rewards/margins", ("rm",), "training score margin r_chosen − r_rejected"),
    ("eval/pair_accuracy", ("rm",), "held-out pair accuracy"),
    ("loss", ("dpo",), "training loss (DPO)"),
    ("rewards/accuracies", ("dpo",), "implicit-reward pair accuracy"),
    ("rewards/margins", ("dpo",), "implicit-reward margin β·Δlog-ratio (nats)"),
    ("logps/chosen", ("dpo",), "log-prob of chosen (nats/sequence)"),
    ("eval/rewards/accuracies", ("dpo",), "held-out implicit-reward pair accuracy"),
    ("reward", RL_KINDS, "training reward: {reward}, mean per completion"),
    ("eval/reward", RL_KINDS, "held-out reward: {reward}, greedy"),
    ("eval/greedy_accuracy", ("sft", *RL_KINDS), "held-out greedy accuracy (exact match)"),
    ("kl", ("ppo",), "PPO: KL to reference (nats/completion)"),
    ("kl", ("grpo",), "GRPO: KL to reference (nats/token)"),
    ("loss", ("ppo",), "PPO loss: policy + vf_coef·value"),
    ("loss", ("grpo",), "GRPO loss"),
    ("value_loss", ("ppo",), "PPO value loss"),
    ("explained_variance", ("ppo",), "PPO critic explained variance"),
    ("entropy", RL_KINDS, "policy entropy (nats/token)"),
    ("clip_ratio", RL_KINDS, "clipped fraction of tokens"),
    ("completion_length", RL_KINDS, "completion length (tokens)"),
)
OTHER_CURVES = ("loss", "reward", "accuracy", "kl", "entropy")  # runs of no known stage: one panel per key


def stage_kind(run: Path, name: str) -> str:
    """`sft`, `rm`, `dpo`, `ppo` or `grpo`: the stage config whose fields the run's config.yaml holds (the
    closest match), else the folder name's prefix (`ppo_rm` -> ppo), else `run`."""
    from posttrain.config import STAGE_CONFIGS

    path = run / "config.yaml"
    loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    if isinstance(loaded, dict) and loaded:
        keys = set(loaded)
        return min(STAGE_CONFIGS, key=lambda s: len(keys ^ {f.name for f in dataclasses.fields(STAGE_CONFIGS[s])}))
    prefix = name.split("_")[0]
    return prefix if prefix in STAGE_CONFIGS else "run"


def reward_sources(records: list[dict]) -> tuple[str, ...]:
    """The reward sources an RL run logged (`rewards/exact_match`, `rewards/reward_model`), in logged order;
    `rewards/errors` counts failed calls, it is no source."""
    return tuple(dict.fromkeys(k.split("/", 1)[1] for r in records for k in r if k.startswith("rewards/") and k != "rewards/errors"))


def reward_label(sources: tuple[str, ...]) -> str:
    return " + ".join(REWARD_NAMES.get(s, s) for s in sources) or "reward"


def stage_families(kinds: dict[str, str], records: dict[str, list]) -> dict[str, dict]:
    """family key -> {"title", "x_label", "reward", "stages"}: SFT, RM and DPO alone; RL stages by reward source."""
    families: dict[str, dict] = {}
    for name, kind in kinds.items():
        if not records[name]:
            continue
        if kind in RL_KINDS:
            sources = reward_sources(records[name])
            key = "rl_" + "_".join(sources) if sources else "rl"
            title, x_label = f"RL on {reward_label(sources)}", X_LABELS["rl"]
        else:
            key, title, x_label, sources = kind, FAMILY_TITLES[kind], X_LABELS.get(kind, "step"), ()
        family = families.setdefault(key, {"title": title, "x_label": x_label, "reward": reward_label(sources), "stages": []})
        family["stages"].append(name)
    return families


def family_panels(family: dict, kinds: dict[str, str], records: dict[str, list]) -> list[tuple[str, dict]]:
    """(panel title, {stage: [(step, value)]}) for each panel of a family that some stage of it logged."""
    def points(name, key):
        return [(r["step"], r[key]) for r in records[name] if isinstance(r.get(key), (int, float))]

    specs = PANELS if any(kinds[n] != "run" for n in family["stages"]) else [(k, ("run",), k) for k in OTHER_CURVES]
    panels = []
    for key, panel_kinds, title in specs:
        lines = {n: points(n, key) for n in family["stages"] if kinds[n] in panel_kinds}
        lines = {n: pts for n, pts in lines.items() if pts}
        if lines:
            panels.append((title.format(reward=family["reward"]), lines))
    return panels


def figure_layout(runs: dict[str, Path]) -> dict[str, dict]:
    """What `comparison_plots` draws, before drawing it: family key (the PNG's name) -> {"title", "x_label",
    "stages", "panels": [(panel title, {stage: [(step, value)]})]}, families without a logged panel left out."""
    records = {name: read_metrics(path / "metrics.jsonl") for name, path in runs.items()}
    kinds = {name: stage_kind(path, name) for name, path in runs.items()}
    layout = {}
    for key, family in stage_families(kinds, records).items():
        panels = family_panels(family, kinds, records)
        if panels:
            layout[key] = {"title": family["title"], "x_label": family["x_label"], "stages": family["stages"], "panels": panels}
    return layout


def stage_styles(names) -> dict[str, dict]:
    """One line style per stage, the same in every plot: colour, dash pattern and marker differ together, and
    earlier stages are drawn wider, so curves that coincide stay visible."""
    colors = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
    dashes = ("-", "--", "-.", ":")
    markers = ("o", "s", "^", "v", "D", "x", "P", "*")
    return {name: {"color": colors[i % len(colors)], "linestyle": dashes[i % len(dashes)], "marker": markers[i % len(markers)],
                   "lw": max(1.0, 3.2 - 0.4 * i), "markersize": max(4.0, 10 - 1.0 * i), "markerfacecolor": "none",
                   "markeredgewidth": 1.4} for i, name in enumerate(names)}


def write_report(report: dict, out: Path, html_path: Path | None = None) -> Path:
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (out / "report.json").write_text(json.dumps(public, indent=1) + "\n")
    runs = {name: Path(p) for name, p in report.get("_runs", {}).items()}
    plots = comparison_plots(runs, out / "plots")
    target = html_path or out / "report.html"
    target.write_text(render_html(public, report.get("_samples", {}), plots))
    return target


PANEL_COLUMNS = 4  # four panels of 3.3 in at 100 dpi: 1320 px, the width of the report's 1400 px page


def comparison_plots(runs: dict[str, Path], plot_dir: Path) -> list[Path]:
    """One PNG per stage family (plots/<family>.png), one panel per metric with its own axes (`figure_layout`);
    also each run's own plots/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for name, path in runs.items():
        if (path / "metrics.jsonl").is_file() and not (path / "plots" / "training.png").is_file():
            plot_metrics(str(path), name)
    plot_dir.mkdir(parents=True, exist_ok=True)
    styles = stage_styles(runs)
    paths = []
    for key, family in figure_layout(runs).items():
        panels = family["panels"]
        cols = min(PANEL_COLUMNS, len(panels))
        rows = -(-len(panels) // cols)
        width = 3.3 if cols > 2 else 4.4  # a figure of one or two panels is not shrunk to a thumbnail
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 2.6 * rows + 0.8), squeeze=False, layout="constrained")
        for ax in axes.flat[len(panels):]:
            ax.remove()
        for ax, (title, lines) in zip(axes.flat, panels):
            for i, (name, pts) in enumerate(lines.items()):
                same = next((other for other, theirs in list(lines.items())[:i] if theirs == pts), None)
                label = f"{name} (= {same})" if same else name  # a curve drawn exactly over another says so
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, markevery=max(1, len(pts) // 8), **styles[name])
            ax.set_title(textwrap.fill(title, 44 if cols > 2 else 60), fontsize=9)
            ax.set_xlabel(family["x_label"], fontsize=8)
            ax.tick_params(labelsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)  # values as logged, not "+5.549" or "1e-5" above the axes
            ax.grid(alpha=0.3)
            if len(lines) < len(family["stages"]) or any("(=" in t.get_label() for t in ax.get_lines()):
                ax.legend(fontsize=7, frameon=False)  # which of the family's stages this panel shows
        names = family["stages"]
        fig.suptitle(f"{family['title']}: {', '.join(names)}", fontsize=11)
        if len(names) > 1:  # one legend for the family, below its panels, never over a curve
            fig.legend([plt.Line2D([], [], **styles[n]) for n in names], names, loc="outside lower center",
                       ncol=min(6, len(names)), fontsize=9, frameon=False)
        path = plot_dir / f"{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------ HTML

def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}"></figure>'


# column key -> (header, format of every number in it); the key itself is the cell's title, as in report.json.
# Headers are short and wrap (units in the definitions below the table), so twelve columns fit a 1400 px page.
COLUMNS = {
    "accuracy": ("sampled acc.", "{:.3f}"),
    "greedy_accuracy": ("greedy acc.", "{:.3f}"),
    "eval_greedy_accuracy": ("greedy acc., last eval", "{:.3f}"),
    "reward_mean": ("mean reward", "{:.3f}"),
    "kl_to_ref": ("KL to SFT", "{:.3f}"),
    "train_reward": ("train reward first → last", "{:.3f}"),
    "pair_accuracy": ("RM pair acc., held-out", "{:.3f}"),
    "train_pair_accuracy": ("RM pair acc., training", "{:.3f}"),
    "train_loss": ("train loss, last", "{:.3f}"),
    "verdict": ("verdict", "{}"),
    "wall_s": ("wall s", "{:,.1f}"),
    "peak_rss_mb": ("peak RSS MB", "{:,.0f}"),
    "model_copies": ("model copies", "{:,d}"),
    "copies_held": ("copies held", "{}"),
}
HIDDEN = {"train_reward_start", "eval_pairs"}  # shown inside the train_reward and pair_accuracy cells


def column_format(values) -> str:
    """The one number format of a column not in COLUMNS: decimals set by its largest magnitude."""
    numbers = [abs(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numbers and all(isinstance(v, int) for v in values if v is not None and not isinstance(v, str)):
        return "{:,d}"
    largest = max(numbers, default=0.0)
    return "{:,.0f}" if largest >= 1000 else "{:,.1f}" if largest >= 100 else "{:.3f}" if largest >= 0.01 or largest == 0 else "{:.2e}"


def _cell(value, fmt: str) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if fmt == "{:,d}" and isinstance(value, float):
            fmt = "{:,.0f}"
        return html.escape(fmt.format(value) if fmt != "{}" else str(value))
    return html.escape(str(value))


def stage_table(stages: dict) -> str:
    present = {k for entry in stages.values() for k in entry} - HIDDEN
    columns = [c for c in COLUMNS if c in present] + sorted(present - set(COLUMNS))
    formats = {c: COLUMNS[c][1] if c in COLUMNS else column_format([e.get(c) for e in stages.values()]) for c in columns}
    text_columns = {c for c in columns if all(isinstance(e.get(c), str) or e.get(c) is None for e in stages.values())}
    head = "<th>stage</th>" + "".join(f'<th title="{html.escape(c)}">{html.escape(COLUMNS.get(c, (c,))[0])}</th>' for c in columns)
    rows = ""
    for name, entry in stages.items():
        cells = ""
        for c in columns:
            text = _cell(entry.get(c), formats[c])
            if c == "train_reward" and entry.get("train_reward_start") is not None and text:
                text = f"{_cell(entry['train_reward_start'], formats[c])} → {text}"
            if c == "pair_accuracy" and entry.get("eval_pairs") and text:
                text += f" of {entry['eval_pairs']:,}"
            css = "text" if c in text_columns else "num"
            if c == "verdict" and text:
                css += " verdict-" + text.replace(" ", "-")
            cells += f'<td class="{css}" title="{html.escape(c)}">{text}</td>'
        rows += f"<tr><td>{html.escape(name)}</td>{cells}</tr>"
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def samples_table(samples: dict[str, list]) -> str:
    if not samples:
        return ""
    names = list(samples)
    first = samples[names[0]]
    head = "<th>prompt</th><th>answer</th>" + "".join(f"<th>{html.escape(n)} greedy / sampled</th>" for n in names)
    rows = ""
    for i, row in enumerate(first):
        answer = str(row.get("answer"))
        cells = ""
        for n in names:
            s = samples[n][i] if i < len(samples[n]) else {}
            shown = []
            for kind in ("greedy", "sampled"):
                text = s.get(kind, "")
                ok = text.strip() == answer
                shown.append(f'<span class="{"ok" if ok else "bad"}" title="{kind}">{"✓ " if ok else ""}{html.escape(text)}</span>')
            cells += f"<td>{' / '.join(shown)}</td>"
        rows += f"<tr><td><code>{html.escape(row['prompt'])}</code></td><td>{html.escape(answer)}</td>{cells}</tr>"
    return (f"<h2>Held-out prompts, answered by each stage</h2><p>Greedy / sampled completion; ✓ marks an exact match. "
            f"Bytes that are not UTF-8 are shown as <code>\\xNN</code>.</p>"
            f'<div class="scroll"><table class="samples"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')


STYLE = """body{font-family:system-ui,sans-serif;margin:0 auto;padding:1em;max-width:1400px;line-height:1.45;color:#222;
overflow-wrap:anywhere}
h1{font-size:1.6em;margin:.3em 0}h2{font-size:1.25em;margin:1.2em 0 .4em}
.scroll{overflow-x:auto;max-width:100%;margin:.6em 0}
table{border-collapse:separate;border-spacing:0;border-top:1px solid #ccc;border-left:1px solid #ccc;
font-variant-numeric:tabular-nums;overflow-wrap:normal}
td,th{border-right:1px solid #ccc;border-bottom:1px solid #ccc;padding:4px 8px;white-space:nowrap;background:#fff}
th{background:#f3f3f3;text-align:center;font-weight:600;white-space:normal;min-width:4.5em;vertical-align:bottom}
td.num{text-align:right}td.text{text-align:left;white-space:normal;min-width:7em}
tr>td:first-child,tr>th:first-child{text-align:left;font-weight:600}.samples code{font-size:1.1em}
.verdict-improved{color:#176b1f;font-weight:600}.verdict-reward-hacking,.verdict-regressed{color:#a31515;font-weight:600}
.samples td{text-align:left}.ok{background:#e3f3e3}.bad{color:#6d6d6d}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}dt{font-weight:600}dd{margin:0}
@media (max-width:600px){dl{grid-template-columns:1fr}dd{margin-left:1em}}
.figures{display:grid;grid-template-columns:minmax(0,1fr);gap:16px}
figure{margin:0}img{max-width:100%;height:auto;display:block}"""


def render_html(report: dict, samples: dict[str, list], plots: list[Path]) -> str:
    verdicts = stage_verdicts(report["stages"])  # recomputed, so a report.json from before verdicts gets them too
    stages = {name: {**entry, **({"verdict": verdicts[name]} if name in verdicts else {})} for name, entry in report["stages"].items()}
    if report.get("runs"):  # stage output_dirs compared: named by their folders, not by a task
        names = report["runs"]
        title = f"run {names[0]}" if len(names) == 1 else "runs " + ", ".join(names)
        heading = ("run " if len(names) == 1 else "runs ") + ", ".join(f"<code>{html.escape(n)}</code>" for n in names)
    else:
        title = f"task {report['task']}"
        heading = f"task <code>{html.escape(str(report['task']))}</code>"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in findings(stages))
    total = report.get("total_wall_s")
    prompts = report.get("eval_prompts")
    about = f"{prompts:,} held-out prompts that no stage trained on." if prompts else "Runs compared side by side."
    if total is not None:
        about += f" Total wall time {total:,.1f} s."
    definitions = "".join(f"<dt>{html.escape(COLUMNS[k][0])}</dt><dd>{html.escape(text)}</dd>" for k, text in (
        ("accuracy", "exact match of completions sampled at temperature 1.0 (report.json: accuracy)"),
        ("greedy_accuracy", "exact match under greedy decoding (greedy_accuracy)"),
        ("kl_to_ref", "mean per-sequence KL to the SFT model on the sampled completions, in nats (kl_to_ref)"),
        ("pair_accuracy", "the reward model's accuracy on held-out preference pairs: r_chosen > r_rejected (pair_accuracy)"),
        ("train_pair_accuracy", "the reward model's pair accuracy on its training pairs, last logging window "
                                "(metrics.jsonl: accuracy)"),
        ("eval_greedy_accuracy", "exact match under greedy decoding at the run's last evaluation "
                                 "(metrics.jsonl: eval/greedy_accuracy)"),
        ("train_loss", "the training loss of the last logging window; each stage's loss has its own scale (loss)"),
        ("train_reward", "the reward the stage optimised, mean of its first and of its last logging window "
                         "(train_reward_start, train_reward)"),
        ("verdict", f"held-out accuracy against SFT and the training reward against its start: a change counts "
                    f"beyond ±{ACCURACY_TOL:.2f} accuracy and ±{REWARD_TOL:.2f} reward; \"reward hacking\" only when "
                    "the training reward rose while held-out accuracy fell"),
        ("wall_s", "training time of the stage in seconds (wall_s)"),
        ("peak_rss_mb", "the stage process's peak resident memory in MB (peak_rss_mb)"),
    ) if any(k in e for e in stages.values()))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>posttrain report: {html.escape(title)}</title>
<style>{STYLE}</style>
</head><body><h1>posttrain report — {heading}</h1>
<p>{about}</p>
<h2>Stages</h2>{stage_table(stages)}
<ul>{notes}</ul>
<dl>{definitions}</dl>
<h2>Training curves</h2><div class="figures">{"".join(_img(p) for p in plots)}</div>
{samples_table(samples)}
</body></html>
"""


def run_entry(kind: str, summary: dict, records: list[dict]) -> dict:
    """The table figures of one stage output_dir, from its summary.json and metrics.jsonl, each under the name of
    what it is: a reward model's training pair accuracy is not a policy's sampled accuracy, and a training loss
    is not comparable across stages (so it is shown, last value only, and never plotted with another stage's)."""
    final = summary.get("final") or {}
    entry = {}
    if isinstance(final.get("loss"), (int, float)):
        entry["train_loss"] = final["loss"]
    if kind == "rm" and isinstance(final.get("accuracy"), (int, float)):
        entry["train_pair_accuracy"] = final["accuracy"]
    if isinstance(final.get("reward"), (int, float)):
        entry["train_reward_start"] = first_logged_in(records, "reward")
        entry["train_reward"] = final["reward"]
    greedy = [r["eval/greedy_accuracy"] for r in records if isinstance(r.get("eval/greedy_accuracy"), (int, float))]
    if greedy:
        entry["eval_greedy_accuracy"] = greedy[-1]
    report = summary.get("report") or {}  # rm: held-out pair_accuracy and eval_pairs
    entry |= {k: report[k] for k in ("pair_accuracy", "eval_pairs") if report.get(k) is not None}
    entry |= {"wall_s": summary.get("wall_s"), "peak_rss_mb": summary.get("peak_rss_mb")}
    if summary.get("model_copies"):
        entry["model_copies"] = sum(summary["model_copies"].values())
    return entry


def report_main(run_dirs: list[str], output: str) -> None:
    """`posttrain report RUN...`: a demo folder (has report.json) or stage output_dirs."""
    first = Path(run_dirs[0])
    if len(run_dirs) == 1 and (first / "report.json").is_file():
        report = json.loads((first / "report.json").read_text())
        runs = {name: first / name for name in report["stages"] if (first / name).is_dir()}
        report["_runs"] = {k: str(v) for k, v in runs.items()}
        print(f"wrote {write_report(report, first, Path(output) if output else None)}")
        return
    stages, runs = {}, {}
    for run in run_dirs:
        path = Path(run)
        if not (path / "metrics.jsonl").is_file():
            raise UserError(f"{run}: not a run folder (no metrics.jsonl)")
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
        stages[path.name] = run_entry(stage_kind(path, path.name), summary, read_metrics(path / "metrics.jsonl"))
        runs[path.name] = str(path)
    report = {"task": None, "runs": list(runs), "eval_prompts": None, "stages": stages, "_runs": runs}
    target = Path(output) if output else first / "report.html"
    plots = comparison_plots({k: Path(v) for k, v in runs.items()}, target.parent / "plots")
    target.write_text(render_html(report, {}, plots))
    print(f"wrote {target}")
