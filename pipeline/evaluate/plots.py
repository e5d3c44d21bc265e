"""PNG plots of an evaluation summary: each task's metrics against the kept fraction, one line per method."""

from __future__ import annotations

from pathlib import Path

STYLE = {  # method -> (colour, marker); oracle-token dashed (not a speed path)
    "dense": ("black", ""), "stability": ("tab:blue", "o"), "similarity": ("tab:cyan", "s"), "auto": ("tab:purple", "D"),
    "static": ("tab:brown", "v"), "griffin": ("tab:orange", "^"), "random": ("tab:gray", "x"),
    "oracle-token": ("tab:green", "*"), "svd-predictor": ("tab:red", "P"), "budget": ("tab:pink", "h"),
    "down-token": ("tab:red", "d"), "stability-refresh": ("tab:purple", "s"),
}
LOWER_IS_BETTER = {"kl", "ppl", "ppl_dense_continuation"}
REPEAT_COLOURS = ("tab:cyan", "tab:olive", "tab:brown", "tab:gray")  # a method's second and later runs (frontier)


def draw_plots(summary: dict, out_dir, prefix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    model = summary.get("model", "")
    for task, s in summary["tasks"].items():
        metrics = s["metrics"]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            series: dict[str, list] = {}
            dense = None
            for r in s["rows"]:
                if r[metric] is None:
                    continue
                if r["method"] == "dense":
                    dense = r[metric]
                    continue
                label = r["method"] + (f" ({r['score']})" if r["score"] != "-" else "")
                series.setdefault(label, []).append((r["kept"], r[metric], r["method"], r["score"]))
            for label, pts in series.items():
                pts.sort()
                color, marker = STYLE.get(pts[0][2], ("tab:olive", "."))
                ls = "--" if pts[0][2] == "oracle-token" or pts[0][3] == "magnitude" else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=color, marker=marker, label=label, ms=4)
            if dense is not None:
                ax.axhline(dense, color="black", lw=1, ls=":", label="dense")
            if metric in LOWER_IS_BETTER:
                ax.set_yscale("log")
            ax.set_xlabel("kept fraction (sparse layers)")
            ax.set_title(f"{task}: {metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER else ""), fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.suptitle(f"{model}, {s['n_items']} items", fontsize=10)
        fig.tight_layout()
        path = out / f"{prefix}{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def frontier_series(summaries: dict[str, dict], task: str, metric: str) -> dict[str, list[tuple[float, float]]]:
    """{series: [(FFN bytes per token over dense, metric), ...] sorted by bytes} over several evaluation runs
    (``summaries``: run label -> summary.json); dense is one point at 1.0. Series: "<method> (<run label>)"."""
    out: dict[str, list[tuple[float, float]]] = {}
    for label, summary in summaries.items():
        s = summary["tasks"].get(task)
        if s is None:
            continue
        dense = next((r for r in s["rows"] if r["method"] == "dense" and r["ffn_bytes_per_token"]), None)
        for r in s["rows"]:
            if r[metric] is None or r["ffn_bytes_per_token"] is None or dense is None:
                continue
            name = "dense" if r["method"] == "dense" else f"{r['method']} ({label})"
            out.setdefault(name, []).append((r["ffn_bytes_per_token"] / dense["ffn_bytes_per_token"], r[metric]))
    return {k: sorted(set(v)) for k, v in out.items()}


def draw_frontier(summaries: dict[str, dict], path, metrics=(("agreement", "top1_agreement"), ("wikitext", "ppl"))) -> Path:
    """Quality against FFN bytes per decoded token (fraction of dense), one line per method and run: where each
    scheme's frontier lies at equal bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, m) for t, m in metrics if any(t in s["tasks"] for s in summaries.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), squeeze=False)
    model = next(iter(summaries.values())).get("model", "")
    for ax, (task, metric) in zip(axes[0], panels):
        runs_of: dict[str, int] = {}  # method -> how many of its series are drawn already
        for name, pts in frontier_series(summaries, task, metric).items():
            method = name.split(" ")[0]
            if method == "dense":
                ax.axhline(pts[0][1], color="black", lw=1, ls=":", label="dense")
                continue
            color, marker = STYLE.get(method, ("tab:olive", "."))
            repeat = runs_of.get(method, 0)
            if repeat:  # the method again, from another run (another layer range or setting): its own colour
                color = REPEAT_COLOURS[(repeat - 1) % len(REPEAT_COLOURS)]
            runs_of[method] = repeat + 1
            ls = "--" if method == "oracle-token" else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=color, marker=marker, label=name, ms=4)
        if metric in LOWER_IS_BETTER:
            ax.set_yscale("log")
        ax.set_xlabel("FFN bytes per decoded token (fraction of dense)")
        ax.set_title(f"{task}: {metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{model}: quality per byte", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
