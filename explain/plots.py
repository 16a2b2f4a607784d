"""The reports' figures, each rendered headless to PNG bytes.

Every function takes numbers that were allowed to leave a hospital (or, for a patient's figures,
that stay in that hospital's own report) and returns one PNG. Figures are built on
`matplotlib.figure.Figure` rather than pyplot's global state, so a report can be drawn in a Ray
actor or a thread; only shap's waterfall, which draws on pyplot's current figure, goes through
pyplot. SHAP values are in log-odds of the outcome throughout.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless, and set before pyplot is imported (here or by shap)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import shap  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fedward.explain.aggregate import MISSING  # noqa: E402
from fedward.explain.summary import FeatureBin  # noqa: E402

DPI = 100
# shap's own palette, so the consortium's figures read like the waterfalls clinicians know.
LOW_HIGH = shap.plots.colors.red_blue  # blue to red: low to high value, negative to positive SHAP
MISSING_COLOUR = shap.plots.colors.gray_rgb
MARKERS = "osD^v<>p*"
SHAP_AXIS = "SHAP value (log-odds of the outcome)"


def to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" text chunk: the report should carry nothing but the figure.
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def is_missing(b: FeatureBin) -> bool:
    """The bin of missing values, which has no place on a value axis (as in `explain.aggregate`)."""
    return b.label == MISSING and b.low is None and b.high is None


def value_positions(bins: Sequence[FeatureBin], *, numeric: bool) -> dict[str, float]:
    """Where each bin, by label, sits on a value axis: numeric bins at their centre, open-ended
    ones half a typical bin beyond their edge, categories one apart; missing values nowhere."""
    shown = [b for b in bins if not is_missing(b)]
    if not numeric:
        return {b.label: float(i) for i, b in enumerate(shown)}
    widths = [b.high - b.low for b in shown if b.low is not None and b.high is not None]
    half = float(np.median(widths)) / 2 if widths else 0.0
    positions = {}
    for b in shown:
        if b.low is not None and b.high is not None:
            positions[b.label] = (b.low + b.high) / 2
        elif b.low is not None or b.high is not None:
            positions[b.label] = b.low + half if b.high is None else b.high - half
    return positions


# -- performance ----------------------------------------------------------------------------------


def reliability_plot(title: str, mean_predicted: np.ndarray, observed: np.ndarray, counts: np.ndarray) -> bytes:
    """Observed positive rate against mean predicted probability per score bin, counts below."""
    fig = _figure(4.4, 4.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], ls="--", color="#999", lw=1, label="perfect calibration")
    filled = counts > 0
    top.plot(mean_predicted[filled], observed[filled], marker="o", color="#1f5f99", label="observed")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed positive rate", title=title)
    top.legend(loc="upper left", fontsize=8, frameon=False)
    width = 1 / len(counts)
    lefts = np.arange(len(counts)) * width
    bottom.bar(lefts, counts, width=width, align="edge", color="#b8c7db", edgecolor="white")
    for left, count in zip(lefts, counts):
        if count:
            bottom.annotate(str(int(count)), (left + width / 2, count), ha="center", va="bottom", fontsize=7)
    bottom.set(xlabel="predicted probability", ylabel="samples", ylim=(0, max(counts.max(), 1) * 1.3))
    return to_png(fig)


def training_curve(
    rounds: Sequence[int],
    pooled: Sequence[float],
    pooled_ci: Sequence[tuple[float, float] | None],
    by_hospital: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    figure: str = "AUROC",
) -> bytes:
    """The pooled figure (AUROC, macro AUROC, R²) per round with its confidence band where there
    is one; each hospital's faint behind it."""
    fig = _figure(8, 3.8)
    ax = fig.subplots()
    for k, (hospital, (hr, auroc)) in enumerate(by_hospital.items()):
        ax.plot(hr, auroc, marker=MARKERS[k % len(MARKERS)], ms=4, lw=1, alpha=0.6, label=hospital)
    with_ci = [(r, ci) for r, ci in zip(rounds, pooled_ci) if ci is not None]
    if with_ci:
        ax.fill_between([r for r, _ in with_ci], [c[0] for _, c in with_ci], [c[1] for _, c in with_ci],
                        color="#222", alpha=0.12, lw=0, label="pooled, 95% CI")
    ax.plot(rounds, pooled, marker="o", color="#222", lw=2, label="pooled")
    low = 0.4 if "AUROC" in figure else min(0.0, np.nanmin([*pooled, *(v for _, values in by_hospital.values() for v in values)], initial=0.0))
    ax.set(xlabel="round", ylabel=f"{figure} on held-out samples", ylim=(low, 1.0))
    ax.set_xticks(list(rounds))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return to_png(fig)


# -- explanations ---------------------------------------------------------------------------------


