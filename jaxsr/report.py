"""The end-of-run report: a per-iteration table (stdout + report.md), report.json, a PNG plot, TensorBoard events."""

from __future__ import annotations

from pathlib import Path

from . import artifacts

# Every run's columns; the environment's own (its `report_columns`) stand between "model" and these.
COLUMNS = [("judge_pairwise_accuracy", "judge pairwise acc", "{:.1%}"),
           ("prompts", "prompts", "{}"), ("pairs", "pairs", "{}"), ("tie_rate", "tie rate", "{:.1%}"),
           ("parse_failure_rate", "parse failures", "{:.1%}"), ("mean_chosen_tokens", "chosen len", "{:.1f}"),
           ("mean_rejected_tokens", "rejected len", "{:.1f}")]

# Shown only when the environment knows the ground truth of its generated prompts (the world).
TRUTH_COLUMNS = [("truly_better", "chosen truly better", "{:.1%}"), ("truly_worse", "chosen truly worse", "{:.1%}")]

# Head-to-head columns (jaxsr.headtohead), shown only when some model has a record: "win rate [95% CI] W/T/L".
H2H_COLUMNS = [("h2h_prev", "vs M_{t-1}: win rate [95% CI] W/T/L", "{}"),
               ("h2h_baseline", "vs baseline: win rate [95% CI] W/T/L", "{}")]

H2H_NOTE = (" vs M_{t-1} / vs baseline: M_t's win rate (wins + ties/2)/n against that model, judged pairwise in both "
            "orders (a tie when they disagree), with its 95% Wilson interval and the win/tie/loss counts (eval/h2h_*.json).")


def _fmt(fmt: str, value) -> str:
    return "–" if value is None else fmt.format(value)


def table(rows: list[dict], env_columns=()) -> str:
    """Markdown table, one row per model M_t (pairs/ties/parse failures are of the data M_t generated)."""
    optional = [c for c in TRUTH_COLUMNS + H2H_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    columns = [("model", "model", "{}"), *env_columns, *COLUMNS, *optional]
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(f, r.get(k)) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


# Fixed value axes, so that a change of 0.08 does not look like a cliff: an accuracy on 0.5-1 (lower only when a
# value is below 0.5), an environment's score on the range it declares (Environment.report_axes), counts from 0.
ACCURACY_AXIS = (0.5, 1.0)


def axis_range(key: str, values: list[float], env_axes: dict | None = None) -> tuple[float, float]:
    if env_axes and key in env_axes:
        lo, hi = env_axes[key]
    elif key == "judge_pairwise_accuracy":
        lo, hi = ACCURACY_AXIS
    else:
        return 0.0, max(1.0, max(values) * 1.1)
    return min(lo, min(values)), max(hi, max(values))


def plot(rows: list[dict], path: Path, env_columns=(), env_axes: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in rows]
    panels = [(k, title) for k, title, _ in env_columns[:1]]
    panels += [("judge_pairwise_accuracy", "judge pairwise accuracy"), ("pairs", "pairs generated")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (key, title) in zip(axes, panels):
        ys = [r.get(key) for r in rows]
        pts = [(x, y) for x, y in zip(its, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            ax.set_ylim(*axis_range(key, [p[1] for p in pts], env_axes))
        ax.set_title(title)
        ax.set_xticks(its, [r["model"] for r in rows])  # "baseline" (iteration 0), M1, M2, ...
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tensorboard(rows: list[dict], run_dir: Path) -> None:
    """Eval figures per iteration plus every training stage's metrics.jsonl, as TensorBoard scalars."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard")) as w:
        for r in rows:
            for key, value in r.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    w.add_scalar(f"eval/{key}", value, r["iteration"])
        for metrics in sorted((run_dir / "train").glob("*/metrics.jsonl")):
            stage = metrics.parent.name
            for rec in artifacts.read_jsonl(metrics):
                for key, value in rec.items():
                    if isinstance(value, (int, float)) and key != "step":
                        w.add_scalar(f"{stage}/{key}", value, rec.get("step", 0))


def write_report(rows: list[dict], run_dir: Path, name: str, env_columns=(), env_axes: dict | None = None) -> dict:
    run_dir = Path(run_dir)
    clean = [{k: v for k, v in r.items() if k != "samples"} for r in rows]
    artifacts.write_json_atomic(run_dir / "report.json", clean)
    plot(rows, run_dir / "report.png", env_columns, env_axes)
    tensorboard(clean, run_dir)
    has_h2h = any(r.get(c[0]) is not None for r in rows for c in H2H_COLUMNS)
    md = [f"# jaxsr run `{name}`", "", table(rows, env_columns), "",
          "The first columns after the model are the environment's grader on greedy answers to held-out "
          "instructions. Judge pairwise accuracy: agreement of M_t's judge with reference rankings. Prompts, pairs, "
          "tie and parse-failure rates and lengths describe the data M_t generated for training M_{t+1}."
          + (H2H_NOTE if has_h2h else ""), "",
          "![report](report.png)", ""]
    for r in rows:
        if r.get("samples"):
            md += [f"## Sample answers of {r['model']}", ""]
            md += [f"- `{s['instruction']}` → `{s['response']}` (score {s['score']})" for s in r["samples"]]
            md.append("")
    (run_dir / "report.md").write_text("\n".join(md))
    print(table(rows, env_columns))
    print(f"\nreport: {run_dir / 'report.md'}  plot: {run_dir / 'report.png'}  data: {run_dir / 'report.json'}")
    return {}
