"""``diffalign compare``: a report over eval dirs (and training runs).

Inputs are eval dirs (``summary.json`` + ``per_image.csv`` from ``diffalign eval``) and/or
training run dirs (``metrics.jsonl``). An eval made with ``--lora RUN_DIR`` picks up that
run's ``metrics.jsonl`` automatically. Writes ``report.md``, ``report.html``,
``curves.png`` (reward/loss vs step), ``side_by_side.png`` and ``table.csv`` to ``out``.

Against the base eval, over the (prompt, seed) keys both evaluated (shared seeds, so the
same starting noise): the win rate, the fraction where the method scores higher (ties
count one half), and the paired difference ``method - base`` with its 95% t interval
(much tighter than comparing two marginal intervals, because the shared noise cancels).
"""

from __future__ import annotations

import csv
import html
import json
import math
import shutil
from pathlib import Path

from ..errors import UserError


class EvalRun:
    def __init__(self, path: Path, name: str | None = None):
        self.path = path
        self.summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        self.name = name or self.summary.get("label") or path.name
        self.columns = list(self.summary.get("reward_columns") or self.summary["rewards"].keys())
        csv_path = path / "per_image.csv"
        if not csv_path.is_file():
            raise UserError(f"{path}: summary.json but no per_image.csv (not a complete `diffalign eval` dir)")
        with open(csv_path, newline="", encoding="utf-8") as f:
            self.rows = list(csv.DictReader(f))
        self.by_key = {(r["prompt"], int(r["seed"])): r for r in self.rows}
        lora = (self.summary.get("config") or {}).get("lora")
        self.metrics_path = None
        if lora and (Path(lora) / "metrics.jsonl").is_file():
            self.metrics_path = Path(lora) / "metrics.jsonl"
        elif (path / "metrics.jsonl").is_file():
            self.metrics_path = path / "metrics.jsonl"

    @property
    def has_lora(self) -> bool:
        return bool((self.summary.get("config") or {}).get("lora"))


