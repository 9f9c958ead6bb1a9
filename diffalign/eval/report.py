"""The ``testbed-compare`` report: headline table, paired contrasts, online-method curves.

Reads eval dirs (``diffalign eval``) and training runs (``metrics.jsonl``); writes
``report.md`` and ``report.html`` (readable without the README), ``online_curves.png``
(reward against wall-clock and against step for the online methods) and, per base model and
evaluation split, a detailed :func:`~diffalign.eval.compare.compare` report in a subfolder.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from .compare import EvalRun, compare, read_metrics, win_rate
from .summary import t_quantile_975

SPLIT_TEXT = {
    "indist": "in-distribution captions never used for pairs or rollouts (primary)",
    "compositional": "held-out colour x shape pairs no model saw in training (generalisation)",
}


def ols_slope(xs: list[float], ys: list[float]) -> dict:
    """Least-squares slope of ``ys`` on ``xs`` with its 95% t interval (n - 2 degrees of freedom)."""
    n = len(xs)
    if n < 3:
        return {"slope": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": n}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return {"slope": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": n}
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = [y - my - slope * (x - mx) for x, y in zip(xs, ys)]
    half = t_quantile_975(n - 2) * math.sqrt(sum(r * r for r in resid) / (n - 2) / sxx)
    return {"slope": slope, "ci_low": slope - half, "ci_high": slope + half, "n": n}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _ci(d: dict, key: str = "delta") -> str:
    m, lo, hi = d.get(f"{key}_mean"), d.get(f"{key}_ci_low"), d.get(f"{key}_ci_high")
    if not _num(m):
        return "-"
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def online_curves(runs: dict[str, Path], out: Path) -> tuple[Path | None, dict[str, dict]]:
    """Plot train reward (and the fixed eval subset's reward) against cumulative rollout + train
    seconds and against step; return the plot and each run's train-reward slope per step."""
    series, slopes = {}, {}
    for name, run in runs.items():
        mpath = Path(run) / "metrics.jsonl"
        if not mpath.is_file():
            continue
        rows = [r for r in read_metrics(mpath) if _num(r.get("reward_mean"))]
        if not rows:
            continue
        t, clock = 0.0, []
        for r in rows:
            t += float(r.get("rollout_seconds", 0.0)) + float(r.get("train_seconds", 0.0))
            clock.append(t)
        series[name] = (rows, clock)
        slopes[name] = ols_slope([float(r["step"]) for r in rows], [float(r["reward_mean"]) for r in rows])
    if not series:
        return None, slopes
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, (rows, clock) in series.items():
        line = axes[0].plot(clock, [r["reward_mean"] for r in rows], lw=1.0, alpha=0.7, marker=".", label=f"{name} (train batch)")[0]
        ev = [(c, r["eval_reward_mean"]) for r, c in zip(rows, clock) if _num(r.get("eval_reward_mean"))]
        if ev:
            axes[0].plot(*zip(*ev), "o-", color=line.get_color(), lw=2, label=f"{name} (fixed eval prompts, ODE)")
        axes[1].plot([r["step"] for r in rows], [r["reward_mean"] for r in rows], marker=".", lw=1.0, color=line.get_color(), label=name)
    axes[0].set_xlabel("wall-clock seconds (rollouts + updates)")
    axes[0].set_ylabel("testbed reward")
    axes[0].set_title("reward against wall-clock")
    axes[1].set_xlabel("training step")
    from matplotlib.ticker import MaxNLocator

    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes[1].set_ylabel("train reward (batch mean)")
    axes[1].set_title("train reward against step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out, slopes


def write_testbed_report(out: Path, *, budget: str, seed: int, methods: dict, evals: dict[tuple[str, str], str],
                         runs: dict[str, Path], seconds: dict[str, float], status: dict[str, str], plumbing: bool,
                         why_cpu: str) -> dict:
    """``methods``: name -> :class:`~diffalign.eval.testbed_job.JobMethod`; ``evals``: (split, who)
    -> eval dir, ``who`` a method name or ``base_unet`` / ``base_flow``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = {k: EvalRun(Path(v), k[1]) for k, v in evals.items()}

    # detailed reports: one per (base, split)
    details = []
    for kind in ("unet", "flow"):
        for split in SPLIT_TEXT:
            base_key = (split, f"base_{kind}")
            members = [base_key] + [(split, n) for n, m in methods.items() if m.base == kind and (split, n) in evals]
            if base_key in evals and len(members) > 1:
                sub = out / f"{kind}_{split}"
                compare([evals[k] for k in members], str(sub), base=f"base_{kind}")
                details.append((kind, split, sub.relative_to(out)))

    # headline: each method on its target reward, against its base, paired by (prompt, seed)
    headline = []
    for name, m in methods.items():
        row = {"method": name, "base": f"base_{m.base}", "target": m.target, "status": status.get(name, "not run"),
               "train_seconds": seconds.get(f"train:{name}")}
        for split in SPLIT_TEXT:
            run, base = loaded.get((split, name)), loaded.get((split, f"base_{m.base}"))
            if run is None or base is None:
                continue
            for reward in ("testbed", "testbed_style"):
                wr = win_rate(run, base, reward)
                row[f"{split}/{reward}"] = {"base_mean": base.summary["rewards"][reward]["mean"],
                                            "mean": run.summary["rewards"][reward]["mean"], **wr}
        t = row.get(f"indist/{m.target}")
        row["significant"] = bool(t and _num(t["delta_ci_low"]) and t["delta_ci_low"] > 0)
        headline.append(row)

    contrasts = []
    for a, b_ in (("dpo", "sft"), ("dpo", "mapo"), ("mapo_mismatch", "dpo_mismatch")):
        ra, rb = loaded.get(("indist", a)), loaded.get(("indist", b_))
        if ra is not None and rb is not None:
            contrasts.append({"a": a, "b": b_, "reward": "testbed_style", **win_rate(ra, rb, "testbed_style")})

    curves_png, slopes = online_curves({n: p for n, p in runs.items() if methods[n].online}, out / "online_curves.png")

    # ---- markdown
    md = []
    if plumbing:
        md += ["**This is a plumbing run (budget `%s`): a few steps of everything, to check that the job runs end to end. "
               "Its numbers mean nothing.**" % budget, ""]
    md += [f"# testbed-compare: budget `{budget}`, seed {seed}", "",
           "Every method is judged on its **target** reward against the base model it started from, on the "
           "**indist** split (" + SPLIT_TEXT["indist"] + "), paired by (prompt, seed): the same starting noise for the "
           "base and the method. Pair methods (UNet base) target the hidden utility `testbed_style`; online methods "
           "(flow base, except `ddpo`) target the verifiable `testbed` reward. *Significant* = the paired 95% interval "
           "lies above 0. `compositional` = " + SPLIT_TEXT["compositional"] + ".", ""]
    hdr = ["method", "base", "target", "target: base", "target: method", "target minus base, paired [95% CI]", "significant",
           "win rate", "other reward minus base", "compositional: target minus base", "train time (s)"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in headline:
        t = r.get(f"indist/{r['target']}") or {}
        other = "testbed" if r["target"] == "testbed_style" else "testbed_style"
        o = r.get(f"indist/{other}") or {}
        c = r.get(f"compositional/{r['target']}") or {}
        sec = r["train_seconds"]
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['base']} | {r['target']} | - | - | {r['status']} | - | - | - | - | - |")
            continue
        lines.append("| " + " | ".join([
            r["method"], r["base"], r["target"], f"{t.get('base_mean', float('nan')):.3f}", f"{t.get('mean', float('nan')):.3f}",
            _ci(t), "**yes**" if r["significant"] else "no", f"{t.get('win_rate', float('nan')):.2f}",
            f"{other} {_ci(o)}", _ci(c), f"{sec:.0f}" if _num(sec) else "-"]) + " |")
    headline_md = "\n".join(lines)
    md += [headline_md, ""]
    if contrasts:
        md += ["## Method against method (indist, `testbed_style`, paired)", "",
               "| contrast | difference [95% CI] | win rate |", "|---|---|---|"]
        md += [f"| {c['a']} minus {c['b']} | {_ci(c)} | {c['win_rate']:.2f} |" for c in contrasts]
        md += ["", "SFT-on-chosen is the baseline of the pair methods: DPO minus SFT says what the rejected image adds.", ""]
    if slopes:
        md += ["## Online methods: does the training reward rise?", "",
               "| method | train-reward slope per step [95% CI] | steps |", "|---|---|---|"]
        md += [f"| {n} | {s['slope']:+.5f} [{s['ci_low']:+.5f}, {s['ci_high']:+.5f}] | {s['n']} |" for n, s in slopes.items()]
        md += [""]
    if curves_png:
        md += ["![reward against wall-clock](online_curves.png)", ""]
    md += ["## Detailed reports", ""]
    md += [f"- [{kind} base, {split}]({p.as_posix()}/report.md): every reward, marginal intervals, win rates, curves, "
           "side-by-side images and grids" for kind, split, p in details]
    md += ["", "## Time", "", f"CPU: {why_cpu}.", "", "| task | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.0f} |" for k, v in seconds.items() if _num(v)]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    page = ["<!doctype html><html><head><meta charset='utf-8'><title>testbed-compare</title>",
            "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}img{max-width:100%}</style></head><body>"]
    in_table = False
    for line in md:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                page.append("<table>")
                in_table = True
            page.append("<tr>" + "".join(f"<td>{html.escape(c.replace('**', ''))}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            page.append("</table>")
            in_table = False
        if line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            page.append(f"<img src='{html.escape(src)}'>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            page.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- ["):
            label, href = line[3 : line.index("]")], line[line.index("(") + 1 : line.index(")")]
            page.append(f"<li><a href='{html.escape(href.replace('.md', '.html'))}'>{html.escape(label)}</a></li>")
        elif line:
            page.append(f"<p>{html.escape(line.replace('**', ''))}</p>")
    if in_table:
        page.append("</table>")
    page.append("</body></html>")
    (out / "report.html").write_text("\n".join(page), encoding="utf-8")
    (out / "headline.json").write_text(json.dumps({"headline": headline, "contrasts": contrasts, "slopes": slopes}, indent=2,
                                                  default=float), encoding="utf-8")
    return {"report_md": out / "report.md", "report_html": out / "report.html", "headline": headline,
            "headline_md": headline_md, "contrasts": contrasts, "slopes": slopes}
