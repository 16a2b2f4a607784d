"""Performance per patient group (sex, age band), without a small group's patients leaving a hospital.

At the hospital, each group of the held-out split gets the per-class score histograms the whole
split already shares. A group is released only with at least `min_count` positives and
negatives; since the hospital's overall histograms are released too, the held-back groups
together could be recovered by subtraction, so more groups are held back until that remainder is
empty or itself large enough (the rule the explanation aggregates follow for their bins). At the
driver the histograms give each group's AUROC, sensitivity and specificity per hospital and
pooled over the hospitals that released it, and the gaps between groups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

from fedward.config import SubgroupConfig
from fedward.metrics import BINS, auroc_from_histograms, score_histograms
from fedward.types import GroupHistograms

UNKNOWN = "unknown"
_SEX = {"F": "female", "FEMALE": "female", "W": "female", "M": "male", "MALE": "male", "O": "other", "OTHER": "other"}
# DICOM age strings (AS): three digits and a unit of days, weeks, months or years.
_AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")
_YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
METRICS = ("auroc", "sensitivity", "specificity")


def _years(text: str) -> float:
    text = text.strip().upper()
    match = _AGE_STRING.match(text)
    if match:
        return int(match[1]) * _YEARS_PER_UNIT[match[2]]
    try:
        years = float(text)
    except ValueError:
        return math.nan
    return years if 0 <= years < 150 else math.nan


def age_band(years: float, edges: tuple[float, ...]) -> str:
    if math.isnan(years):
        return UNKNOWN
    i = int(np.searchsorted(edges, years, side="right"))
    if i == 0:
        return f"<{edges[0]:g}"
    if i == len(edges):
        return f"≥{edges[-1]:g}"
    return f"{edges[i - 1]:g}–<{edges[i]:g}"


def group_labels(attributes: Mapping[str, np.ndarray], config: SubgroupConfig) -> dict[str, np.ndarray]:
    """Each attribute's group per sample, e.g. {"sex": ["female", ...], "age": ["40–<65", ...]}."""
    out = {}
    for name, values in attributes.items():
        if name == "sex":
            out[name] = np.array([_SEX.get(v.strip().upper(), UNKNOWN) for v in values], dtype=object)
        else:
            out[name] = np.array([age_band(_years(v), config.age_bands) for v in values], dtype=object)
    return out


def releasable(positives: np.ndarray, negatives: np.ndarray, minimum: int) -> np.ndarray:
    """Which groups may leave the hospital; the others stay, together too large to single anyone out."""
    release = (positives >= minimum) & (negatives >= minimum)

    def exposed() -> bool:  # a held-back class count that subtraction would reveal as a small histogram
        return any(0 < int(c[~release].sum()) < minimum for c in (positives, negatives))

    while exposed() and release.any():
        smallest = np.flatnonzero(release)[np.argmin(np.minimum(positives, negatives)[release])]
        release[smallest] = False
    return release


def at_hospital(hospital: str, scores: np.ndarray, labels: np.ndarray, groups: Mapping[str, np.ndarray], minimum: int) -> GroupHistograms:
    """The releasable groups' score histograms of one hospital's held-out split."""
    released, held_back = {}, {}
    for attribute, group_of in groups.items():
        names = sorted(set(group_of.tolist()))
        hists = [score_histograms(scores[group_of == g], labels[group_of == g]) for g in names]
        release = releasable(np.array([p.sum() for p, _ in hists]), np.array([n.sum() for _, n in hists]), minimum)
        released[attribute] = {g: h for g, h, r in zip(names, hists, release) if r}
        held_back[attribute] = int((~release).sum())
    return GroupHistograms(hospital=hospital, groups=released, held_back=held_back)


def figures(positive_hist: np.ndarray, negative_hist: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC, and sensitivity and specificity at `threshold` (a bin edge, so exact)."""
    edge = round(threshold * BINS)
    pos, neg = int(positive_hist.sum()), int(negative_hist.sum())
    return {
        "positives": pos,
        "negatives": neg,
        "auroc": auroc_from_histograms(positive_hist, negative_hist),
        "sensitivity": float(positive_hist[edge:].sum() / pos),
        "specificity": float(negative_hist[:edge].sum() / neg),
    }


def _gaps(scope: str, attribute: str, groups: Mapping[str, dict]) -> list[dict]:
    known = {g: f for g, f in groups.items() if g != UNKNOWN}
    if len(known) < 2:
        return []
    out = []
    for metric in METRICS:
        best = max(known, key=lambda g: known[g][metric])
        worst = min(known, key=lambda g: known[g][metric])
        out.append({"scope": scope, "attribute": attribute, "metric": metric, "gap": known[best][metric] - known[worst][metric],
                    "best": best, "worst": worst})
    return out


def summarize(round: int, released: Mapping[str, GroupHistograms], failures: Mapping[str, str], config: SubgroupConfig) -> dict:
    """Per attribute and group: figures per hospital and pooled, and the gaps between groups,
    largest first. Gaps leave out the unknown group, which is not a group of patients."""
    attributes: dict[str, dict] = {}
    gaps: list[dict] = []
    for attribute in config.attributes:
        hospitals = {
            h: {g: figures(p, n, config.threshold) for g, (p, n) in sorted(r.groups.get(attribute, {}).items())}
            for h, r in sorted(released.items())
        }
        pooled_hists: dict[str, list] = {}
        for r in released.values():
            for g, (p, n) in r.groups.get(attribute, {}).items():
                pooled_hists.setdefault(g, []).append((p, n))
        pooled = {g: figures(sum(p for p, _ in hs), sum(n for _, n in hs), config.threshold) for g, hs in sorted(pooled_hists.items())}
        attributes[attribute] = {"pooled": pooled, "hospitals": hospitals}
        gaps += _gaps("pooled", attribute, pooled) + [g for h, groups in hospitals.items() for g in _gaps(h, attribute, groups)]
    return {
        "round": round,
        "threshold": config.threshold,
        "min_count": config.min_count,
        "attributes": attributes,
        "held_back": {h: r.held_back for h, r in sorted(released.items())},
        "gaps": sorted(gaps, key=lambda g: -g["gap"]),
        "failures": dict(failures),
    }
