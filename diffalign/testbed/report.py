"""The ``testbed-compare`` report: headline table, paired contrasts, the efficiency race, RLHF's
over-optimisation curve, online-method curves.

Reads eval dirs (``diffalign eval``) and training runs (``metrics.jsonl``); writes
``report.md`` and ``report.html`` (rendered from the Markdown by markdown-it-py; readable
without the README), ``race.png`` (the hidden taste on the fixed eval subset against
wall-clock, every online method), ``overoptimisation.png`` (learned reward against the true
taste, RLHF row), ``online_curves.png`` (training reward against wall-clock and step) and, per
base model and evaluation split, a detailed :func:`~diffalign.eval.compare.compare` report in a
subfolder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..eval.compare import EvalRun, compare, read_metrics, win_rate
from ..eval.summary import t_quantile_975

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


def online_curves(runs: dict[str, Path], out: Path, reward_label: dict[str, str] | None = None) -> tuple[Path | None, dict[str, dict]]:
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
    names = sorted(set((reward_label or {}).values())) or ["training reward"]
    axes[0].set_ylabel("training reward: " + ", ".join(names))
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


PAPER_CLAIMS = {
    "grpo": "reference (1x)",
    "mixgrpo": "MixGRPO: ~50% less training time than DanceGRPO (~2x faster)",
    "dancegrpo": "(MixGRPO's baseline)",
    "branchgrpo": "BranchGRPO: ~55% less per-iteration training time than DanceGRPO",
    "nft": "DiffusionNFT: up to 25x more efficient than Flow-GRPO",
    "awm": "AWM: up to 24x less compute than Flow-GRPO",
    "grpo_rm": "(RLHF: Flow-GRPO on a learned reward)",
}


def eval_curve(run: Path, reward: str = "testbed_style") -> list[tuple[int, float, float]]:
    """(step, wall-clock seconds of rollouts + updates so far, eval-subset ``reward``) of a run,
    from its ``metrics.jsonl``: step 0 is the starting model (``eval.at_start``)."""
    mpath = Path(run) / "metrics.jsonl"
    if not mpath.is_file():
        return []
    out, clock = [], 0.0
    for r in sorted(read_metrics(mpath), key=lambda r: r["step"]):
        clock += float(r.get("rollout_seconds", 0.0)) + float(r.get("train_seconds", 0.0))
        v = r.get(f"eval_reward/{reward}")
        if _num(v):
            out.append((int(r["step"]), clock, float(v)))
    return out


def time_to_gain(curve: list[tuple[int, float, float]], gain: float) -> float | None:
    """Wall-clock seconds at which ``curve``'s reward first rises ``gain`` above its step-0 value
    (linear interpolation between evaluations); None if it never does or has no step 0."""
    if not curve or curve[0][0] != 0:
        return None
    target = curve[0][2] + gain
    for (_, t0, a), (_, t1, b) in zip(curve, curve[1:]):
        if b >= target:  # the first segment that reaches it (a < target, or it would have been found earlier)
            return t0 + (t1 - t0) * (target - a) / (b - a)
    return None


def efficiency_race(runs: dict[str, Path], out: Path, reward: str = "testbed_style") -> tuple[Path | None, list[dict]]:
    """The race: ``reward`` on the fixed eval subset against wall-clock for every online run (plot),
    and each run's time to reach half the best final gain, with its ratio to Flow-GRPO's."""
    curves = {n: c for n, c in ((n, eval_curve(p, reward)) for n, p in runs.items()) if len(c) >= 2 and c[0][0] == 0}
    if not curves:
        return None, []
    gains = {n: c[-1][2] - c[0][2] for n, c in curves.items()}
    target = 0.5 * max(gains.values())
    rows = []
    for n, c in curves.items():
        t = time_to_gain(c, target) if target > 0 else None
        rows.append({"method": n, "start": c[0][2], "final": c[-1][2], "final_gain": gains[n], "target_gain": target,
                     "seconds_to_target": t, "steps": c[-1][0], "seconds": c[-1][1]})
    ref = next((r["seconds_to_target"] for r in rows if r["method"] == "grpo"), None)
    for r in rows:
        t = r["seconds_to_target"]
        r["speedup_vs_grpo"] = (ref / t) if (ref and t) else None
        r["claim"] = PAPER_CLAIMS.get(r["method"], "")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for n, c in curves.items():
        ax.plot([x[1] for x in c], [x[2] for x in c], "o-", lw=1.8, label=n)
    if target > 0:
        y0 = sum(c[0][2] for c in curves.values()) / len(curves)
        ax.axhline(y0 + target, color="grey", ls="--", lw=1, label="start + half the best final gain")
    ax.set_xlabel("wall-clock seconds of rollouts + updates (1 CPU thread each)")
    ax.set_ylabel(f"{reward} on the fixed eval subset (ODE)")
    ax.set_title("efficiency race: the hidden taste against wall-clock")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "race.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, rows


def overoptimisation(run: Path, out: Path) -> tuple[Path | None, dict]:
    """RLHF's over-optimisation curve (Gao et al. 2023): the learned reward (``eval_reward_mean``)
    and the true taste (``eval_reward/testbed_style``) on the fixed eval subset, over steps. Returns
    the plot and where the true taste peaked against where the run ended."""
    rows = [r for r in read_metrics(Path(run) / "metrics.jsonl") if _num(r.get("eval_reward/testbed_style"))] \
        if (Path(run) / "metrics.jsonl").is_file() else []
    rows = [r for r in sorted(rows, key=lambda r: r["step"]) if _num(r.get("eval_reward_mean"))]
    if len(rows) < 2:
        return None, {}
    steps = [r["step"] for r in rows]
    learned = [r["eval_reward_mean"] for r in rows]
    true = [r["eval_reward/testbed_style"] for r in rows]
    peak = max(range(len(true)), key=lambda i: true[i])
    info = {"steps": steps, "learned": learned, "true": true, "peak_step": steps[peak], "peak_true": true[peak],
            "final_step": steps[-1], "final_true": true[-1], "start_true": true[0]}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, true, "o-", color="C0", label="true taste (testbed_style)")
    ax.set_xlabel("training step")
    ax.set_ylabel("true taste on the fixed eval subset", color="C0")
    ax2 = ax.twinx()
    ax2.plot(steps, learned, "s--", color="C3", label="learned reward (reward model)")
    ax2.set_ylabel("learned reward (PickScore-shaped model)", color="C3")
    ax.set_title("RLHF: learned reward against the true taste (over-optimisation check)")
    ax.grid(alpha=0.3)
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out / "overoptimisation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, info


def labels_and_queries(name: str, m, run: Path | None, pairs_dir: Path | None, reward_model: dict | None) -> str:
    """What a row consumed: preference labels (pairs) and/or reward calls during training."""
    parts = []
    if m.reads_pairs and pairs_dir is not None:
        n = _parquet_rows(Path(pairs_dir) / ("pairs" if m.online else m.data))
        if n:
            parts.append(f"{n:,} labels")
    if m.online and run is not None and (Path(run) / "metrics.jsonl").is_file():
        calls = max((int(r.get("images_seen", 0) or 0) for r in read_metrics(Path(run) / "metrics.jsonl")), default=0)
        if calls:
            what = "learned-reward" if m.reward == "reward_model" else f"{m.reward}"
            parts.append(f"{calls:,} {what} calls")
        best = Path(run) / "best" / "best.json"
        if best.is_file():  # the checkpoint choice scored the eval prompts with the true taste at every evaluation
            rows = read_metrics(Path(run) / "metrics.jsonl")
            n_eval = sum(1 for r in rows if _num(r.get("eval_reward/testbed_style")))
            prompts = _run_eval_prompts(Path(run))
            if n_eval and prompts:
                parts.append(f"{n_eval * prompts:,} testbed_style calls to choose the checkpoint")
    return "; ".join(parts) or "-"


def _run_eval_prompts(run: Path) -> int:
    import yaml

    try:
        return int(yaml.safe_load((run / "config.yaml").read_text())["eval"]["num_prompts"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return 0


def _parquet_rows(d: Path) -> int:
    if not d.is_dir():
        return 0
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(d.glob("*.parquet")))


def _ci_half(d: dict) -> float | None:
    lo, hi = d.get("delta_ci_low"), d.get("delta_ci_high")
    return (hi - lo) / 2 if _num(lo) and _num(hi) else None


def markdown_to_html(md: str, title: str) -> str:
    """The report page: the Markdown rendered by markdown-it-py (CommonMark + tables), links to
    sibling ``.md`` reports pointed at their ``.html``."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    body = body.replace('.md">', '.html">')
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}img{max-width:100%}"
             "code{background:#f3f3f3;padding:0 3px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>"
            f"<body>\n{body}</body></html>\n")