def read_metrics(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a partially written last line of a running job
    return out


def win_rate(run: EvalRun, base: EvalRun, column: str) -> dict:
    """``{"win_rate", "n_paired", "delta_mean", "delta_ci_low", "delta_ci_high"}`` of ``run`` vs ``base``."""
    from .summary import confidence_interval

    wins = n = 0.0
    diffs: list[float] = []
    for key, row in run.by_key.items():
        brow = base.by_key.get(key)
        if brow is None or column not in row or column not in brow:
            continue
        try:
            a, b = float(row[column]), float(brow[column])
        except ValueError:
            continue
        if math.isnan(a) or math.isnan(b):
            continue
        n += 1
        wins += 1.0 if a > b else 0.5 if a == b else 0.0
        diffs.append(a - b)
    d = confidence_interval(diffs)
    return {"win_rate": wins / n if n else float("nan"), "n_paired": int(n),
            "delta_mean": d["mean"], "delta_ci_low": d["ci_low"], "delta_ci_high": d["ci_high"]}


def _fmt(x: float, nd: int = 3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def plot_curves(metric_runs: dict[str, list[dict]], out: Path) -> Path | None:
    """One panel per metric (reward_mean if any run logs it, then loss)."""
    if not metric_runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in ("reward_mean", "loss", "implicit_acc") if any(any(k in m for m in ms) for ms in metric_runs.values())]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, ms in metric_runs.items():
            pts = [(m.get("step", i), m[key]) for i, m in enumerate(ms) if isinstance(m.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=name, lw=1.2, marker="." if len(xs) < 50 else None)  # a lone point stays visible
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_ylabel(key)
        ax.set_title(f"{key} vs step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_side_by_side(runs: list[EvalRun], out: Path, max_prompts: int = 6, seeds_per_prompt: int = 1) -> Path | None:
    """Rows = (prompt, seed) keys common to all evals; columns = methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    common = [k for k in runs[0].by_key if all(k in r.by_key for r in runs)]
    keys, per_prompt = [], {}
    for k in common:
        if per_prompt.get(k[0], 0) < seeds_per_prompt and len({p for p, _ in keys} | {k[0]}) <= max_prompts:
            per_prompt[k[0]] = per_prompt.get(k[0], 0) + 1
            keys.append(k)
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), len(runs), figsize=(1.7 * len(runs) + 1.5, 1.8 * len(keys)), squeeze=False)
    first_col = runs[0].columns[0] if runs[0].columns else None
    for i, key in enumerate(keys):
        for j, run in enumerate(runs):
            ax = axes[i][j]
            row = run.by_key[key]
            ax.imshow(Image.open(run.path / row["image"]).convert("RGB"), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(run.name, fontsize=8)
            if first_col and first_col in row:
                ax.set_xlabel(f"{first_col}={_fmt(float(row[first_col]), 2)}", fontsize=7)
            if j == 0:
                text = key[0] if len(key[0]) < 40 else key[0][:37] + "..."
                ax.set_ylabel(f"{text}\nseed {key[1]}", fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def compare(run_dirs: list[str], out: str, base: str | None = None, names: list[str] | None = None, max_grid_prompts: int = 6) -> dict:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if names and len(names) != len(run_dirs):
        raise UserError(f"--names: {len(names)} names for {len(run_dirs)} run dirs")
    evals: list[EvalRun] = []
    metric_runs: dict[str, list[dict]] = {}
    for i, d in enumerate(run_dirs):
        p = Path(d)
        name = names[i] if names else None
        if (p / "summary.json").is_file():
            ev = EvalRun(p, name)
            evals.append(ev)
            if ev.metrics_path is not None:
                metric_runs[ev.name] = read_metrics(ev.metrics_path)
        elif (p / "metrics.jsonl").is_file():
            metric_runs[name or p.name] = read_metrics(p / "metrics.jsonl")
        else:
            raise UserError(f"{d}: neither an eval dir (summary.json) nor a training run (metrics.jsonl)")
    base_run = None
    if evals:
        if base is not None:
            matches = [e for e in evals if e.name == base or str(e.path) == base or e.path.resolve() == Path(base).resolve()]
            if not matches:
                raise UserError(f"--base {base}: not one of the eval dirs given ({', '.join(e.name for e in evals)})")
            base_run = matches[0]
        else:
            base_run = next((e for e in evals if not e.has_lora), evals[0])
    columns: list[str] = []
    for e in evals:
        for c in e.columns:
            if c not in columns:
                columns.append(c)

    # ---- table
    table_rows = []
    for e in evals:
        row = {"method": e.name}
        for c in columns:
            s = e.summary["rewards"].get(c)
            if s is None:
                continue
            row[f"{c}_mean"] = s["mean"]
            row[f"{c}_ci_low"] = s["ci_low"]
            row[f"{c}_ci_high"] = s["ci_high"]
            row[f"{c}_n"] = s["n"]
            if base_run is not None and e is not base_run:
                wr = win_rate(e, base_run, c)
                row[f"{c}_win_rate"] = wr["win_rate"]
                row[f"{c}_n_paired"] = wr["n_paired"]
                for k in ("delta_mean", "delta_ci_low", "delta_ci_high"):
                    row[f"{c}_{k}"] = wr[k]
        if e.metrics_path is not None:
            ms = metric_runs.get(e.name) or []
            row["train_steps"] = max((m.get("step", 0) for m in ms), default=0)
        table_rows.append(row)
    fields = ["method"] + sorted({k for r in table_rows for k in r if k != "method"}, key=lambda k: (k.split("_")[0], k))
    with open(out_dir / "table.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(table_rows)
    (out_dir / "table.json").write_text(json.dumps({"base": base_run.name if base_run else None, "rows": table_rows}, indent=2), encoding="utf-8")

    header = ["method"]
    for c in columns:
        header += [f"{c} mean [95% CI]", f"{c} minus base, paired [95% CI]", f"{c} win vs base"]
    md_rows = []
    for r in table_rows:
        cells = [r["method"] + (" (base)" if base_run is not None and r["method"] == base_run.name else "")]
        for c in columns:
            if f"{c}_mean" in r:
                cells.append(f"{_fmt(r[f'{c}_mean'])} [{_fmt(r[f'{c}_ci_low'])}, {_fmt(r[f'{c}_ci_high'])}]")
            else:
                cells.append("-")
            if f"{c}_delta_mean" in r:
                cells.append(f"{r[f'{c}_delta_mean']:+.3f} [{r[f'{c}_delta_ci_low']:+.3f}, {r[f'{c}_delta_ci_high']:+.3f}]")
            else:
                cells.append("-")
            cells.append(_fmt(r[f"{c}_win_rate"], 2) if f"{c}_win_rate" in r else "-")
        md_rows.append(cells)
    table_md = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(cells) + " |" for cells in md_rows]
    )

    curves = plot_curves(metric_runs, out_dir / "curves.png")
    side = plot_side_by_side(evals, out_dir / "side_by_side.png", max_prompts=max_grid_prompts) if evals else None
    grids = []
    for e in evals:
        g = e.path / "grid.png"
        if g.is_file():
            dst = out_dir / "grids" / f"{len(grids):02d}_{Path(e.name).name}.png"
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(g, dst)
            grids.append((e.name, dst.relative_to(out_dir)))

    # final training metrics
    final_lines = []
    for name, ms in metric_runs.items():
        if ms:
            last = ms[-1]
            vals = " ".join(f"{k}={_fmt(float(v), 4)}" for k, v in last.items() if isinstance(v, (int, float)) and k in ("step", "loss", "reward_mean", "implicit_acc"))
            final_lines.append(f"- **{name}**: {len(ms)} logged steps; last: {vals}")

    base_line = (f"Differences and win rates are against **{base_run.name}**, paired by (prompt, seed): "
                 "the same starting noise for every method." if base_run else "")
    md = ["# diffalign comparison", "", base_line, "", table_md, ""]
    if final_lines:
        md += ["## Training runs", "", *final_lines, ""]
    if curves:
        md += ["## Curves", "", "![curves](curves.png)", ""]
    if side:
        md += ["## Same prompts and seeds, side by side", "", "![side by side](side_by_side.png)", ""]
    if grids:
        md += ["## Grids", ""] + [f"### {n}\n\n![{n}]({p.as_posix()})\n" for n, p in grids]
    (out_dir / "report.md").write_text("\n".join(md), encoding="utf-8")

    h = ["<!doctype html><html><head><meta charset='utf-8'><title>diffalign comparison</title>",
         "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
         "th{background:#f3f3f3}img{image-rendering:pixelated;max-width:100%}</style></head><body>",
         "<h1>diffalign comparison</h1>", f"<p>{html.escape(base_line).replace('**', '')}</p>", "<table><tr>"]
    h += [f"<th>{html.escape(x)}</th>" for x in header] + ["</tr>"]
    for cells in md_rows:
        h.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    h.append("</table>")
    if final_lines:
        h.append("<h2>Training runs</h2><ul>" + "".join(f"<li>{html.escape(l[2:].replace('**', ''))}</li>" for l in final_lines) + "</ul>")
    if curves:
        h.append("<h2>Curves</h2><img src='curves.png'>")
    if side:
        h.append("<h2>Same prompts and seeds, side by side</h2><img src='side_by_side.png'>")
    for n, p in grids:
        h.append(f"<h3>{html.escape(n)}</h3><img src='{p.as_posix()}' style='width:{256}px'>")
    h.append("</body></html>")
    (out_dir / "report.html").write_text("\n".join(h), encoding="utf-8")
    return {"report_md": out_dir / "report.md", "report_html": out_dir / "report.html", "table_md": table_md,
            "rows": table_rows, "base": base_run.name if base_run else None}
