"""The reports clinicians read: the consortium's, each hospital's own, and one page per patient.

Each report is one self-contained HTML file: figures are embedded as base64 PNG, styles are
inline, nothing is fetched and no script runs, so it opens offline and can be sent by mail.
The consortium report (`RUN_DIR/report.html`) is built only from what left the hospitals: counts,
per-class score histograms and explanation aggregates. A hospital's report adds its own patients
and is written in the hospital's own area. Every report is rendered in memory and written
atomically, so a failure leaves no partial report behind.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, norm

from fedward.explain import plots
from fedward.explain.summary import ConsortiumExplanation, ExplanationSummary, FeatureBin, consortium_from_json, summary_from_json
from fedward.errors import CheckpointError, DataError, FedwardError
from fedward.files import atomic_write
from fedward.checkpoint import load_checkpoint, read_metrics
from fedward import release
from fedward.release import ScoreBins
from fedward.tasks import TASKS

DEPENDENCE_FEATURES = 6  # dependence plots for the most important features
TOP_FEATURES = 5  # a patient's contributions put in words
TOP_GAPS = 8  # gaps between patient groups listed in the report
LEVEL = 0.95
CHECKS = {
    "additivity": "base value + SHAP values = model output, within 1e-3",
    "driving_above_noise": "every feature that truly drives the outcome ranks above every pure-noise feature (demo data)",
}


@dataclass(frozen=True)
class PatientExplanation:
    """One explained sample of one patient; stays at the hospital, in its own report."""

    patient_id: str
    sample_id: str
    label: int
    probability: float  # the model's predicted probability of the outcome
    base_value: float  # the explainer's expected output (log-odds) over the hospital's background
    contributions: list[tuple[str, str, float]]  # tables: (feature, value as text, SHAP), by |SHAP| descending
    image: np.ndarray | None  # images: (H, W) in [0, 1]
    attribution: np.ndarray | None  # images: (H, W) SHAP map


# -- statistics from what left the hospitals -------------------------------------------------------


def auroc_ci(auroc: float | None, positives: int, negatives: int, level: float = LEVEL) -> tuple[float, float] | None:
    """Hanley and McNeil's (1982) interval for an AUROC from the class counts alone."""
    if auroc is None or positives == 0 or negatives == 0:
        return None
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    variance = (auroc * (1 - auroc) + (positives - 1) * (q1 - auroc**2) + (negatives - 1) * (q2 - auroc**2)) / (
        positives * negatives
    )
    half = norm.ppf(0.5 + level / 2) * math.sqrt(max(variance, 0.0))
    return max(0.0, auroc - half), min(1.0, auroc + half)


def accuracy_ci(accuracy: float | None, n: int, level: float = LEVEL) -> tuple[float, float] | None:
    """Wilson's score interval for a proportion of `n`."""
    if accuracy is None or n == 0:
        return None
    interval = binomtest(round(accuracy * n), n).proportion_ci(level, method="wilson")
    return interval.low, interval.high


def reliability(bins: ScoreBins) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per released score bin: its middle score, observed positive rate, and count. A hospital
    releases bins holding at least its release floor of each outcome (fedward/release.py), so the
    middle of a bin stands for the mean predicted probability, which is not released."""
    counts = bins.positive + bins.negative
    return bins.midpoints(), bins.positive / counts, counts.astype(np.int64)


# -- HTML ------------------------------------------------------------------------------------------


class Html(str):
    """Markup built here from escaped parts: inserted as it is, where plain text is escaped."""


def _e(value: object) -> str:
    return value if isinstance(value, Html) else html.escape(str(value))


def _img(png: bytes, alt: str) -> Html:
    return Html(f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> Html:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _p(text: str, cls: str = "") -> Html:
    return Html(f'<p class="{cls}">{_e(text)}</p>' if cls else f"<p>{_e(text)}</p>")


def _grid(images: Iterable[Html]) -> Html:
    return Html('<div class="grid">' + "".join(images) + "</div>")


@dataclass(frozen=True)
class _Section:
    anchor: str
    title: str
    parts: tuple[Html, ...]

    def html(self) -> str:
        return f'<section id="{self.anchor}"><h2>{_e(self.title)}</h2>{"".join(self.parts)}</section>'


def _section(anchor: str, title: str, *parts: Html) -> _Section:
    return _Section(anchor, title, parts)


STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232b; margin: 0; background: #f4f6f8; }
main { max-width: 1120px; margin: 0 auto; padding: 24px; }
header h1 { margin: 0 0 4px; } header p { margin: 0; color: #5a6572; }
nav { margin: 16px 0; display: flex; flex-wrap: wrap; gap: 4px 16px; } nav a { color: #1f5f99; text-decoration: none; }
section, article { background: #fff; border: 1px solid #dde3ea; border-radius: 6px; padding: 16px 20px; margin: 16px 0; }
article { border-color: #e8ecf0; }
h2 { margin-top: 0; font-size: 1.3em; } h3 { font-size: 1.08em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid #e5e9ee; vertical-align: top; }
th { background: #eef2f6; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 8px; }
.note { color: #5a6572; font-size: 0.92em; }
.banner { background: #fff4d6; border: 1px solid #e8c55c; border-radius: 6px; padding: 10px 16px; margin: 12px 0; }
.pass { color: #17672e; font-weight: 600; } .fail { color: #a1161b; font-weight: 700; }
ol.words li { margin: 4px 0; }
"""


def _page(title: str, subtitle: str, notices: Sequence[str], sections: Sequence[_Section]) -> bytes:
    # The policy makes "self-contained" a property the browser enforces, not a convention.
    policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    links = "".join(f'<a href="#{s.anchor}">{_e(s.title)}</a>' for s in sections)
    nav = f"<nav>{links}</nav>" if len(sections) > 1 else ""
    banners = "".join(f'<div class="banner" role="alert">{_e(n)}</div>' for n in notices)
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>"
        f"<body><main><header><h1>{_e(title)}</h1><p>{_e(subtitle)} · written {written}</p></header>"
        f"{banners}{nav}{''.join(s.html() for s in sections)}</main></body></html>\n"
    ).encode()


