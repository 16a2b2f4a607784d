"""Synthetic demo hospitals with a known answer: DICOM images with a label table, and an EHR export.

`write_demo_data(out)` lays out one folder per hospital the way sites hand data over::

    out/hospital_a/images/<nested folders>/<arbitrary names>.dcm
    out/hospital_a/labels.csv    SOPInstanceUID, PatientID, finding, grade
    out/hospital_a/ehr.csv       one row per patient; outcome column discharge_status
    out/hospital_a/stay.csv      the same patients and columns; outcome column length_of_stay (days)
    out/truth.json               what a perfect model could achieve, per hospital and pooled

Both outcomes are *drawn*, never thresholded: ``label ~ Bernoulli(sigmoid(logit))``. The signal is
easy to see (a bright round nodule whose size and contrast grow with a latent severity; a handful of
EHR columns in a logistic model) and the label noise is what makes the task hard. The best any model
can do is the AUROC of the true probability against the drawn labels, which `truth.json` records as
``best_auroc``; the design keeps it near 0.89 (images) and 0.88 (EHR). A draw that would let a perfect
model beat MAX_BEST_AUROC (0.92) at a site or pooled, which happens for a few seeds, is drawn again.

Sites differ the way real ones do: scanner (CT or CR, matrix size, manufacturer, bits stored, rescale
slope/intercept, MONOCHROME1 with a VOI window, noise and texture), population (age, an assay reading
high), missing lab values, and prevalence. Images and EHR rows are two separate cohorts. Up to here
every site's outcome follows the same model, so one well-fitted global model ranks every site's
patients best. `renal_units` names sites where it does not (concept shift): a renal unit's patients
are on dialysis, their creatinine chronically high, and there the lower it is the worse, so a
personalized model should beat the global one.

Two more outcomes come with every demo, for the other tasks, each from a stream of its own so the
files above stay as they were: a graded finding (`grade`: none, mild or severe; multiclass) drawn
from an ordinal model of the same latent severity, and a length of stay (`length_of_stay`, days;
regression) from the same EHR columns plus noise. `truth.json` records the best macro AUROC (the
true class probabilities) and the best R² (the true expected stay), kept at most
MAX_BEST_AUROC and MAX_BEST_R2.

Everything derives from `seed`: numpy generators are seeded by (seed, hospital, stream) and DICOM UIDs
are hashed from the same values, dates are fixed, so one seed gives byte-identical files (for given
numpy and pydicom versions).
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter
from scipy.optimize import brentq
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from fedward.errors import ConfigError

POSITIVE_FINDINGS = ("nodule", "mass")  # labels.csv `finding` values that mean label 1
NEGATIVE_FINDINGS = ("benign", "normal")  # and those that mean 0
POSITIVE_STATUSES = ("icu", "died")  # ehr.csv `discharge_status` values that mean label 1
NEGATIVE_STATUSES = ("home", "transferred")
GRADES = ("none", "mild", "severe")  # labels.csv `grade`, in order
DRIVING_FEATURES = ("age", "creatinine", "systolic_bp", "heart_rate", "diabetes", "smoker")
NOISE_FEATURES = ("height_cm", "sodium", "admission_weekday")
EHR_COLUMNS = (
    "patient_id", "age", "sex", "admission_weekday", "systolic_bp", "heart_rate", "height_cm", "bmi",
    "creatinine", "glucose", "sodium", "diabetes", "hypertension", "smoker", "discharge_status",
)
MIN_COUNT = 20  # fewer samples than this would not survive a train/holdout split
MAX_HOSPITALS = len(string.ascii_lowercase)
MAX_BEST_AUROC = 0.92  # a task a perfect model solves better than this is too easy to show anything
MAX_BEST_R2 = 0.8
MAX_REDRAWS = 50

# A small community hospital beside two larger ones, as in real consortia: the small site is the
# one that cannot learn alone and gains most from federating.
_DEFAULT_IMAGES = (360, 120, 420)
_DEFAULT_ROWS = (900, 700, 1200)
_IMAGE_PREVALENCE = (0.35, 0.25, 0.45, 0.30, 0.40)  # cycled over hospitals
_EHR_PREVALENCE = (0.30, 0.40, 0.22, 0.35, 0.26)
# p = sigmoid(k * severity + site offset) with severity ~ N(0, 1): k = 2.4 puts the best AUROC near 0.89.
_SEVERITY_SLOPE = 2.4
_NODULE_MAX_RADIUS = 0.13  # in half-widths of the field of view
_PATIENT_SHARE = 0.5  # share of an image's severity variance common to the patient's other images
_EHR_SCALE = 1.65  # scales the EHR logit so the best AUROC sits near 0.88
# Dialysis patients: creatinine about 2.7 times the usual, and a *low* value is the danger sign there
# (it reflects lost muscle mass; the "creatinine paradox" of dialysis cohorts).
_RENAL_CREATININE_LOG = 1.0
_RENAL_CREATININE_RISK = -1.2
_STUDY_EPOCH = dt.date(2023, 1, 2)
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_SMOKER_RISK = {"never": 0.0, "former": 0.35, "current": 0.9}
_STREAMS = {"images": 0, "ehr": 1, "ids": 2, "grades": 3, "stay": 4}
# Graded finding: P(grade >= mild) = sigmoid(k * severity + c_mild), P(grade = severe) = sigmoid(k * severity + c_severe).
_GRADE_SLOPE = 2.4
_GRADE_CUTS = (0.4, -1.6)
# Length of stay: days = base + scale * (the EHR signal, standardized) + noise, at least half a day.
_STAY_BASE, _STAY_SCALE, _STAY_NOISE = 5.0, 2.0, 1.5
_STAY_CENTER, _STAY_SPREAD = 1.3, 2.3  # the EHR logit's mean and SD over the default sites


@dataclass(frozen=True)
class _Scanner:
    """How one site's machine turns the phantom's density (0 air .. ~1 bone) into stored pixels."""

    modality: str
    sop_class: str
    size: int
    manufacturer: str
    model: str
    pixel_spacing: float  # mm; the field of view is about the same at every site
    dtype: type  # uint16 or int16, which sets PixelRepresentation
    bits_stored: int
    slope: float
    intercept: float
    value_offset: float  # modality value (HU for CT) = value_offset + value_scale * density
    value_scale: float
    photometric: str
    window: tuple[float, float] | None  # VOI (center, width)
    noise: float  # white noise, density units
    texture: float  # smooth "parenchyma" texture, density units
    layout: str  # file path under images/, formatted with patient, date, series, instance, token


_SCANNERS = (
    _Scanner(
        modality="CT", sop_class=CTImageStorage, size=128, manufacturer="SIEMENS", model="SOMATOM Definition AS",
        pixel_spacing=2.8, dtype=np.uint16, bits_stored=12, slope=1.0, intercept=-1024.0,
        value_offset=-1000.0, value_scale=1900.0, photometric="MONOCHROME2", window=None,
        noise=0.012, texture=0.030, layout="{patient}/{date}/SE{series}/IM{instance:04d}.dcm",
    ),
    _Scanner(
        modality="CT", sop_class=CTImageStorage, size=96, manufacturer="GE MEDICAL SYSTEMS", model="LightSpeed VCT",
        pixel_spacing=3.9, dtype=np.int16, bits_stored=16, slope=0.5, intercept=-1000.0,
        value_offset=-1000.0, value_scale=1900.0, photometric="MONOCHROME2", window=None,
        noise=0.025, texture=0.040, layout="export/{token[0]}/{token[1]}/{token}.dcm",
    ),
    # MONOCHROME1: dense tissue is stored low and displayed white, as on film.
    _Scanner(
        modality="CR", sop_class=ComputedRadiographyImageStorage, size=64, manufacturer="FUJIFILM Corporation",
        model="FCR PROFECT CS", pixel_spacing=6.7, dtype=np.uint16, bits_stored=12, slope=1.0, intercept=0.0,
        value_offset=3900.0, value_scale=-3400.0, photometric="MONOCHROME1", window=(2150.0, 3700.0),
        noise=0.020, texture=0.050, layout="{date}/{patient}/CR_{instance}_{token}.dcm",
    ),
)


@dataclass(frozen=True)
class _Population:
    """Who one site's EHR export describes and how its lab measures them."""

    age_mean: float
    creatinine_bias: float  # mg/dL the site's assay reads above the true value
    missing: tuple[tuple[str, float], ...]  # (column, share of empty cells)