def binned_prediction(counts: np.ndarray, edges: np.ndarray) -> bytes:
    """Patients per (predicted, observed) bin as a heatmap, the diagonal where predictions are right."""
    fig = _figure(5.2, 4.6)
    ax = fig.subplots()
    shown = np.ma.masked_equal(counts.T, 0)  # rows: observed
    image = ax.imshow(shown, origin="lower", cmap="Blues", aspect="auto")
    ax.plot([-0.5, len(counts) - 0.5], [-0.5, len(counts) - 0.5], ls="--", color="#999", lw=1)
    ticks = np.arange(len(counts) + 1) - 0.5
    labels = [f"{e:.3g}" for e in edges]
    ax.set_xticks(ticks[::2], labels[::2], fontsize=7)
    ax.set_yticks(ticks[::2], labels[::2], fontsize=7)
    ax.set(xlabel="predicted", ylabel="observed")
    fig.colorbar(image, ax=ax, label="held-out patients")
    return to_png(fig)


def importance_bars(label: str, importance: Mapping[str, float], by_hospital: Mapping[str, Mapping[str, float]]) -> bytes:
    """Mean |SHAP| per feature as bars, in the given order from the top; each hospital as a marker."""
    names = list(importance)
    y = np.arange(len(names))[::-1]
    fig = _figure(8, 0.32 * len(names) + 1.3)
    ax = fig.subplots()
    ax.barh(y, [importance[n] for n in names], color="#8fa8c8", label=label)
    for k, (hospital, values) in enumerate(by_hospital.items()):
        ax.scatter([values.get(n, np.nan) for n in names], y, marker=MARKERS[k % len(MARKERS)], s=24,
                   zorder=3, label=hospital)
    ax.set_yticks(y, names)
    ax.set_xlabel("mean |SHAP| (log-odds)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return to_png(fig)


def model_comparison(auroc: Mapping[str, Mapping[str, float]], ylabel: str = "AUROC on its held-out patients") -> bytes:
    """AUROC per hospital (groups) and model (bars): what federating gave each hospital; or per
    hospital and patient group, with groups as the bars."""
    models = list(auroc)
    hospitals = sorted({h for values in auroc.values() for h in values})
    width = 0.8 / len(models)
    fig = _figure(max(7.0, 1.8 * len(hospitals) + 2.0), 4.0)
    ax = fig.subplots()
    for k, model in enumerate(models):
        x = np.arange(len(hospitals)) + (k - (len(models) - 1) / 2) * width
        ax.bar(x, [auroc[model].get(h, np.nan) for h in hospitals], width, label=model)
    ax.set_xticks(np.arange(len(hospitals)), hospitals)
    ax.set_ylabel(ylabel)
    lowest = min((v for values in auroc.values() for v in values.values() if np.isfinite(v)), default=0.5)
    ax.set_ylim(min(0.5, lowest - 0.05), 1.0)  # a model worse than chance somewhere must show
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return to_png(fig)


def binned_summary(bins_by_feature: Mapping[str, Sequence[FeatureBin]]) -> bytes:
    """A beeswarm from binned aggregates: per feature a row, per bin a dot at its mean SHAP.

    Dots are coloured by the bin's position from low to high value (grey: missing values) and
    sized by its count. Inside a row, higher bins sit slightly higher, so bins with equal mean SHAP
    stay visible side by side.
    """
    names = list(bins_by_feature)
    largest = max((b.count for bins in bins_by_feature.values() for b in bins), default=1)
    fig = _figure(8, 0.42 * len(names) + 1.4)
    ax = fig.subplots()
    for row, name in enumerate(names):
        bins = bins_by_feature[name]
        valued = [b for b in bins if not is_missing(b)]
        position = dict(zip((b.label for b in valued), np.linspace(0, 1, len(valued)) if len(valued) > 1 else [0.5]))
        ax.scatter(
            [b.mean_shap for b in bins],
            [len(names) - 1 - row + 0.3 * (position.get(b.label, 0.5) - 0.5) for b in bins],
            s=[15 + 300 * b.count / largest for b in bins],
            c=[LOW_HIGH(position[b.label]) if b.label in position else MISSING_COLOUR for b in bins],
            alpha=0.85, edgecolors="white", linewidths=0.5,
        )
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_yticks(np.arange(len(names))[::-1], names)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xlabel(SHAP_AXIS)
    bar = fig.colorbar(ScalarMappable(cmap=LOW_HIGH), ax=ax, ticks=[0, 1], aspect=40)
    bar.ax.set_yticklabels(["low", "high"])
    bar.set_label("feature value (bin)")
    return to_png(fig)


def dependence_plot(
    name: str, merged: Sequence[FeatureBin], by_hospital: Mapping[str, Sequence[FeatureBin]], *, numeric: bool
) -> bytes:
    """Mean SHAP per bin against the bin's value; the merged bins bold, each hospital's faint.

    Every hospital's bins are placed by label where the merged ones are, so their lines align.
    """
    where = value_positions(merged, numeric=numeric)

    def placed(bins: Sequence[FeatureBin]) -> tuple[list[float], list[float]]:
        kept = [b for b in bins if b.label in where]
        return [where[b.label] for b in kept], [b.mean_shap for b in kept]

    fig = _figure(4.6, 3.4)
    ax = fig.subplots()
    for k, (hospital, bins) in enumerate(by_hospital.items()):
        ax.plot(*placed(bins), marker=MARKERS[k % len(MARKERS)], ms=3, lw=0.8, alpha=0.5, label=hospital)
    largest = max((b.count for b in merged), default=1)
    on_axis = [b for b in merged if b.label in where]
    ax.plot(*placed(merged), color="#222", lw=1.5, zorder=3)
    ax.scatter(*placed(merged), s=[10 + 120 * b.count / largest for b in on_axis], color="#222", zorder=4,
               label="consortium" if by_hospital else None)
    if numeric:
        # The bin's extent, so a wide bin is not read as a single value.
        for b in on_axis:
            if b.low is not None and b.high is not None:
                ax.plot([b.low, b.high], [b.mean_shap] * 2, color="#222", lw=3, alpha=0.25, zorder=2)
    else:
        ax.set_xticks(list(where.values()), list(where), rotation=30, ha="right")
    for b in merged:
        if is_missing(b):
            ax.annotate(f"missing values: {b.mean_shap:+.2f} (n={b.count})", (0.02, 0.03), xycoords="axes fraction", fontsize=8)
    ax.axhline(0, color="#999", lw=0.8)
    ax.set(title=name, xlabel=name, ylabel="mean SHAP (log-odds)")
    if by_hospital:
        ax.legend(fontsize=7, frameon=False)
    return to_png(fig)


def drift_heatmap(drift: Mapping[str, Mapping[str, float]], features: Sequence[str]) -> bytes:
    """Per hospital and feature, its share of importance minus the consortium's, in percentage points."""
    hospitals = list(drift)
    values = 100 * np.array([[drift[h].get(f, np.nan) for f in features] for h in hospitals], dtype=np.float64)
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    fig = _figure(max(6.0, 0.62 * len(features) + 2.5), 0.5 * len(hospitals) + 2.2)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(v) > 0.6 * limit else "black")
    ax.set_xticks(range(len(features)), features, rotation=40, ha="right")
    ax.set_yticks(range(len(hospitals)), hospitals)
    fig.colorbar(image, ax=ax, label="percentage points", shrink=0.8)
    return to_png(fig)