def _figure(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: tuple[float, float] | None) -> str:
    return _figure(value) if ci is None else f"{value:.3f} ({ci[0]:.3f}–{ci[1]:.3f})"


# -- the model card --------------------------------------------------------------------------------


def _setting(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}={_setting(v)}" for k, v in value.items())
    return str(value)


def _data_rows(data: dict, task: dict | None = None) -> list[tuple[str, str, str]]:
    rows = [("data", "kind", data["kind"])]
    spec = data.get(data["kind"]) or {}
    label = spec.get("label") or {}
    kind = (task or {}).get("kind") or "binary"
    if label and kind == "multiclass":
        rows.append(("data", "outcome", f"{label['column']}, one of {_setting(task['classes'])} (multiclass)"))
    elif label and kind == "regression":
        rows.append(("data", "outcome", f"{label['column']}, a number in its own units (regression)"))
    elif label:
        negatives = label.get("negative_values")
        rule = (
            f"in {_setting(label['positive_values'])}" + (f", negative {_setting(negatives)}" if isinstance(negatives, list) else ", all other values negative")
            if label.get("positive_values")
            else f"at or above {label['threshold']}" if label.get("threshold") is not None else "is 1 / true"
        )
        rows.append(("data", "outcome", f"{label['column']} {rule}"))
    if data["kind"] == "table":
        rows.append(("data", "features", ", ".join(f"{f['name']} ({f['type']})" for f in spec["features"])))
        rows.append(("data", "file", spec["file"]))
    else:
        rows.extend(("data", k, _setting(spec[k])) for k in ("image_size", "frames", "window") if k in spec)
    rows.append(("data", "held-out share", _setting(data.get("holdout_fraction"))))
    return rows


def _model_rows(identity: dict) -> list[tuple[str, str, str]]:
    model = dict(identity["model"])
    model.pop("channels" if model["kind"] == "mlp" else "hidden", None)  # the other kind's widths
    if model.get("norm") != "group":
        model.pop("groups", None)
    rows = [("model", k, _setting(v)) for k, v in model.items()]
    rows += [("model", f"{h['name']} overrides", _setting(h["model"])) for h in identity["hospitals"] if h.get("model")]
    return rows


def _settings_rows(identity: dict, finished: int, config_hash: str | None):
    run = identity["run"]
    rows = [
        ("run", "name", run["name"]),
        ("run", "rounds", f"{finished} of {run['rounds']} finished"),
        ("run", "seed", _setting(run.get("seed"))),
        ("run", "quorum", f"at least {run.get('min_hospitals')} hospitals per round"),
    ]
    if config_hash:
        rows.append(("run", "config hash", config_hash[:16]))
    rows += _data_rows(identity["data"], identity.get("task")) + _model_rows(identity)
    rows += [(section, k, _setting(v)) for section in ("train", "strategy", "privacy") for k, v in (identity.get(section) or {}).items()]
    rows += [("explanations", k, _setting(v)) for k, v in (identity.get("explain") or {}).items()]
    return rows


def _model_card(identity: dict, finished: int, sites: Html, config_hash: str | None = None) -> _Section:
    return _section(
        "model-card", "Model card",
        Html("<h3>Hospitals</h3>"), sites,
        Html("<h3>Settings</h3>"), _table(("section", "setting", "value"), _settings_rows(identity, finished, config_hash)),
    )


# -- performance -----------------------------------------------------------------------------------


def _class_counts(m: dict) -> tuple[int, int] | None:
    if "positives" not in m:
        return None
    return int(m["positives"]), int(m["n"] - m["positives"])


def _metrics_row(name: str, m: dict, counts: tuple[int, int] | None) -> tuple:
    if "held_back" in m:
        return (name, m["n"], "—", m["held_back"], "—", "—", "—")
    auroc = auroc_ci(m.get("auroc"), *counts) if counts else None
    return (
        name, m["n"], "n/a" if counts is None else counts[0],
        _with_ci(m.get("auroc"), auroc), _figure(m.get("auprc")),
        _with_ci(m.get("accuracy"), accuracy_ci(m.get("accuracy"), m["n"])), _figure(m.get("loss")),
    )


def _task(identity: dict) -> str:
    """The run's task kind: binary when the config names none (runs made before tasks, too)."""
    return (identity.get("task") or {}).get("kind") or "binary"


def _performance(record: dict, hospitals: Sequence[str], kind: str = "binary") -> _Section:
    if kind != "binary":
        return _task_performance(record, hospitals, kind)
    rows = [_metrics_row(h, record["hospitals"][h], _class_counts(record["hospitals"][h])) for h in hospitals if h in record["hospitals"]]
    missing = [h for h in hospitals if h not in record["hospitals"]]
    pooled = record.get("pooled") or {}
    if pooled:
        rows.append(_metrics_row(f"pooled ({', '.join(pooled.get('pooled_over', []))})", pooled, _class_counts(pooled)))
    reasons = {**record.get("failures", {}), **record.get("evaluation_failures", {})}
    parts = [
        _p(f"Held-out samples after round {record['round']}. In brackets: 95% confidence intervals, "
           f"for AUROC by Hanley and McNeil from the class counts, for accuracy by Wilson."),
        _table(("hospital", "held-out", "positives", "AUROC (95% CI)", "AUPRC", "accuracy (95% CI)", "loss"), rows),
    ]
    if pooled.get("auroc_error_bound") is not None:
        parts.append(_p(f"The pooled figures come from per-class counts of scores in 0.01 slices, added up under the hospitals' "
                        f"pads and opened at a hospital, never from per-patient scores; the pooled AUROC is within "
                        f"±{pooled['auroc_error_bound']:.4f} of the exact value. A hospital's own figures come from the score bins "
                        f"it releases, each holding at least its release floor of patients of each outcome; its AUROC is within "
                        f"the bound its record gives.", "note"))
    parts += [_p(f"{h} was not evaluated in this round: {reasons.get(h, 'no answer')}", "note") for h in missing]
    return _section("performance", "Performance per hospital", *parts)