_POPULATIONS = (
    _Population(61.0, 0.0, (("creatinine", 0.02), ("glucose", 0.04), ("bmi", 0.01))),
    _Population(70.0, 0.0, (("creatinine", 0.05), ("glucose", 0.08), ("bmi", 0.03))),  # an older population
    _Population(57.0, 0.25, (("creatinine", 0.03), ("glucose", 0.02), ("bmi", 0.06), ("heart_rate", 0.01))),
)


def write_demo_data(
    out: Path,
    hospitals: int = 3,
    seed: int = 0,
    images_per_hospital: Sequence[int] | None = None,
    rows_per_hospital: Sequence[int] | None = None,
    renal_units: Sequence[str] = (),
) -> dict:
    """Write `hospitals` synthetic hospitals under `out` and return the ground truth also saved as truth.json.

    Counts default to 360, 120 and 420 images and 900, 700 and 1,200 EHR rows, repeated for more hospitals.
    The hospitals named in `renal_units` export EHR rows of dialysis patients. `out` must be empty or absent.
    """
    out = Path(out)
    _check_whole("hospitals", hospitals, 1, MAX_HOSPITALS)
    _check_whole("seed", seed, 0, None)
    image_counts = _counts("images_per_hospital", images_per_hospital, _DEFAULT_IMAGES, hospitals)
    row_counts = _counts("rows_per_hospital", rows_per_hospital, _DEFAULT_ROWS, hospitals)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out: {out} is a file or already holds files; give an empty or new folder")

    names = [f"hospital_{letter}" for letter in string.ascii_lowercase[:hospitals]]
    if isinstance(renal_units, str):
        raise ConfigError(f"renal_units: expected a list of hospital names, got the string {renal_units!r}")
    unknown = sorted(set(renal_units) - set(names))
    if unknown:
        raise ConfigError(f"renal_units: {', '.join(map(str, unknown))} not among the hospitals {', '.join(names)}")
    image_cohorts = [_image_cohort(_rng(seed, site, "images"), site, n) for site, n in enumerate(image_counts)]
    ehr_cohorts = [
        _ehr_cohort(_rng(seed, site, "ehr"), site, n, renal=name in renal_units)
        for site, (name, n) in enumerate(zip(names, row_counts))
    ]
    image_labels, ehr_labels = _draw_labels(image_cohorts), _draw_labels(ehr_cohorts)
    grades = [_draw_grades(_rng(seed, site, "grades"), c) for site, c in enumerate(image_cohorts)]
    stays = [_draw_stays(_rng(seed, site, "stay"), c) for site, c in enumerate(ehr_cohorts)]
    for site, name in enumerate(names):
        ids = _patient_ids(_rng(seed, site, "ids"), site, image_counts[site] + row_counts[site])
        _write_images(out / name, image_cohorts[site], image_labels[site], seed, site, ids, grades[site][0])
        _write_ehr(out / name, ehr_cohorts[site], ehr_labels[site], site, ids[image_counts[site]:], stays[site][0])

    truth = {
        "seed": seed,
        "hospitals": names,
        "images": {
            **_summary(names, image_cohorts, image_labels),
            "label": {"column": "finding", "positive_values": list(POSITIVE_FINDINGS), "negative_values": list(NEGATIVE_FINDINGS)},
            "grade": {"column": "grade", "classes": list(GRADES), "best_macro_auroc": _best_macro_auroc(names, grades),
                      "shares": {g: round(float(np.mean(np.concatenate([y for y, _ in grades]) == i)), 4) for i, g in enumerate(GRADES)}},
        },
        "ehr": {
            **_summary(names, ehr_cohorts, ehr_labels),
            "label": {"column": "discharge_status", "positive_values": list(POSITIVE_STATUSES), "negative_values": list(NEGATIVE_STATUSES)},
            "driving_features": list(DRIVING_FEATURES),
            "noise_features": list(NOISE_FEATURES),
            "renal_units": sorted(renal_units),
            "stay": {"column": "length_of_stay", "file": "stay.csv", "best_r2": _best_r2(names, stays)},
        },
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def _check_whole(name: str, value, low: int, high: int | None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        expected = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name}: expected a whole number {expected}, got {value!r}")


def _counts(name: str, given: Sequence[int] | None, default: tuple[int, ...], hospitals: int) -> tuple[int, ...]:
    if given is None:
        return tuple(default[i % len(default)] for i in range(hospitals))
    counts = tuple(given)
    if len(counts) != hospitals:
        raise ConfigError(f"{name}: expected {hospitals} counts, one per hospital, got {len(counts)}")
    for count in counts:
        _check_whole(name, count, MIN_COUNT, None)
    return tuple(int(c) for c in counts)


def _rng(seed: int, site: int, stream: str) -> np.random.Generator:
    # One generator per (hospital, stream): adding a hospital or changing a count elsewhere leaves
    # the other hospitals' files unchanged, unless the labels must be drawn again (_draw_labels).
    return np.random.default_rng([seed, site, _STREAMS[stream]])


def _patient_ids(rng: np.random.Generator, site: int, n: int) -> list[str]:
    numbers = rng.choice(1_000_000, size=n, replace=False)
    return [f"{string.ascii_uppercase[site]}-{k:06d}" for k in numbers]


def _offset_for(logits: np.ndarray, prevalence: float) -> float:
    """The site offset b at which mean(sigmoid(logits + b)) equals `prevalence`."""
    return brentq(lambda b: expit(logits + b).mean() - prevalence, -30.0, 30.0)


@dataclass(frozen=True)
class _Cohort:
    """One site's samples before their outcome is drawn."""

    rng: np.random.Generator  # the site's stream; writing its files continues it
    p: np.ndarray  # the true probability of the outcome, per sample
    latent: dict[str, np.ndarray]  # what the files are made from
    latent_logit: np.ndarray | None = None  # EHR: the outcome's logit before the site's offset, which the stay also follows


def _draw_labels(cohorts: Sequence[_Cohort]) -> list[np.ndarray]:
    """label ~ Bernoulli(p) at every site, redrawn in the rare case the draw lets a perfect model
    beat MAX_BEST_AUROC at a site or pooled: then the task would be too easy for that seed. After
    MAX_REDRAWS only the pooled ceiling holds: among many tiny sites some site's AUROC is always
    high by chance, and redrawing would never end."""
    for attempt in itertools.count():
        labels = [(c.rng.random(c.p.size) < c.p).astype(np.int64) for c in cohorts]
        best = _summary(range(len(cohorts)), cohorts, labels)["best_auroc"]
        held = best.values() if attempt < MAX_REDRAWS else [best["pooled"]]
        if all(b is None or b <= MAX_BEST_AUROC for b in held):
            return labels


def _best_auroc(labels: np.ndarray, p: np.ndarray) -> float | None:
    if labels.min() == labels.max():  # a tiny site can draw a single class; AUROC is undefined then
        return None
    return round(float(roc_auc_score(labels, p)), 4)


def _summary(names: Sequence, cohorts: Sequence[_Cohort], labels: Sequence[np.ndarray]) -> dict:
    groups = {name: (y, c.p) for name, c, y in zip(names, cohorts, labels)}
    groups["pooled"] = (np.concatenate(labels), np.concatenate([c.p for c in cohorts]))
    return {
        "best_auroc": {name: _best_auroc(y, p) for name, (y, p) in groups.items()},
        "prevalence": {name: round(float(y.mean()), 4) for name, (y, _) in groups.items()},
        "n": {name: int(y.size) for name, (y, _) in groups.items()},
    }


def _draw_grades(rng: np.random.Generator, cohort: _Cohort) -> tuple[np.ndarray, np.ndarray]:
    """Each image's grade (0 none, 1 mild, 2 severe) and the true probability of each grade."""
    at_least = expit(_GRADE_SLOPE * cohort.latent["severity"][:, None] + np.array(_GRADE_CUTS))
    p = np.stack([1 - at_least[:, 0], at_least[:, 0] - at_least[:, 1], at_least[:, 1]], axis=1)
    return (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(axis=1), p


def _best_macro_auroc(names: Sequence[str], grades: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float | None]:
    """One-vs-rest AUROC of the true grade probabilities, averaged over the grades a group has both sides of."""
    groups = {name: g for name, g in zip(names, grades)}
    groups["pooled"] = (np.concatenate([y for y, _ in grades]), np.concatenate([p for _, p in grades]))
    out = {}
    for name, (y, p) in groups.items():
        each = [roc_auc_score(y == k, p[:, k]) for k in range(len(GRADES)) if 0 < (y == k).sum() < len(y)]
        out[name] = round(float(np.mean(each)), 4) if each else None
    return out


def _draw_stays(rng: np.random.Generator, cohort: _Cohort) -> tuple[np.ndarray, np.ndarray]:
    """Each patient's length of stay in days, and its true expectation: the same EHR signal that
    drives the binary outcome, on a fixed scale, plus noise."""
    signal = cohort.latent_logit
    expected = _STAY_BASE + _STAY_SCALE * (signal - _STAY_CENTER) / _STAY_SPREAD
    return np.maximum(expected + rng.normal(0, _STAY_NOISE, len(signal)), 0.5).round(1), expected


def _best_r2(names: Sequence[str], stays: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    groups = {name: s for name, s in zip(names, stays)}
    groups["pooled"] = (np.concatenate([y for y, _ in stays]), np.concatenate([e for _, e in stays]))
    return {name: round(float(1 - ((y - e) ** 2).sum() / ((y - y.mean()) ** 2).sum()), 4) for name, (y, e) in groups.items()}


# --- images -------------------------------------------------------------------------------------


def _image_cohort(rng: np.random.Generator, site: int, n: int) -> _Cohort:
    """The site's patients, their images' latent severity and true risk of a nodule or mass."""
    per_patient = _images_per_patient(rng, n)
    shared = np.repeat(rng.standard_normal(per_patient.size), per_patient)
    severity = np.sqrt(_PATIENT_SHARE) * shared + np.sqrt(1 - _PATIENT_SHARE) * rng.standard_normal(n)
    logits = _SEVERITY_SLOPE * severity
    p = expit(logits + _offset_for(logits, _IMAGE_PREVALENCE[site % len(_IMAGE_PREVALENCE)]))
    return _Cohort(rng, p, {"per_patient": per_patient, "severity": severity})


def _write_images(folder: Path, cohort: _Cohort, labels: np.ndarray, seed: int, site: int, ids: list[str], grades: np.ndarray) -> None:
    """Write the site's DICOM files, one visit per patient, and labels.csv."""
    rng, severity = cohort.rng, cohort.latent["severity"]
    scanner = _SCANNERS[site % len(_SCANNERS)]
    rows = []
    first = 0  # index of the patient's first image
    for patient, count in enumerate(cohort.latent["per_patient"]):
        visit = _Visit.draw(rng, seed, site, patient, ids[patient])
        for instance in range(1, count + 1):
            i = first + instance - 1
            sop_uid = _uid(seed, site, "image", i)
            path = folder / "images" / scanner.layout.format(
                patient=visit.patient_id, date=visit.date, series=visit.series, instance=instance,
                token=f"{rng.integers(16**10):010x}",
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = _stored(scanner, _phantom(rng, scanner, visit.anatomy, severity[i]))
            _dataset(scanner, pixels, visit, sop_uid, instance).save_as(path, enforce_file_format=True)
            rows.append((sop_uid, visit.patient_id, _finding(rng, labels[i], severity[i]), GRADES[grades[i]]))
        first += count
    _write_csv(folder / "labels.csv", ("SOPInstanceUID", "PatientID", "finding", "grade"), rows)


def _images_per_patient(rng: np.random.Generator, n: int) -> np.ndarray:
    """1 to 3 images per patient, summing to exactly n."""
    counts = rng.integers(1, 4, size=n)  # more draws than patients can ever need
    cumulative = np.cumsum(counts)
    patients = int(np.searchsorted(cumulative, n)) + 1
    counts = counts[:patients]
    counts[-1] -= cumulative[patients - 1] - n
    return counts


def _finding(rng: np.random.Generator, label: int, severity: float) -> str:
    # The label decides the binary class; the subtype is texture for the label table only.
    if label:
        return POSITIVE_FINDINGS[int(rng.random() < 0.4)]
    return NEGATIVE_FINDINGS[0] if severity > 0 else NEGATIVE_FINDINGS[1]


@dataclass(frozen=True)
class _Visit:
    """What a patient's images share: identity, study, date and body shape."""

    patient_id: str
    sex: str
    age: int
    date: str
    time: str
    series: int
    study_uid: str
    series_uid: str
    frame_uid: str
    anatomy: tuple[float, float, float]  # body half-width, body half-height, lung scale

    @classmethod
    def draw(cls, rng: np.random.Generator, seed: int, site: int, patient: int, patient_id: str) -> _Visit:
        date = _STUDY_EPOCH + dt.timedelta(days=int(rng.integers(365)))
        seconds = int(rng.integers(7 * 3600, 19 * 3600))
        return cls(
            patient_id=patient_id,
            sex="FM"[int(rng.integers(2))],
            age=int(rng.integers(35, 90)),
            date=date.strftime("%Y%m%d"),
            time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
            series=int(rng.integers(1, 10)),
            study_uid=_uid(seed, site, "study", patient),
            series_uid=_uid(seed, site, "series", patient),
            frame_uid=_uid(seed, site, "frame", patient),
            anatomy=(rng.uniform(0.82, 0.94), rng.uniform(0.62, 0.74), rng.uniform(0.92, 1.05)),
        )


def _uid(seed: int, site: int, kind: str, index: int) -> str:
    return generate_uid(entropy_srcs=["fedward-demo", str(seed), str(site), kind, str(index)])


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """A filled ellipse with a soft edge, so shapes survive any later resize without aliasing."""
    radius = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return expit((1.0 - radius) / 0.04)


def _phantom(rng: np.random.Generator, scanner: _Scanner, anatomy, severity: float) -> np.ndarray:
    """A chest-like slice in density units with a nodule whose size and contrast grow with severity."""
    size = scanner.size
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    body_rx, body_ry, lung = anatomy
    lung_x, lung_y, lung_rx, lung_ry = 0.4 * lung, -0.05, 0.3 * lung, 0.45 * lung
    body = _ellipse(x, y, 0.0, 0.05, body_rx, body_ry)
    lungs = _ellipse(x, y, -lung_x, lung_y, lung_rx, lung_ry) + _ellipse(x, y, lung_x, lung_y, lung_rx, lung_ry)
    spine = _ellipse(x, y, 0.0, 0.55 * body_ry / 0.68, 0.1, 0.1)
    texture = gaussian_filter(rng.standard_normal((size, size)), sigma=size / 24)
    density = 0.55 * body - 0.47 * lungs + 0.45 * spine + scanner.texture * body * texture / texture.std()

    # The nodule lies wholly inside either lung, so its brightness against the lung tracks severity alone.
    grade = expit(severity)
    radius = _NODULE_MAX_RADIUS * (0.45 + 0.55 * grade)
    margin = _NODULE_MAX_RADIUS + 0.03
    rho, theta = np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
    cx = rng.choice((-1.0, 1.0)) * lung_x + rho * (lung_rx - margin) * np.cos(theta)
    cy = lung_y + rho * (lung_ry - margin) * np.sin(theta)
    density += (0.08 + 0.70 * grade) * _ellipse(x, y, cx, cy, radius, radius)
    return density + rng.normal(0.0, scanner.noise, density.shape)


def _stored(scanner: _Scanner, density: np.ndarray) -> np.ndarray:
    """Density -> modality value (HU for CT) -> stored integers under the site's rescale and bit depth."""
    value = scanner.value_offset + scanner.value_scale * density
    stored = np.rint((value - scanner.intercept) / scanner.slope)
    signed = np.dtype(scanner.dtype).kind == "i"
    magnitude = 2 ** (scanner.bits_stored - signed)
    return np.clip(stored, -magnitude if signed else 0, magnitude - 1).astype(scanner.dtype)


def _dataset(scanner: _Scanner, pixels: np.ndarray, visit: _Visit, sop_uid: str, instance: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = scanner.sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = scanner.sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = visit.study_uid
    ds.SeriesInstanceUID = visit.series_uid
    ds.FrameOfReferenceUID = visit.frame_uid
    ds.PatientID = visit.patient_id
    ds.PatientName = f"DEMO^{visit.patient_id}"
    ds.PatientSex = visit.sex
    ds.PatientAge = f"{visit.age:03d}Y"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = visit.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = visit.time
    ds.AccessionNumber = visit.patient_id.replace("-", "") + visit.date[2:]
    ds.Modality = scanner.modality
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model
    ds.InstitutionName = "Demo Hospital (synthetic)"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = visit.series
    ds.InstanceNumber = instance
    ds.PixelSpacing = [scanner.pixel_spacing, scanner.pixel_spacing]
    if scanner.modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.SliceThickness = 5
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-180, -180, -150 - 5 * instance]
        ds.RescaleType = "HU"
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ViewPosition = "PA"
        ds.ImagerPixelSpacing = ds.PixelSpacing
    ds.RescaleSlope = scanner.slope
    ds.RescaleIntercept = scanner.intercept
    if scanner.window is not None:
        ds.WindowCenter, ds.WindowWidth = scanner.window
    ds.set_pixel_data(pixels, scanner.photometric, scanner.bits_stored, generate_instance_uid=False)
    return ds


# --- EHR ----------------------------------------------------------------------------------------


def _ehr_cohort(rng: np.random.Generator, site: int, n: int, renal: bool) -> _Cohort:
    """The site's patients as its EHR records them, and their true risk of ICU or death."""
    population = _POPULATIONS[site % len(_POPULATIONS)]
    age = np.clip(rng.normal(population.age_mean, 14, n), 18, 97).round()
    sex = rng.choice(("F", "M"), n)
    systolic_bp = np.clip(rng.normal(132 + 0.25 * (age - 60), 19, n), 70, 230).round()
    heart_rate = np.clip(rng.normal(80, 13, n), 40, 170).round()
    bmi = np.clip(rng.normal(27.5, 5, n), 15, 55)
    diabetes = rng.random(n) < expit(-1.9 + 0.035 * (age - 60) + 0.12 * (bmi - 27.5))
    dialysis = _RENAL_CREATININE_LOG if renal else 0.0
    creatinine = np.exp(rng.normal(np.log(0.95) + dialysis + 0.006 * (age - 60) + 0.15 * diabetes, 0.3))
    glucose = np.exp(rng.normal(np.log(98) + 0.4 * diabetes, 0.15))
    hypertension = rng.random(n) < expit((systolic_bp - 140) / 8)
    smoker = rng.choice(tuple(_SMOKER_RISK), n, p=(0.5, 0.3, 0.2))
    # Pure noise: drawn independently of everything the outcome depends on (sex included).
    height_cm = rng.normal(np.where(sex == "F", 163, 177), 7)
    sodium = rng.normal(139, 3, n).round()
    weekday = rng.choice(_WEEKDAYS, n)

    # The outcome depends on the *true* creatinine; the site's assay bias only shifts what is recorded.
    logits = _EHR_SCALE * (
        0.045 * (age - 65)
        + (_RENAL_CREATININE_RISK if renal else 1.6) * np.log(creatinine)
        + 0.0012 * (systolic_bp - 125) ** 2  # both shock and crisis are dangerous
        + 0.05 * np.maximum(heart_rate - 90, 0)  # tachycardia only
        + 0.8 * diabetes
        + np.vectorize(_SMOKER_RISK.get)(smoker)
    )
    p = expit(logits + _offset_for(logits, _EHR_PREVALENCE[site % len(_EHR_PREVALENCE)]))
    columns = {
        "age": age.astype(int),
        "sex": sex,
        "admission_weekday": weekday,
        "systolic_bp": systolic_bp.astype(int),
        "heart_rate": heart_rate.astype(int),
        "height_cm": [f"{v:.1f}" for v in height_cm],
        "bmi": [f"{v:.1f}" for v in bmi],
        "creatinine": [f"{v:.2f}" for v in creatinine + population.creatinine_bias],
        "glucose": glucose.round().astype(int),
        "sodium": sodium.astype(int),
        "diabetes": np.where(diabetes, "TRUE", "FALSE"),
        "hypertension": np.where(hypertension, "TRUE", "FALSE"),
        "smoker": smoker,
    }
    return _Cohort(rng, p, {name: np.array([str(v) for v in values]) for name, values in columns.items()}, logits)


def _write_ehr(folder: Path, cohort: _Cohort, labels: np.ndarray, site: int, ids: list[str], stays: np.ndarray) -> None:
    """Write the site's ehr.csv (the cohort's columns, its drawn outcome and the site's missing
    cells) and stay.csv (the same, with the length of stay as its outcome)."""
    rng, n = cohort.rng, labels.size
    status = np.where(
        labels == 1,
        np.where(rng.random(n) < 0.35, "died", "icu"),
        np.where(rng.random(n) < 0.15, NEGATIVE_STATUSES[1], NEGATIVE_STATUSES[0]),
    )
    columns = {"patient_id": np.array(ids), **cohort.latent, "discharge_status": status, "length_of_stay": stays.astype(str)}
    for column, share in _POPULATIONS[site % len(_POPULATIONS)].missing:
        columns[column] = np.where(rng.random(n) < share, "", columns[column])
    order = np.argsort(columns["patient_id"])  # exports come sorted by patient id
    _write_csv(folder / "ehr.csv", EHR_COLUMNS, zip(*(columns[c][order] for c in EHR_COLUMNS)))
    stay_columns = (*EHR_COLUMNS[:-1], "length_of_stay")
    _write_csv(folder / "stay.csv", stay_columns, zip(*(columns[c][order] for c in stay_columns)))


def _write_csv(path: Path, header: Sequence[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
