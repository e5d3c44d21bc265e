"""PNG plots of an evaluation summary: each task's metrics against the kept fraction, one line per method."""

from __future__ import annotations

from pathlib import Path

STYLE = {  # method -> (colour, marker); oracle-token dashed (not a speed path)
    "dense": ("black", ""), "stability": ("tab:blue", "o"), "similarity": ("tab:cyan", "s"), "auto": ("tab:purple", "D"),
    "static": ("tab:brown", "v"), "griffin": ("tab:orange", "^"), "random": ("tab:gray", "x"),
    "oracle-token": ("tab:green", "*"), "svd-predictor": ("tab:red", "P"),
}
LOWER_IS_BETTER = {"kl", "ppl", "ppl_dense_continuation"}


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