def _task_performance(record: dict, hospitals: Sequence[str], kind: str) -> _Section:
    """Multiclass and regression figures per hospital and pooled, as the task pooled them."""
    names = [h for h in hospitals if h in record["hospitals"]]
    entries = [(h, record["hospitals"][h]) for h in names]
    if record.get("pooled"):
        entries.append(("pooled (all hospitals)", record["pooled"]))
    reasons = {**record.get("failures", {}), **record.get("evaluation_failures", {})}
    notes = [_p(f"{h} was not evaluated in this round: {reasons.get(h, 'no answer')}", "note") for h in hospitals if h not in record["hospitals"]]
    if kind == "regression":
        rows = [(name, m["n"], _figure(m.get("r2")), _figure(m.get("mse")), _figure(m.get("mae")), _figure(m.get("loss"))) for name, m in entries]
        return _section("performance", "Performance per hospital",
                        _p(f"Held-out samples after round {record['round']}. MSE and MAE in the target's units; R² against each "
                           f"group's own mean. The pooled figures are exact: each hospital releases sums over its patients."),
                        _table(("hospital", "held-out", "R²", "MSE", "MAE", "loss (standardized)"), rows), *notes)
    rows = [(name, m["n"], _figure(m.get("macro_auroc")), _figure(m.get("accuracy")), _figure(m.get("balanced_accuracy")), _figure(m.get("loss")))
            for name, m in entries]
    classes = list((record.get("pooled") or {}).get("class_auroc") or next(iter(record["hospitals"].values()), {}).get("class_auroc") or {})
    per_class = [(name, *(_figure((m.get("class_auroc") or {}).get(c)) for c in classes)) for name, m in entries]
    parts = [
        _p(f"Held-out samples after round {record['round']}. Macro AUROC: the mean over classes of each class's one-vs-rest "
           f"AUROC; a hospital without a class has no AUROC for it (—). Balanced accuracy: the mean recall over classes."),
        _table(("hospital", "held-out", "macro AUROC", "accuracy", "balanced accuracy", "loss"), rows),
        _table(("AUROC of each class against the rest", *classes), per_class),
    ]
    confusion = (record.get("pooled") or {}).get("confusion")
    if confusion:
        parts += [_p("Pooled confusion matrix: held-out samples by true class (rows) and predicted class (columns)."),
                  _table(("true \\ predicted", *classes), [(c, *row) for c, row in zip(classes, confusion)])]
    return _section("performance", "Performance per hospital", *parts, *notes)


def _calibration_panel(name: str, bins: ScoreBins) -> Html:
    mean_predicted, observed, counts = reliability(bins)
    ece = float((counts * np.abs(observed - mean_predicted)).sum() / counts.sum())
    return _img(plots.reliability_plot(f"{name} (ECE {ece:.3f})", mean_predicted, observed, counts), f"calibration at {name}")


def _calibration(record: dict, hospitals: Sequence[str], kind: str = "binary", scale: dict | None = None) -> _Section | None:
    if kind == "regression":
        return _predicted_against_observed(record, scale)
    if kind != "binary":
        return None
    panels = {h: ScoreBins.of(record["hospitals"][h]) for h in hospitals if h in record["hospitals"]}
    images = [_calibration_panel(name, bins) for name, bins in panels.items() if bins is not None]
    intro = _p("Observed positive rate against predicted probability in the score bins each hospital releases (each holds at "
               "least its release floor of patients of each outcome), with the number of held-out samples per bin; points on "
               "the diagonal are well calibrated. A bin's predicted probability is its middle. ECE: expected calibration error, "
               "the count-weighted mean distance from the diagonal.")
    body = _grid(images) if images else _p("No score bins were released for this round.", "note")
    return _section("calibration", "Calibration per hospital", intro, body)


def _predicted_against_observed(record: dict, scale: dict | None) -> _Section | None:
    """The pooled (predicted, observed) histogram as a binned plot; cells held back blank."""
    cells = (record.get("pooled") or {}).get("calibration")
    if not cells or scale is None:
        return None
    from fedward.tasks.regression import EDGE, PLOT_BINS

    shown = np.array([[0 if c is None else c for c in row] for row in cells])
    edges = scale["mean"] + scale["sd"] * np.linspace(-EDGE, EDGE, PLOT_BINS + 1)
    png = plots.binned_prediction(shown, edges)
    return _section("calibration", "Predicted against observed",
                    _p(f"Held-out patients of every hospital by predicted and observed value, in the target's units, in bins of "
                       f"{scale['sd'] / (PLOT_BINS / (2 * EDGE)):.3g} around the consortium's mean (the outermost bins hold the tails). "
                       f"The counts are added up under the hospitals' pads; cells with fewer patients than the release floor are held "
                       f"back and left blank."),
                    _img(png, "predicted against observed, pooled"))


def _pooled_auroc_ci(record: dict) -> tuple[float, float] | None:
    pooled = record.get("pooled") or {}
    counts = _class_counts(pooled)
    return None if counts is None else auroc_ci(pooled.get("auroc"), *counts)


def _training(metrics: Sequence[dict], hospitals: Sequence[str], kind: str = "binary") -> _Section:
    figure, label = TASKS[kind].figures[0]

    def value(m: dict) -> float:
        return np.nan if m.get(figure) is None else m[figure]  # a round without both classes has none

    by_hospital = {
        h: ([r["round"] for r in metrics if h in r["hospitals"]], [value(r["hospitals"][h]) for r in metrics if h in r["hospitals"]])
        for h in hospitals
    }
    bands = [_pooled_auroc_ci(r) if kind == "binary" else None for r in metrics]
    png = plots.training_curve([r["round"] for r in metrics], [value(r.get("pooled") or {}) for r in metrics], bands, by_hospital, label)
    return _section("training", "Training curve", _p(f"{label} on held-out samples after each round."),
                    _img(png, f"pooled {label} per round"))