def write_testbed_report(out: Path, *, budget: str, seed: int, methods: dict, evals: dict[tuple[str, str], str],
                         runs: dict[str, Path], seconds: dict[str, float], status: dict[str, str], plumbing: bool,
                         why_cpu: str, reward_model: dict | None = None, pairs_dir: Path | None = None,
                         estimate: float | None = None, busy: float | None = None) -> dict:
    """``methods``: name -> :class:`~diffalign.testbed.job.JobMethod`; ``evals``: (split, who)
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
               "train_seconds": seconds.get(f"train:{name}"),
               "consumed": labels_and_queries(name, m, runs.get(name), pairs_dir, reward_model)}
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
        row["effect_to_half_width"] = (t["delta_mean"] / _ci_half(t)) if t and _ci_half(t) else None
        faith = row.get("indist/testbed")
        row["faithfulness_falls"] = bool(m.target != "testbed" and faith and _num(faith["delta_ci_high"]) and faith["delta_ci_high"] < 0)
        headline.append(row)

    contrasts = []
    for a, b_ in (("dpo", "sft"), ("dpo", "mapo"), ("mapo_mismatch", "dpo_mismatch"), ("grpo_rm", "dpo"), ("grpo", "dpo"),
                  ("grpo_rm", "grpo")):
        ra, rb = loaded.get(("indist", a)), loaded.get(("indist", b_))
        if ra is not None and rb is not None and methods[a].base == methods[b_].base:
            contrasts.append({"a": a, "b": b_, "reward": "testbed_style", **win_rate(ra, rb, "testbed_style")})

    online = {n: p for n, p in runs.items() if methods[n].online}
    curves_png, slopes = online_curves(online, out / "online_curves.png",
                                       {n: methods[n].reward or "" for n in online})
    race_png, race = efficiency_race({n: p for n, p in online.items() if methods[n].target == "testbed_style"}, out)
    rm_runs = [n for n in online if methods[n].reward == "reward_model"]
    over_png, over = overoptimisation(online[rm_runs[0]], out) if rm_runs else (None, {})

    # ---- markdown
    md = []
    if plumbing:
        md += ["**This is a plumbing run (budget `%s`): a few steps of everything, to check that the job runs end to end. "
               "Its numbers mean nothing.**" % budget, ""]
    md += [f"# testbed-compare: budget `{budget}`, seed {seed}", "",
           "Every method is judged on its **target** reward against the base model it started from, on the "
           "**indist** split (" + SPLIT_TEXT["indist"] + "), paired by (prompt, seed): the same starting noise for the "
           "base and the method. The target of the main rows is the **hidden human taste** `testbed_style` "
           "(faithfulness + 0.5 x background warmth, the utility that labels the pairs: the testbed's PickScore). "
           "Pair methods (UNet base) learn it from the labelled pairs; online methods (flow base) get it as their "
           "reward; `grpo_rm` (RLHF) gets a reward model trained on the same pairs. Rows ending in `_faith` train and "
           "are judged on the verifiable faithfulness reward `testbed` alone. *Significant* = the paired 95% interval "
           "lies above 0; *effect / half-width* = the mean change over the interval's half-width (above 1 is "
           "significant). The faithfulness column (`testbed`) shows reward hacking: a row whose faithfulness falls "
           "significantly is flagged. `compositional` = " + SPLIT_TEXT["compositional"] + ".", ""]
    hdr = ["method", "base", "target", "target: base", "target: method", "target minus base, paired [95% CI]", "significant",
           "effect / half-width", "win rate", "other reward minus base", "compositional: target minus base",
           "labels / reward calls", "train time (s)"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in headline:
        t = r.get(f"indist/{r['target']}") or {}
        other = "testbed" if r["target"] == "testbed_style" else "testbed_style"
        o = r.get(f"indist/{other}") or {}
        c = r.get(f"compositional/{r['target']}") or {}
        sec = r["train_seconds"]
        if r["status"] != "ok":
            lines.append("| " + " | ".join([r["method"], r["base"], r["target"], "-", "-", r["status"].replace("|", "/")]
                                           + ["-"] * (len(hdr) - 6)) + " |")
            continue
        flag = " **(faithfulness falls)**" if r["faithfulness_falls"] else ""
        eff = r["effect_to_half_width"]
        lines.append("| " + " | ".join([
            r["method"], r["base"], r["target"], f"{t.get('base_mean', float('nan')):.3f}", f"{t.get('mean', float('nan')):.3f}",
            _ci(t), "**yes**" if r["significant"] else "no", f"{eff:+.1f}" if _num(eff) else "-",
            f"{t.get('win_rate', float('nan')):.2f}", f"{other} {_ci(o)}{flag}", _ci(c), r["consumed"],
            f"{sec:.0f}" if _num(sec) else "-"]) + " |")
    headline_md = "\n".join(lines)
    md += [headline_md, ""]
    if any(m.target == "testbed" for m in methods.values()):
        md += ["Rows judged on faithfulness alone (`testbed`, GenEval-style) are bounded at this scale: with a flow "
               "base that scores >= 0.80, no global image change and no online run of this budget's size fixes its "
               "failures, so the gain is at most the base's distance to 0.80, about the interval's half-width "
               "(docs/testbed_results.md, \"Why the online rows cannot clear the bar\"). No gain is claimed for them.", ""]
    if contrasts:
        md += ["## Method against method (indist, `testbed_style`, paired)", "",
               "| contrast | difference [95% CI] | win rate |", "|---|---|---|"]
        md += [f"| {c['a']} minus {c['b']} | {_ci(c)} | {c['win_rate']:.2f} |" for c in contrasts]
        md += ["", "SFT-on-chosen is the baseline of the pair methods: DPO minus SFT says what the rejected image adds. "
               "Rows on different bases (DPO on the UNet, the online rows on the flow base) are compared through their "
               "gains over their own base in the headline table, not here.", ""]
    race_md = ""
    if race:
        rl = ["| method | taste at step 0 | final | final gain | seconds to half the best final gain | speed-up vs Flow-GRPO "
              "| the paper's claim |", "|---|---|---|---|---|---|---|"]
        for r in race:
            t, sp = r["seconds_to_target"], r["speedup_vs_grpo"]
            rl.append(f"| {r['method']} | {r['start']:.3f} | {r['final']:.3f} | {r['final_gain']:+.3f} | "
                      f"{f'{t:.0f}' if t is not None else 'not reached'} | {f'{sp:.2f}x' if sp else '-'} | {r['claim']} |")
        race_md = "\n".join(rl)
        md += ["## The efficiency race (the hidden taste on the fixed eval subset)", "",
               f"The target is half the best final gain (+{race[0]['target_gain']:.3f}); wall-clock counts rollouts and "
               "updates (one CPU thread each), not evaluation. The eval subset is the `curve` prompt set, disjoint "
               "from `indist`.", "", race_md, ""]
        md += [ordering_sentence(race), ""]
    if race_png:
        md += ["![the hidden taste against wall-clock](race.png)", ""]
    if reward_model:
        md += ["## RLHF: the reward model and over-optimisation", "",
               f"A PickScore-shaped reward model (tiny CLIP, random init, PickScore objective) trained on "
               f"{reward_model['train_pairs']} of the job's pairs; on {reward_model['val_pairs']} held-out pairs of unseen "
               f"prompts its accuracy is **{reward_model['val_accuracy']:.3f}** (a human tie counts 0.5; "
               f"{reward_model['val_accuracy_initial']:.3f} before training).", ""]
    if over:
        drop = over["peak_true"] - over["final_true"]
        md += [f"On the fixed eval subset the true taste went {over['start_true']:.3f} -> {over['final_true']:.3f} "
               f"(peak {over['peak_true']:.3f} at step {over['peak_step']} of {over['final_step']}). "
               + ("The true taste fell after its peak while the learned reward rose: over-optimisation. "
                  if drop > 0.02 and over['peak_step'] < over['final_step'] else
                  "No over-optimisation within this budget: the true taste did not fall after its peak by more than 0.02. ")
               + chosen_checkpoint_sentence(online[rm_runs[0]]), "", "![learned reward against the true taste](overoptimisation.png)", ""]
    if slopes:
        md += ["## Online methods: does the training reward rise?", "",
               "| method | training reward | train-reward slope per step [95% CI] | steps |", "|---|---|---|---|"]
        md += [f"| {n} | {methods[n].reward} | {s['slope']:+.5f} [{s['ci_low']:+.5f}, {s['ci_high']:+.5f}] | {s['n']} |"
               if _num(s["slope"]) else f"| {n} | {methods[n].reward} | - (fewer than 3 steps) | {s['n']} |"
               for n, s in slopes.items()]
        md += [""]
    if curves_png:
        md += ["![training reward against wall-clock](online_curves.png)", ""]
    md += ["## Detailed reports", ""]
    md += [f"- [{kind} base, {split}]({p.as_posix()}/report.md): every reward, marginal intervals, win rates, curves, "
           "side-by-side images and grids" for kind, split, p in details]
    md += ["", "## Time", "", f"CPU: {why_cpu}."]
    if estimate:
        md += [f"Estimated up front: {estimate:.0f} s of tasks on the reference machine; workers busy "
               f"{100 * (busy or 0):.0f}% of the run."]
    md += ["", "| task | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.0f} |" for k, v in seconds.items() if _num(v)]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "report.html").write_text(markdown_to_html(text, f"testbed-compare {budget} seed {seed}"), encoding="utf-8")
    (out / "headline.json").write_text(json.dumps({"headline": headline, "contrasts": contrasts, "slopes": slopes, "race": race,
                                                   "overoptimisation": over, "reward_model": reward_model}, indent=2,
                                                  default=float), encoding="utf-8")
    return {"report_md": out / "report.md", "report_html": out / "report.html", "headline": headline,
            "headline_md": headline_md, "contrasts": contrasts, "slopes": slopes, "race": race, "race_md": race_md}


def chosen_checkpoint_sentence(run: Path) -> str:
    """The rule that chose the RLHF row's checkpoint, and what it chose."""
    record = Path(run) / "best" / "best.json"
    if not record.is_file():
        return "The row is the final checkpoint."
    best = json.loads(record.read_text())
    return (f"The row is judged at step {best['step']}: the rule, fixed before the run, takes the evaluation with the "
            f"highest true taste on the fixed eval subset (`eval.keep_best: {best['reward']}`, "
            f"{best['value']:.3f}); the subset is the `curve` prompts, never `indist`.")


def ordering_sentence(race: list[dict]) -> str:
    """Whether the race reproduces the papers' orderings (NFT and AWM faster than Flow-GRPO;
    MixGRPO faster than DanceGRPO), for the methods that ran."""
    t = {r["method"]: r["seconds_to_target"] for r in race}
    said = []
    for fast, slow in (("nft", "grpo"), ("awm", "grpo"), ("mixgrpo", "dancegrpo"), ("branchgrpo", "dancegrpo"), ("mixgrpo", "grpo")):
        if fast in t and slow in t:
            a, b = t[fast], t[slow]
            if a is None and b is None:
                said.append(f"neither {fast} nor {slow} reached the target")
            elif b is None or (a is not None and a < b):
                said.append(f"{fast} reached it before {slow}" + (f" ({b / a:.1f}x)" if a and b else ""))
            else:
                said.append(f"{slow} reached it before {fast}" + (f" ({a / b:.1f}x)" if a and b else "") + ": the papers' ordering "
                            "is not reproduced here")
    return ("Orderings: " + "; ".join(said) + ".") if said else ""
