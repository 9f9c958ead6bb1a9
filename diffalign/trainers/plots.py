"""Pictures of a training run drawn from its own ``metrics.jsonl`` rows, with matplotlib (imported
when drawing, so a trainer that never draws does not load it).

The online loop writes ``reward_curve.png`` at the end of a run
(:meth:`~diffalign.trainers.online.OnlineRecipe.finish`): trainers write data, and this one picture
is part of a run's outputs, so it lives in the trainers' layer rather than in :mod:`diffalign.eval`
(a higher layer the trainers may not import).
"""

from __future__ import annotations

from pathlib import Path


def save_reward_curve(history: list[dict], path: Path, watched: list[str] | tuple[str, ...] = ()) -> None:
    """``reward_curve.png``: train reward mean +- std per step, and the eval reward; with ``watched``
    (the ``eval.rewards`` names) a second panel beside it: each watched reward's eval value minus its
    first one (rewards live on different scales), so a training reward that rises while a watched
    one falls — reward hacking — shows at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num = lambda v: isinstance(v, (int, float))  # noqa: E731 - NaN/inf are logged as strings
    rows = history
    history = [h for h in history if num(h.get("reward_mean")) and num(h.get("reward_std"))]
    if watched:
        fig, (ax, ax_w) = plt.subplots(1, 2, figsize=(11, 4))
        for name in watched:
            pts = [(h["step"], h[f"eval_reward/{name}"]) for h in rows if num(h.get(f"eval_reward/{name}"))]
            if pts:
                ax_w.plot([p[0] for p in pts], [p[1] - pts[0][1] for p in pts], "o-", label=name)
        ax_w.axhline(0.0, color="grey", lw=0.5)
        ax_w.set_xlabel("step")
        ax_w.set_ylabel("change since first eval")
        ax_w.set_title("watched rewards (eval.rewards, not trained)")
        ax_w.legend()
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    mean = [h["reward_mean"] for h in history]
    std = [h["reward_std"] for h in history]
    ax.plot(steps, mean, label="train reward (mean)")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ev = [(h["step"], h["eval_reward_mean"]) for h in history if num(h.get("eval_reward_mean"))]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval reward (ODE)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("GRPO reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