# -- explanations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Explained:
    """The explanation aggregates one report shows: the consortium's or one hospital's."""

    round: int
    label: str  # whose importance the bars show
    importance: dict[str, float]  # most important first
    by_hospital: dict[str, dict[str, float]]
    bins: dict[str, tuple[FeatureBin, ...]]
    hospital_bins: dict[str, dict[str, tuple[FeatureBin, ...]]]  # feature -> hospital -> bins
    suppressed: dict[str, int]  # feature -> bins left out for too few patients
    drift: dict[str, dict[str, float]] | None
    image_maps: dict[str, np.ndarray]  # panel title -> mean |SHAP| grid
    checks: list[tuple[str, str, str, bool]]  # (check, scope, detail, passed)
    noise: dict[str, float]  # hospital -> sigma of the noise on its released means


def _check_rows(scope: str, checks: Mapping[str, bool], additivity_error: float) -> list[tuple[str, str, str, bool]]:
    def detail(name: str) -> str:
        what = CHECKS.get(name, "")
        return f"{what}; worst error {additivity_error:.1e}" if name == "additivity" else what

    return [(name, scope, detail(name), ok) for name, ok in checks.items()]


def _from_consortium(consortium: ConsortiumExplanation, summaries: Mapping[str, ExplanationSummary]) -> _Explained:
    hospital_bins: dict[str, dict[str, tuple[FeatureBin, ...]]] = {}
    for hospital, summary in summaries.items():
        for feature in summary.features:
            hospital_bins.setdefault(feature.name, {})[hospital] = feature.bins
    maps = {"consortium": consortium.image_map} if consortium.image_map is not None else {}
    maps |= {h: s.image_map for h, s in summaries.items() if s.image_map is not None}
    return _Explained(
        round=consortium.round,
        label="consortium",
        importance={f: consortium.global_importance[f] for f in consortium.features},
        by_hospital={h: consortium.hospital_importance[h] for h in consortium.hospitals if h in consortium.hospital_importance},
        bins={f: consortium.bins[f] for f in consortium.features if f in consortium.bins},
        hospital_bins=hospital_bins,
        suppressed={f: sum(feat.suppressed_bins for s in summaries.values() for feat in s.features if feat.name == f)
                    for f in consortium.features},
        drift=consortium.drift,
        image_maps=maps,
        checks=_check_rows("consortium", consortium.checks, consortium.additivity_error)
        + [row for h, s in summaries.items() for row in _check_rows(h, s.checks, s.additivity_error)],
        noise={h: s.noise_sigma for h, s in summaries.items()},
    )


def _from_summary(s: ExplanationSummary) -> _Explained:
    ordered = sorted(s.features, key=lambda f: -f.mean_abs_shap)
    return _Explained(
        round=s.round,
        label=s.hospital,
        importance={f.name: f.mean_abs_shap for f in ordered},
        by_hospital={},
        bins={f.name: f.bins for f in ordered},
        hospital_bins={},
        suppressed={f.name: f.suppressed_bins for f in ordered},
        drift=None,
        image_maps={s.hospital: s.image_map} if s.image_map is not None else {},
        checks=_check_rows(s.hospital, s.checks, s.additivity_error),
        noise={s.hospital: s.noise_sigma},
    )


def _feature_sections(ex: _Explained, types: Mapping[str, str]) -> list[_Section]:
    noisy = {h: sigma for h, sigma in ex.noise.items() if sigma > 0}
    noise_note = [_p(f"Gaussian noise was added to every released mean (sigma: {_setting(noisy)}).", "note")] if noisy else []
    sections = [
        _section("importance", "Global importance",
                 _p(f"Mean absolute SHAP value per feature on held-out samples after round {ex.round}: how much, on "
                    f"average, a feature moves a patient's predicted log-odds."
                    + (" Bars: the consortium (sample-weighted over hospitals); markers: each hospital." if ex.by_hospital else "")),
                 _img(plots.importance_bars(ex.label, ex.importance, ex.by_hospital), "global feature importance"),
                 *noise_note),
        _section("summary", "SHAP summary (binned beeswarm)",
                 _p("Per feature, one dot per value bin at the bin's mean SHAP value; colour from low (blue) to high "
                    "(red) value, for categories in their listed order, grey for missing values; dot area by the number "
                    "of patients in the bin. Dots right of zero raise the predicted risk."),
                 _img(plots.binned_summary(ex.bins), "binned SHAP summary")),
    ]
    top = [f for f in ex.importance if ex.bins.get(f)][:DEPENDENCE_FEATURES]
    images = [
        _img(plots.dependence_plot(f, ex.bins[f], ex.hospital_bins.get(f, {}), numeric=types.get(f) == "numeric"),
             f"dependence of SHAP on {f}")
        for f in top
    ]
    suppressed = {f: n for f, n in ex.suppressed.items() if n}
    parts = [_p(f"Mean SHAP value per value bin for the {len(top)} most important features"
                + (", for the consortium (black) and each hospital" if ex.hospital_bins else "") + ".")]
    parts.append(_grid(images))
    if suppressed:
        parts.append(_p("Bins with too few patients are not released: " + ", ".join(f"{f}: {n}" for f, n in suppressed.items()) + ".", "note"))
    sections.append(_section("dependence", "Dependence plots", *parts))
    if ex.drift:
        sections.append(_section(
            "drift", "Drift across hospitals",
            _p("Each feature's share of a hospital's total importance minus its share of the consortium's, in "
               "percentage points: red where a feature matters more at that hospital, blue where it matters less."),
            _img(plots.drift_heatmap(ex.drift, list(ex.importance)), "importance drift per hospital")))
    return sections


