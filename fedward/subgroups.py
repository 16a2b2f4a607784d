"""Performance per patient group (sex, age band), without a small group's patients leaving a hospital.

At the hospital, each group of the held-out split gets the per-class score bins the whole split
already releases (fedward/release.py), each bin holding at least `min_count` patients of each
outcome. A group is released only with that many positives and negatives; since the hospital's
overall counts are released too, the held-back groups together could be recovered by
subtraction, so more groups are held back until that remainder is empty or itself large enough
(the rule the explanation aggregates follow for their bins). At the driver the bins give each
group's AUROC, sensitivity and specificity per hospital and pooled over the hospitals that
released it, and the gaps between groups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import numpy as np

from fedward.config import SubgroupConfig
from fedward.declarations import ONE_SCORE, Declaration
from fedward import release
from fedward.metrics import auroc_from_histograms, score_histograms
from fedward import pooling
from fedward.pooling import EvaluationKey, PaddedStatistics, PaddedSum
from fedward.release import ScoreBins
from fedward.types import GroupBins

UNKNOWN = "unknown"
_SEX = {"F": "female", "FEMALE": "female", "W": "female", "M": "male", "MALE": "male", "O": "other", "OTHER": "other"}
# DICOM age strings (AS): three digits and a unit of days, weeks, months or years.
_AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")
_YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
METRICS = ("auroc", "sensitivity", "specificity")
HISTOGRAMS = ("positive_hist", "negative_hist")
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
    hospital: str, scores: np.ndarray, labels: np.ndarray, patients: np.ndarray, groups: Mapping[str, np.ndarray], config: SubgroupConfig,
    key: EvaluationKey | None = None,
) -> GroupBins:
    """The releasable groups of one hospital's held-out split: each group's score bins, cut at the
    threshold where both sides can hold `min_count` patients of each outcome, and its exact score
    histograms padded under `key` for the pooled figures. Groups are sized in patients, not
    images or rows: ten images of one patient are one patient."""
    released, aurocs, padded, held_back = {}, {}, {}, {}
    for attribute, group_of in groups.items():
        names = sorted(set(group_of.tolist()))
        members = [group_of == g for g in names]
        counts = [(len(set(patients[m & (labels == 1)])), len(set(patients[m & (labels == 0)]))) for m in members]
        release_ = releasable(np.array([p for p, _ in counts]), np.array([n for _, n in counts]), config.min_count)
        chosen = [(g, m) for g, m, r in zip(names, members, release_) if r]
        released[attribute] = {g: release.score_bins(scores[m], labels[m], patients[m], config.min_count, cut=config.threshold) for g, m in chosen}
        aurocs[attribute] = {g: release.own_auroc(labels[m], scores[m]) for g, m in chosen}
        padded[attribute] = {g: key.pad(dict(zip(HISTOGRAMS, score_histograms(scores[m], labels[m])))) for g, m in chosen} if key else {}
        held_back[attribute] = bool((~release_).any())
    return GroupBins(hospital=hospital, groups=released, aurocs=aurocs, padded=padded, held_back=held_back)


def figures(bins: ScoreBins, auroc: float, threshold: float) -> dict[str, float]:
    """A group's figures: its counts and rates from bins (a hospital's released ones, or every slice pooled), and its AUROC."""
    return {"positives": int(bins.positive.sum()), "negatives": int(bins.negative.sum()), "auroc": auroc,
            **{k: v for k, v in release.rates(bins, threshold).items() if k in METRICS}}


def pooled_figures(statistics: Mapping[str, np.ndarray], threshold: float) -> dict[str, float]:
    """A group's figures from its exact score histograms summed over hospitals."""
    pos, neg = statistics["positive_hist"], statistics["negative_hist"]
    return figures(ScoreBins.slices(pos, neg), auroc_from_histograms(pos, neg), threshold)


def _gaps(scope: str, attribute: str, groups: Mapping[str, dict]) -> list[dict]:
    known = {g: f for g, f in groups.items() if g != UNKNOWN}
    out = []
    for metric in METRICS:
        have = {g: f[metric] for g, f in known.items() if metric in f}  # a rate a group's bins cannot give exactly is not released
        if len(have) < 2:
            continue
        best, worst = max(have, key=have.get), min(have, key=have.get)
        out.append({"scope": scope, "attribute": attribute, "metric": metric, "gap": have[best] - have[worst], "best": best, "worst": worst})
    return out


def summarize(
    round: int, released: Mapping[str, GroupBins], failures: Mapping[str, str], models: Mapping[str, str], config: SubgroupConfig,
    open_at: Callable[[str, PaddedSum], dict],
) -> dict:
    """Per attribute and group: figures per hospital (from its bins) and pooled over the hospitals
    that released the group (opened at one of them by `open_at`, with two or more), and the gaps
    between groups, largest first. Gaps leave out the unknown group, which is not a group of
    patients; pooled gaps use only the hospitals that released every known group of the attribute,
    so that a gap between groups is not a gap between hospitals."""
    attributes: dict[str, dict] = {}
    gaps: list[dict] = []
    for attribute in config.attributes:
        own = {h: r.groups.get(attribute, {}) for h, r in sorted(released.items())}
        hospitals = {h: {g: figures(bins, released[h].aurocs[attribute][g], config.threshold) for g, bins in sorted(groups.items())}
                     for h, groups in own.items()}
        pooled = _pooled({h: r.padded.get(attribute, {}) for h, r in sorted(released.items())}, open_at)
        known = {g for groups in own.values() for g in groups} - {UNKNOWN}
        complete = {h: groups for h, groups in own.items() if known <= set(groups)}
        attributes[attribute] = {
            "pooled": pooled,
            "pooled_over": {g: sorted(h for h, groups in own.items() if g in groups) for g in pooled},
            "hospitals": hospitals,
            "recognised": bool(known),
        }
        if len(complete) == len(own) > 1:  # the sums just opened: not opened again
            gaps += _gaps("pooled", attribute, pooled)
        elif len(complete) > 1:
            gaps += _gaps(f"pooled over {', '.join(complete)}", attribute, _pooled({h: released[h].padded[attribute] for h in complete}, open_at))
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


def _pooled(padded: Mapping[str, Mapping[str, PaddedStatistics]], open_at: Callable[[str, PaddedSum], dict]) -> dict[str, dict]:
    by_group: dict[str, list[PaddedStatistics]] = {}
    for groups in padded.values():
        for g, p in groups.items():
            by_group.setdefault(g, []).append(p)
    figures = {g: pooling.pooled(ps, open_at) for g, ps in sorted(by_group.items())}
    return {g: {k: v for k, v in f.items() if k != "pooled_over"} for g, f in figures.items() if f}
