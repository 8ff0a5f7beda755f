"""PNG plots for the evaluation report (matplotlib, Agg: no display needed).

Labels are ASCII: the machines that render these often have no CJK font.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

from poemdpo.evaluation.metrics import METERS, SHAPES  # noqa: E402

ASCII_METER = {"五言": "5-char", "七言": "7-char", "杂言": "mixed"}
ASCII_SHAPE = {"绝句": "4 lines", "律诗": "8 lines", "other": "other"}
REWARD_KEYS = {
    "margins": ("rewards/margins", "eval_rewards/margins"),
    "accuracies": ("rewards/accuracies", "eval_rewards/accuracies"),
}


def plot_form_distribution(distributions: dict[str, dict], path: str | Path) -> Path:
    """Grouped bars: the rate of each meter × shape cell, one bar colour per model."""
    cells = [(m, s) for m in METERS for s in SHAPES]
    labels = [f"{ASCII_METER[m]}\n{ASCII_SHAPE[s]}" for m, s in cells]
    width = 0.8 / max(1, len(distributions))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for k, (name, dist) in enumerate(distributions.items()):
        rates = [dist["rates"][m][s] for m, s in cells]
        xs = [i + (k - (len(distributions) - 1) / 2) * width for i in range(len(cells))]
        ax.bar(xs, rates, width=width, label=f"{name} (n={dist['n']})")
    ax.set_xticks(range(len(cells)), labels, fontsize=8)
    ax.set_ylabel("share of sampled poems")
    ax.set_ylim(0, 1)
    ax.set_title("Form of sampled poems")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def reward_series(log_history: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """(step, value) points for each reward key present in a Trainer `log_history`."""
    series: dict[str, list[tuple[float, float]]] = {}
    for entry in log_history:
        for keys in REWARD_KEYS.values():
            for key in keys:
                if key in entry and "step" in entry:
                    series.setdefault(key, []).append((entry["step"], entry[key]))
    return series


def plot_training_rewards(log_history: list[dict], path: str | Path) -> Path | None:
    """Reward margins and accuracies over training steps, train and eval; None if the log has neither."""
    series = reward_series(log_history)
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, keys) in zip(axes, REWARD_KEYS.items(), strict=True):
        for key in keys:
            if key in series:
                steps, values = zip(*series[key], strict=True)
                ax.plot(steps, values, marker="o" if key.startswith("eval") else None, markersize=3,
                        label="eval" if key.startswith("eval") else "train")
        ax.set_xlabel("step")
        ax.set_title(f"reward {title}")
        if title == "accuracies":
            ax.set_ylim(0, 1.05)
        else:
            ax.axhline(0, color="grey", linewidth=0.8)  # above 0: chosen poems gain on rejected ones
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_methods(points: list[dict], rule: str, path: str | Path) -> Path:
    """The methods table as two scatter plots: each method's strict rule rate (with its 95% interval) against its
    KL to the reference, and against its training minutes. `points`: dicts with name, rate, low, high, kl and
    minutes (kl or minutes None: left out of that panel). KL is on a symmetric-log axis: the reference-free
    objectives that wreck the language sit hundreds of nats out, the rest within a few."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    markers = "osD^v<>pPX*h"
    for k, point in enumerate(points):  # one colour and marker per method, the same in both panels
        colour = plt.get_cmap("tab20")((2 * k + k // 10) % 20)  # 10 dark hues, then their light twins
        style = {"color": colour, "marker": markers[k % len(markers)], "linestyle": "none", "capsize": 3}
        error = [[point["rate"] - point["low"]], [point["high"] - point["rate"]]]
        for ax, key in ((axes[0], "kl"), (axes[1], "minutes")):
            if point.get(key) is not None:
                ax.errorbar(point[key], point["rate"], yerr=error, label=point["name"] if ax is axes[0] else None,
                            **style)
    for ax, label in ((axes[0], "KL to reference, nats per poem (symlog)"),
                      (axes[1], "training minutes (CPU, wall)")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("symlog", linthresh=1.0)
    axes[0].set_ylabel(f"{rule}, strict rate on test titles")
    axes[0].set_ylim(0, 1.05)
    fig.suptitle(f"Methods side by side: {rule}")
    fig.legend(loc="lower center", ncol=min(6, len(points)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(points) - 1) // 6), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