def _image_section(ex: _Explained) -> _Section:
    return _section(
        "images", "Image attributions",
        _p("Mean absolute SHAP value over each cell of a coarse grid laid on the images: where in an image the "
           "model looks. Only this aggregate leaves a hospital; no image does."),
        _img(plots.attribution_maps(ex.image_maps), "aggregate attribution maps"))


def _checks(ex: _Explained) -> _Section:
    if not ex.checks:
        return _section("checks", "Checks", _p("No checks were recorded with these explanations.", "fail"))
    rows = [(name, scope, detail, Html('<span class="pass">pass</span>' if ok else '<span class="fail">FAIL</span>'))
            for name, scope, detail, ok in ex.checks]
    return _section("checks", "Checks", _p("Run with every explanation."), _table(("check", "where", "detail", "result"), rows))


def _explanation_sections(ex: _Explained, types: Mapping[str, str]) -> list[_Section]:
    sections = _feature_sections(ex, types) if ex.bins else []
    if ex.image_maps:
        sections.append(_image_section(ex))
    return [*sections, _checks(ex)]


def _failed_checks(ex: _Explained) -> list[str]:
    failed = [f"{name} at {scope}" for name, scope, _, ok in ex.checks if not ok]
    return [f"Explanation checks failed ({', '.join(failed)}): read the explanations with care; see Checks."] if failed else []


def _feature_types(identity: dict) -> dict[str, str]:
    table = identity["data"].get("table") or {}
    return {f["name"]: f["type"] for f in table.get("features", ())}


# -- the consortium report -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """What the consortium report reads from a run directory."""

    config_hash: str
    identity: dict
    data: dict
    finished: int
    metrics: list[dict]  # rounds up to the last finished one
    consortium: ConsortiumExplanation | None
    summaries: dict[str, ExplanationSummary]
    explain_failures: dict[str, str]  # hospital -> why its explanation failed
    warnings: list[str]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e})") from None


def _read_explanations(path: Path) -> tuple[ConsortiumExplanation | None, dict[str, ExplanationSummary], dict[str, str]]:
    """The consortium's explanation, each hospital's summary, and why any hospital's failed."""
    if not path.is_file():
        return None, {}, {}
    raw = _read_json(path)
    try:
        summaries = {h: summary_from_json(s) for h, s in raw["hospitals"].items()}
        return consortium_from_json(raw["consortium"]), summaries, dict(raw.get("failures", {}))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not an explanations file fedward can read (at {e}); run the explain stage again") from None


def _read_run(run_dir: Path) -> _Run:
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not (run_dir / "run.json").is_file():
        raise CheckpointError(f"{run_dir} is not a fedward run directory (no run.json)")
    run = _read_json(run_dir / "run.json")
    if "identity" not in run:
        raise CheckpointError(f"{run_dir / 'run.json'} is corrupt (no identity); restore it from a backup")
    warnings: list[str] = []
    ckpt = load_checkpoint(run_dir, warn=warnings.append)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no finished round yet; run the config (fedward simulate) before writing a report")
    metrics = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["round"] <= ckpt.round]
    if not metrics or metrics[-1]["round"] != ckpt.round:
        raise CheckpointError(f"{run_dir / 'metrics.jsonl'}: no metrics of finished round {ckpt.round}; the file was changed or lost")
    data = _read_json(run_dir / "data.json") if (run_dir / "data.json").is_file() else {"hospitals": {}, "refused": {}}
    consortium, summaries, failures = _read_explanations(run_dir / "explanations.json")
    return _Run(run.get("config_hash", ""), run["identity"], data, ckpt.round, metrics, consortium, summaries, failures, warnings)


def _outcomes(counts: dict) -> str:
    """A hospital's samples per outcome: positives of a binary task (runs made before tasks say
    only those), each class's count, or nothing for a numeric target."""
    targets = counts.get("targets", {"1": counts.get("positives")})
    if targets and set(targets) <= {"0", "1"}:
        return f"{targets['1']} positive"
    return ", ".join(f"{value} {n}" for value, n in targets.items()) or "—"


def _sites(run: _Run, names: Sequence[str]) -> Html:
    rows = []
    for name in names:
        c = run.data["hospitals"].get(name)
        explained = run.summaries[name].n if name in run.summaries else "failed" if name in run.explain_failures else "—"
        if c is None:
            rows.append((name, "—", "—", "—", "—", "—", explained))
            continue
        skipped = release.total(c["skipped"])
        detail = f" ({_setting(c['skipped'])})" if c["skipped"] else ""
        rows.append((name, c["train_examples"], c["holdout_examples"], c["train_patients"] + c["holdout_patients"],
                     _outcomes(c), f"{skipped}{detail}", explained))
    parts = [_table(("hospital", "training samples", "held-out samples", "patients", "outcomes", "skipped inputs",
                     "explained (SHAP)"), rows)]
    parts += [_p(f"{name} did not join: {why}", "note") for name, why in run.data.get("refused", {}).items()]
    return Html("".join(parts))


def _consortium_notices(run: _Run) -> list[str]:
    configured = run.identity["run"]["rounds"]
    notices = list(run.warnings)
    if run.finished < configured:
        notices.append(f"This run stopped after round {run.finished} of {configured}; figures are of round {run.finished}.")
    if run.consortium is None:
        notices.append("Explanations were not computed for this run (no explanations.json): this report has no feature "
                       "importance, SHAP summary, dependence, drift or checks sections.")
    elif run.consortium.round != run.finished:
        notices.append(f"Explanations are of round {run.consortium.round}, performance figures of round {run.finished}.")
    notices += [f"Explanations failed at {h}, which the explanation sections leave out: {why}" for h, why in run.explain_failures.items()]
    attack = run.identity.get("attack") or {}
    if attack.get("hospitals"):
        notices.append(f"Simulated attack: {', '.join(attack['hospitals'])} ran '{attack['kind']}' (config attack). This run tests "
                       f"defences; its model is not for patients.")
    return notices