def attribution_maps(maps: Mapping[str, np.ndarray]) -> bytes:
    """Mean |SHAP| over the image grid, one panel per map, on one shared colour scale."""
    fig = _figure(3.0 * len(maps) + 1.0, 3.3)
    axes = np.atleast_1d(fig.subplots(1, len(maps)))
    top = max(float(np.max(m)) for m in maps.values()) or 1.0
    for ax, (title, values) in zip(axes, maps.items()):
        image = ax.imshow(values, cmap="magma", vmin=0, vmax=top)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), label="mean |SHAP|", shrink=0.85)
    return to_png(fig)


# -- one patient (stays at the hospital) ----------------------------------------------------------


def _plain(text: str) -> str:
    # A "$" pair would switch matplotlib's tick labels into mathtext.
    return text.replace("$", r"\$")


def waterfall(base_value: float, contributions: Sequence[tuple[str, str, float]], max_display: int = 10) -> bytes:
    """shap's waterfall: from the base value, each feature's push, to the patient's model output."""
    explanation = shap.Explanation(
        values=np.array([c[2] for c in contributions], dtype=np.float64),
        base_values=float(base_value),
        data=np.array([_plain(c[1]) for c in contributions], dtype=object),
        feature_names=[_plain(c[0]) for c in contributions],
    )
    fig = plt.figure()
    try:
        shap.plots.waterfall(explanation, max_display=max_display, show=False)
        return to_png(fig)
    finally:
        plt.close(fig)


def image_overlay(image: np.ndarray, attribution: np.ndarray) -> bytes:
    """The image, its SHAP map, and the map over the image: red raised the risk, blue lowered it."""
    limit = float(np.abs(attribution).max()) or 1.0
    fig = _figure(10, 3.5)
    axes = fig.subplots(1, 3)
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("image")
    shown = axes[1].imshow(attribution, cmap=shap.plots.colors.red_white_blue, vmin=-limit, vmax=limit)
    axes[1].set_title("SHAP map")
    axes[2].imshow(image, cmap="gray", alpha=0.6)
    axes[2].imshow(attribution, cmap=shap.plots.colors.red_transparent_blue, vmin=-limit, vmax=limit)
    axes[2].set_title("overlay")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=list(axes), label="SHAP (log-odds)", shrink=0.85)
    return to_png(fig)
