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
from fedward.declarations import ONE_SCORE, Declaration
from fedward.metrics import BINS, auroc_from_histograms, score_histograms
from fedward.types import GroupHistograms

UNKNOWN = "unknown"
_SEX = {"F": "female", "FEMALE": "female", "W": "female", "M": "male", "MALE": "male", "O": "other", "OTHER": "other"}
# DICOM age strings (AS): three digits and a unit of days, weeks, months or years.
_AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")
_YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
METRICS = ("auroc", "sensitivity", "specificity")
DECLARATION = Declaration("subgroups", needs={ONE_SCORE: "computes AUROC, sensitivity and specificity of one probability per patient in each group"})


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
    """Which groups may leave the hospital, given each group's positive and negative patients.

    The held-back groups together are what subtraction from the hospital's overall histograms
    would reveal, so they must be either nothing or a group the same rule would release."""
    release = (positives >= minimum) & (negatives >= minimum)

    def exposed() -> bool:
        pos, neg = int(positives[~release].sum()), int(negatives[~release].sum())
        return pos + neg > 0 and (pos < minimum or neg < minimum)

    while exposed() and release.any():
        smallest = np.flatnonzero(release)[np.argmin(np.minimum(positives, negatives)[release])]
        release[smallest] = False
    return release


def at_hospital(
    hospital: str, scores: np.ndarray, labels: np.ndarray, patients: np.ndarray, groups: Mapping[str, np.ndarray], minimum: int
) -> GroupHistograms:
    """The releasable groups' score histograms of one hospital's held-out split. Groups are sized
    in patients, not images or rows: ten images of one patient are one patient."""
    released, held_back = {}, {}
    for attribute, group_of in groups.items():
        names = sorted(set(group_of.tolist()))
        members = [group_of == g for g in names]
        hists = [score_histograms(scores[m], labels[m]) for m in members]
        counts = [(len(set(patients[m & (labels == 1)])), len(set(patients[m & (labels == 0)]))) for m in members]
        release = releasable(np.array([p for p, _ in counts]), np.array([n for _, n in counts]), minimum)
        released[attribute] = {g: h for g, h, r in zip(names, hists, release) if r}
        held_back[attribute] = bool((~release).any())
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


def summarize(round: int, released: Mapping[str, GroupHistograms], failures: Mapping[str, str], models: Mapping[str, str], config: SubgroupConfig) -> dict:
    """Per attribute and group: figures per hospital and pooled, and the gaps between groups,
    largest first. Gaps leave out the unknown group, which is not a group of patients; pooled gaps
    use only the hospitals that released every known group of the attribute, so that a gap between
    groups is not a gap between hospitals."""
    attributes: dict[str, dict] = {}
    gaps: list[dict] = []
    for attribute in config.attributes:
        own = {h: r.groups.get(attribute, {}) for h, r in sorted(released.items())}
        hospitals = {h: {g: figures(p, n, config.threshold) for g, (p, n) in sorted(groups.items())} for h, groups in own.items()}
        pooled = _pooled(own, config.threshold)
        known = {g for groups in own.values() for g in groups} - {UNKNOWN}
        complete = {h: groups for h, groups in own.items() if known <= set(groups)}
        attributes[attribute] = {
            "pooled": pooled,
            "pooled_over": {g: sorted(h for h, groups in own.items() if g in groups) for g in pooled},
            "hospitals": hospitals,
            "recognised": bool(known),
        }
        if len(complete) > 1:
            scope = "pooled" if len(complete) == len(own) else f"pooled over {', '.join(complete)}"
            gaps += _gaps(scope, attribute, _pooled(complete, config.threshold))
        gaps += [g for h, groups in hospitals.items() for g in _gaps(h, attribute, groups)]
    return {
        "round": round,
        "threshold": config.threshold,
        "min_count": config.min_count,
        "models": dict(sorted(models.items())),
        "attributes": attributes,
        "held_back": {h: r.held_back for h, r in sorted(released.items())},
        "gaps": sorted(gaps, key=lambda g: -g["gap"]),
        "failures": dict(failures),
    }


def _pooled(own: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], threshold: float) -> dict[str, dict]:
    hists: dict[str, list] = {}
    for groups in own.values():
        for g, pair in groups.items():
            hists.setdefault(g, []).append(pair)
    return {g: figures(sum(p for p, _ in hs), sum(n for _, n in hs), threshold) for g, hs in sorted(hists.items())}