# -- what each hospital gains ----------------------------------------------------------------------

MODEL_NAMES = {
    "global": "global model",
    "personal": "its personal model (Ditto)",
    "fine_tuned": "global, fine-tuned on its data",
    "local_only": "trained on its data alone",
}


def _gains(personalization: dict, hospitals: Sequence[str], kind: str = "binary") -> _Section:
    models = {m: personalization["models"][m] for m in MODEL_NAMES if m in personalization["models"]}
    figure, label = TASKS[kind].figures[0]
    auroc = {MODEL_NAMES[m]: {h: v.get(figure) for h, v in models[m]["hospitals"].items()} for m in models}
    rows = [(h, *(_figure(auroc[name].get(h)) for name in auroc)) for h in hospitals]
    rows.append(("pooled (all hospitals)", *(_figure(models[m]["pooled"].get(figure)) for m in models)))
    parts = [
        _p(f"{label} of each model on each hospital's own held-out patients after round {personalization['round']}; "
           f"every model was trained and evaluated at the hospital."),
        _table(("hospital", *auroc), rows),
        _img(plots.model_comparison(auroc, f"{label} on its held-out patients"), f"{label} per hospital and model"),
    ]
    for m in ("fine_tuned", "local_only"):
        if m in models:
            parts.append(_p(f"{MODEL_NAMES[m].capitalize()}: {models[m]['epochs']} epochs.", "note"))
    return _section("gains", "What each hospital gains", *parts)


def _by_group(summary: dict, hospitals: Sequence[str]) -> _Section:
    """The final global model per patient group: the largest gaps first, then every released group."""
    threshold, minimum = summary["threshold"], summary["min_count"]
    gaps = summary["gaps"][:TOP_GAPS]
    parts = [
        _p(f"The global model after round {summary['round']} on each hospital's held-out patients, by group. Sensitivity "
           f"and specificity count a score of {threshold:g} or more as a positive prediction. A hospital releases a group's "
           f"figures only when it holds at least {minimum} positive and {minimum} negative patients in it (and holds back "
           f"more groups when the held-back ones could be worked out from the rest); pooled figures combine the hospitals "
           f"that released the group (added up under their pads), and pooled gaps only the hospitals that released every group "
           f"compared. A hospital's own AUROC is rounded to two decimals, and its rates are given (otherwise n/a) only where none "
           f"of its released score bins straddles the threshold. Counts are "
           f"of {'images' if summary.get('kind') == 'dicom' else 'rows'}."),
        Html("<h3>Largest gaps between groups</h3>"),
        _table(("where", "attribute", "metric", "gap", "best group", "worst group"), [
            (g["scope"], g["attribute"], g["metric"], f"{g['gap']:.3f}", g["best"], g["worst"]) for g in gaps
        ]) if gaps else _p("No attribute had two known groups large enough to compare.", "note"),
    ]
    held = {h: [a for a, any_held in by.items() if any_held] for h, by in summary["held_back"].items()}
    for attribute, figures in summary["attributes"].items():
        pooled = [(f"pooled ({', '.join(figures['pooled_over'][g])})", g, f) for g, f in figures["pooled"].items()]
        rows = [
            (where, group, f["positives"], f["negatives"], _figure(f["auroc"]), _figure(f.get("sensitivity")), _figure(f.get("specificity")))
            for where, group, f in (*pooled, *((h, g, f) for h in hospitals for g, f in figures["hospitals"].get(h, {}).items()))
        ]
        auroc = {g: {"pooled": f["auroc"], **{h: figures["hospitals"][h][g]["auroc"] for h in hospitals if g in figures["hospitals"].get(h, {})}}
                 for g, f in figures["pooled"].items()}
        parts += [Html(f"<h3>By {_e(attribute)}</h3>"),
                  _table(("where", "group", "positives", "negatives", "AUROC", "sensitivity", "specificity"), rows)]
        if auroc:
            parts.append(_img(plots.model_comparison(auroc, f"AUROC by {attribute}"), f"AUROC by {attribute} per hospital"))
        if not figures["recognised"]:
            parts.append(_p(f"No hospital released a known {attribute} group: check that subgroups.{attribute} names the right "
                            f"column or DICOM element and that its values are recognised (sex: F/M/O or female/male/other; age: years or a DICOM age string).", "fail"))
    if any(held.values()):
        parts.append(_p("Some groups stayed at their hospital, too small to release or held back so that a smaller one could "
                        f"not be worked out from the rest: {_setting({h: a for h, a in held.items() if a})}.", "note"))
    own = {h: m for h, m in summary.get("models", {}).items() if m != "global model"}
    if own:
        parts.append(_p(f"Each hospital evaluates the model it runs: {_setting(own)}.", "note"))
    if summary["failures"]:
        parts.append(_p(f"Hospitals whose evaluation by group failed: {_setting(summary['failures'])}.", "fail"))
    return _section("groups", "Performance by patient group", *parts)


def _screening(metrics: Sequence[dict], hospitals: Sequence[str]) -> _Section | None:
    """What went wrong round by round (updates lost or refused, hospitals restarted), and how far
    each hospital's changes lay from the others'."""
    events = [
        *((r["round"], h, why) for r in metrics for h, why in r.get("failures", {}).items()),
        *((r["round"], h, "its process had died; restarted, it reloaded its data and state and rejoined") for r in metrics for h in r.get("rejoined", [])),
    ]
    scored = [r for r in metrics if r.get("anomaly")]
    if not events and not scored:
        return None
    parts = [_p("Every update is checked before aggregation (sender, round, layout, finite values, counts); one that fails "
                "is left out of its round, which goes on while the quorum holds. Anomaly scores compare each change with the "
                "coordinate-wise median of the round's changes: a large distance or a low cosine over several rounds points at "
                "a faulty or hostile hospital.")]
    if events:
        parts += [Html("<h3>Events</h3>"), _table(("round", "hospital", "what happened"), sorted(events))]
    if scored:
        def mean(h: str, key: str) -> float | None:
            values = [r["anomaly"][h][key] for r in scored if h in r["anomaly"]]
            return sum(values) / len(values) if values else None

        rows = [(h, *(_figure(mean(h, k)) for k in ("distance", "cosine", "norm")),
                 *(_figure(scored[-1]["anomaly"].get(h, {}).get(k)) for k in ("distance", "cosine")),
                 sum(h in r.get("flagged", []) for r in metrics)) for h in hospitals]
        parts += [Html("<h3>Anomaly scores</h3>"),
                  _table(("hospital", "mean distance", "mean cosine", "mean norm", "last distance", "last cosine", "rounds flagged"), rows)]
    quarantined = metrics[-1].get("quarantined", [])
    if quarantined:
        first = {h: next(r["round"] for r in metrics if h in r.get("quarantined", [])) for h in quarantined}
        parts.append(_p("Quarantined (flagged too often, asked no more): " + ", ".join(f"{h} from round {n}" for h, n in first.items()) + ".", "fail"))
    return _section("screening", "Update screening", *parts)


# -- privacy ---------------------------------------------------------------------------------------


def _privacy(ledger: dict) -> _Section:
    """The privacy ledger in words and tables: protections, epsilon spent, what left each hospital."""
    transport = ledger["transport"]
    parts = [
        Html("<h3>How updates travelled</h3>"),
        _table(("parameter", "value"), [(k, _setting(v)) for k, v in transport.items()]),
    ]
    for level, dp in ledger["differential_privacy"].items():
        if not isinstance(dp, dict):
            continue
        title = level.replace("_", " ").capitalize()
        spent = dp["spent_epsilon"]
        budget = "no budget set" if dp["budget_epsilon"] is None else f"budget ε = {dp['budget_epsilon']:g}"
        parts += [
            Html(f"<h3>{_e(title)} differential privacy</h3>"),
            _p(f"{dp['mechanism']}. {budget}, δ = {dp['delta']:g}; spent so far, at most ε = {dp['spent_epsilon_max']:.3f}."
               + (f" Guarantee: {dp['guarantee']}." if "guarantee" in dp else "")),
            _table(("hospital", "ε spent"), [(h, f"{e:.3f}") for h, e in spent.items()]),
        ]
    if ledger["differential_privacy"]:
        parts.append(_p(f"Accountant: {ledger['differential_privacy']['accountant']}. {ledger['differential_privacy']['randomness']}.", "note"))
    else:
        parts.append(_p("No differential privacy was configured: no ε bounds what the model reveals about a patient.", "note"))
    rows = [
        (r["round"], h, e["update"], "—" if e["bytes_sent"] is None else f"{e['bytes_sent'] / 1024:.1f} KiB",
         _setting({k.removeprefix("epsilon_"): round(v, 3) for k, v in e.items() if k.startswith("epsilon_")}) or "—")
        for r in ledger["rounds"] for h, e in r["hospitals"].items()
    ]
    parts += [
        Html("<h3>What left each hospital, round by round</h3>"),
        _table(("round", "hospital", "update", "sent", "ε spent so far"), rows),
        Html("<h3>What leaves a hospital, and under which protection</h3>"),
        _table(("what leaves", "fields", "to", "protection"), [(r["what"], r["fields"], r["to"], r["protection"]) for r in ledger.get("released", [])]),
    ]
    return _section("privacy", "Privacy", *parts)


def write_consortium_report(run_dir: Path) -> Path:
    """Write `run_dir/report.html` from the run's files alone; returns its path."""
    run_dir = Path(run_dir)
    try:
        run = _read_run(run_dir)
    except FedwardError:
        # An older report must not stand in for one that can no longer be written.
        (run_dir / "report.html").unlink(missing_ok=True)
        raise
    hospitals = [h["name"] for h in run.identity["hospitals"]]
    record = run.metrics[-1]
    kind = _task(run.identity)
    scale = _read_json(run_dir / "target_scale.json") if (run_dir / "target_scale.json").is_file() else None
    sections = [
        _model_card(run.identity, run.finished, _sites(run, hospitals), run.config_hash),
        _performance(record, hospitals, kind),
        _calibration(record, hospitals, kind, scale),
        _training(run.metrics, hospitals, kind),
    ]
    sections = [s for s in sections if s is not None]
    personalization = run_dir / "personalization.json"
    if personalization.is_file() and len(_read_json(personalization)["models"]) > 1:
        sections.append(_gains(_read_json(personalization), hospitals, kind))
    if (run_dir / "subgroups.json").is_file():
        sections.append(_by_group(_read_json(run_dir / "subgroups.json"), hospitals))
    notices = _consortium_notices(run)
    if run.consortium is None:
        sections.append(_section("explanations", "Explanations", _p("Explanations were not computed for this run.", "fail")))
    else:
        explained = _from_consortium(run.consortium, run.summaries)
        sections += _explanation_sections(explained, _feature_types(run.identity))
        notices += _failed_checks(explained)
    screening = _screening(run.metrics, hospitals)
    if screening is not None:
        sections.append(screening)
    if (run_dir / "privacy.json").is_file():
        ledger = _read_json(run_dir / "privacy.json")
        sections.append(_privacy(ledger))
        if ledger.get("stopped"):
            notices.append(f"Training stopped by the privacy budget, {ledger['stopped']}.")
    name = run.identity["run"]["name"]
    page = _page(f"fedward report: {name}", f"consortium of {len(hospitals)} hospitals, round {run.finished}", notices, sections)
    path = run_dir / "report.html"
    atomic_write(path, page)
    return path


# -- a hospital's own report -----------------------------------------------------------------------


def _in_words(feature: str, value: str, shap_value: float) -> str:
    direction = "raised" if shap_value > 0 else "lowered" if shap_value < 0 else "did not change"
    return f"{feature} = {value} {direction} the predicted risk ({shap_value:+.2f} log-odds)"


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _patient_body(patient: PatientExplanation, top: int) -> Html:
    outcome = "positive (the outcome occurred)" if patient.label else "negative"
    parts = [_p(f"Predicted risk {patient.probability:.0%}; the model's baseline at this hospital (its mean output "
                f"over reference patients) is {_sigmoid(patient.base_value):.0%}. Recorded outcome: {outcome}.")]
    if patient.image is not None:
        total = float(np.sum(patient.attribution))
        parts += [
            _img(plots.image_overlay(patient.image, patient.attribution), f"attribution overlay for sample {patient.sample_id}"),
            _p(f"Regions in red raised the predicted risk, regions in blue lowered it; together the image's "
               f"attributions moved it by {total:+.2f} log-odds."),
        ]
        return Html("".join(parts))
    ranked = sorted(patient.contributions, key=lambda c: -abs(c[2]))
    shown, rest = ranked[:top], ranked[top:]
    words = "".join(f"<li>{_e(_in_words(*c))}</li>" for c in shown)
    parts += [
        _img(plots.waterfall(patient.base_value, ranked), f"waterfall for sample {patient.sample_id}"),
        Html(f"<h4>What drove this prediction</h4><ol class=\"words\">{words}</ol>"),
    ]
    if rest:
        parts.append(_p(f"The other {len(rest)} features together moved it by {sum(c[2] for c in rest):+.2f} log-odds."))
    parts.append(_p("The waterfall runs from the baseline E[f(X)] to this patient's model output f(x), both in "
                    "log-odds, one bar per feature (the smallest grouped at the bottom). SHAP values are in log-odds: +0.69 doubles the odds of the "
                    "outcome, -0.69 halves them.", "note"))
    return Html("".join(parts))


def _patient_title(patient: PatientExplanation) -> str:
    return f"Patient {patient.patient_id}, sample {patient.sample_id}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:64] or "_"


def write_patient_explanation(out_dir: Path, patient: PatientExplanation, *, top: int = TOP_FEATURES) -> Path:
    """One page explaining one patient's prediction; returns its path in `out_dir`."""
    section = _section("patient", _patient_title(patient), _patient_body(patient, top))
    page = _page("Explanation of a prediction", _patient_title(patient), [], [section])
    path = Path(out_dir) / f"patient-{_slug(patient.patient_id)}-{_slug(patient.sample_id)}.html"
    atomic_write(path, page)
    return path


def _against_consortium(hospital: str, summary: ExplanationSummary, consortium: ConsortiumExplanation) -> _Section:
    """Where this hospital's explanation departs from the consortium's."""
    intro = _p(f"This hospital's explanation beside the consortium's ({len(consortium.hospitals)} hospitals, round {consortium.round}).")
    if consortium.features:
        own = {f.name: f.mean_abs_shap for f in summary.features}
        parts = [
            _img(plots.importance_bars("consortium", {f: consortium.global_importance[f] for f in consortium.features}, {hospital: own}),
                 "importance against the consortium"),
        ]
        if hospital in consortium.drift:
            parts += [
                _p("Each feature's share of this hospital's total importance minus its share of the consortium's, in percentage points."),
                _img(plots.drift_heatmap({hospital: consortium.drift[hospital]}, list(consortium.features)), "importance drift at this hospital"),
            ]
    else:
        maps = {"consortium": consortium.image_map, hospital: summary.image_map}
        parts = [_img(plots.attribution_maps({k: v for k, v in maps.items() if v is not None}), "attribution maps against the consortium")]
    return _section("consortium", "Against the consortium", intro, *parts)


def write_hospital_report(
    out_dir: Path,
    *,
    hospital: str,
    run_dir_identity: dict,
    metrics: list[dict],
    summary: ExplanationSummary,
    patients: list[PatientExplanation],
    consortium: ConsortiumExplanation | None = None,
) -> Path:
    """The hospital's own report, `out_dir/report.html`: its figures plus its patients' explanations.

    `run_dir_identity` is the config identity (run.json's "identity"); `metrics` the run's metric
    records up to the last finished round; `consortium`, when given, the merged explanation this
    hospital is compared with.
    """
    identity = run_dir_identity
    known = [h["name"] for h in identity["hospitals"]]
    if hospital not in known:
        raise DataError(f"no hospital named {hospital!r} in this run; known: {known}")
    if summary.hospital != hospital:
        raise DataError(f"the explanation given for {hospital} is {summary.hospital}'s")
    if not metrics:
        raise CheckpointError(f"run {identity['run']['name']}: no finished round yet; nothing to report for {hospital}")
    record = metrics[-1]
    m = record["hospitals"].get(hospital)
    counts = _class_counts(m) if m else None
    sites = _table(("hospital", "held-out samples", "positives", "explained (SHAP)"),
                   [(hospital, m["n"] if m else "—", "—" if counts is None else counts[0], summary.n)])
    explained = _from_summary(summary)
    sections = [
        _model_card(identity, record["round"], sites),
        _performance(record, [hospital]),
        _calibration(record, [hospital]),
        _training(metrics, [hospital]),
        *_explanation_sections(explained, _feature_types(identity)),
    ]
    if consortium is not None:
        sections.append(_against_consortium(hospital, summary, consortium))
    if patients:
        articles = "".join(f"<article><h3>{_e(_patient_title(p))}</h3>{_patient_body(p, TOP_FEATURES)}</article>" for p in patients)
        sections.append(_section("patients", "Patients", _p("Individual patients' predictions, explained."), Html(articles)))
    notices = _failed_checks(explained)
    if summary.round != record["round"]:
        notices.append(f"Explanations are of round {summary.round}, performance figures of round {record['round']}.")
    page = _page(f"fedward report: {identity['run']['name']} at {hospital}", f"{hospital}'s own report, round {record['round']}; "
                 f"it holds patient-level explanations and stays at the hospital", notices, sections)
    path = Path(out_dir) / "report.html"
    atomic_write(path, page)
    return path
