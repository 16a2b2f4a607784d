"""The HTML reports, written from a real small federation plus explanations built here.

One federation of the demo hospitals runs once for this module; its explanations are synthetic
but shaped like real ones (bins at pooled quantiles of the hospitals' own data, counts from that
data), since this module tests the reports, not the explainer. Reference statistics are computed
with numpy from the run's files, not by the report code.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pytest
from PIL import Image

from fedward.data_adapters.demo import write_demo_data
from fedward.explain.aggregate import merge
from fedward.explain.report import (
    PatientExplanation,
    reliability,
    write_consortium_report,
    write_hospital_report,
    write_patient_explanation,
)
from fedward.explain.summary import ConsortiumExplanation, ExplanationSummary, FeatureBin, FeatureExplanation, to_jsonable
from fedward.config import parse_config
from fedward.errors import CheckpointError, DataError
from fedward.release import score_bins
from fedward.checkpoint import read_metrics
from fedward.pipelines.run import Pipeline
from tests.conftest import HOSPITALS, ehr_config

pytestmark = pytest.mark.e2e

TABLE_SECTIONS = [
    "Model card", "Performance per hospital", "Calibration per hospital", "Training curve", "Global importance",
    "SHAP summary (binned beeswarm)", "Dependence plots", "Drift across hospitals", "Checks",
]
EXPLANATION_SECTIONS = TABLE_SECTIONS[4:]
# log-odds per standard deviation (numbers) or per value (categories) for the demo's driving features
EFFECTS = {"age": 0.6, "creatinine": 0.5, "systolic_bp": -0.4, "heart_rate": 0.3}
CATEGORY_EFFECTS = {"diabetes": {"true": 0.35, "false": -0.1}, "smoker": {"current": 0.4, "former": 0.1, "never": -0.2}}


# -- reading HTML ---------------------------------------------------------------------------------


class Page(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.headings: dict[str, list[str]] = {"h1": [], "h2": [], "h3": []}
        self.images: list[str] = []
        self.links: list[str] = []
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.headings:
            self._in = tag
            self.headings[tag].append("")
        if tag == "img":
            self.images.append(attrs["src"])
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and tag != "img"]

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in:
            self.headings[self._in][-1] += data


def assert_self_contained(path: Path) -> Page:
    text = path.read_text()
    page = Page(text)
    assert page.images, "a report without figures"
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.width > 50 and image.height > 50
            image.verify()
    assert all(link.startswith("#") for link in page.links), page.links
    assert "http:" not in text and "https:" not in text
    return page


# -- synthetic explanations shaped like real ones -------------------------------------------------


def feature_summaries(name: str, kind: str, values: dict[str, list], rng: np.random.Generator) -> dict[str, FeatureExplanation]:
    """Per hospital, one feature explained as the explainer would: per-patient SHAP values made up
    from the value (an effect per pooled standard deviation or per category), then binned at pooled
    quantiles (categories: the pooled vocabulary), missing values in a bin of their own."""
    if kind == "numeric":
        pooled = np.array([v for vs in values.values() for v in vs if v is not None], dtype=np.float64)
        inner = np.quantile(pooled, np.arange(1, 8) / 8)
        text = [f"{e:.4g}" for e in inner]
        labels = [f"< {text[0]}", *(f"[{a}, {b})" for a, b in zip(text, text[1:])), f"≥ {text[-1]}", "missing"]
        edges = list(zip([None, *inner], [*inner, None])) + [(None, None)]
    else:
        labels = sorted({str(v).lower() for vs in values.values() for v in vs if v is not None}) + ["missing"]
        edges = [(None, None)] * len(labels)
    out = {}
    for h, vs in values.items():
        if kind == "numeric":
            x = np.array([np.nan if v is None else v for v in vs], dtype=np.float64)
            codes = np.where(np.isnan(x), len(labels) - 1, np.searchsorted(inner, x, side="right"))
            shap = np.where(np.isnan(x), 0.15, EFFECTS.get(name, 0.0) * (x - pooled.mean()) / pooled.std())
        else:
            text = ["missing" if v is None else str(v).lower() for v in vs]
            codes = np.array([labels.index(t) for t in text])
            shap = np.array([CATEGORY_EFFECTS.get(name, {}).get(t, 0.0) for t in text])
        shap = shap + rng.normal(0, 0.02, len(shap))
        counts = np.bincount(codes, minlength=len(labels))
        sums = np.bincount(codes, weights=shap, minlength=len(labels))
        bins = tuple(FeatureBin(label, lo if lo is None else float(lo), hi if hi is None else float(hi), int(c), float(t / c))
                     for label, (lo, hi), c, t in zip(labels, edges, counts, sums) if c >= 10)
        out[h] = FeatureExplanation(name, kind, float(np.abs(shap).mean()), float(shap.mean()), bins,
                                    int(((counts > 0) & (counts < 10)).sum()))
    return out


def synthetic_explanations(run_dir: Path, data_root: Path, round: int) -> tuple[dict, dict[str, ExplanationSummary]]:
    """explanations.json as the explain stage writes it, for each hospital's first held-out-many rows."""
    identity = json.loads((run_dir / "run.json").read_text())["identity"]
    held_out = json.loads((run_dir / "data.json").read_text())["hospitals"]
    n = {h: min(300, held_out[h]["holdout_examples"]) for h in HOSPITALS}
    tables = {h: pa_csv.read_csv(data_root / h / "ehr.csv").slice(0, n[h]) for h in HOSPITALS}
    rng = np.random.default_rng(0)
    features = [
        feature_summaries(f["name"], f["type"], {h: tables[h].column(f["name"]).to_pylist() for h in HOSPITALS}, rng)
        for f in identity["data"]["table"]["features"]
    ]
    summaries = {
        h: ExplanationSummary(h, round, n[h], -0.8, tuple(f[h] for f in features), None, 2e-7, 0.0, 1.5, {"additivity": True})
        for h in HOSPITALS
    }
    consortium = merge(list(summaries.values()), json.loads((data_root / "truth.json").read_text())["ehr"])
    body = {"round": round, "hospitals": {h: to_jsonable(s) for h, s in summaries.items()}, "consortium": to_jsonable(consortium)}
    return body, summaries


# -- one small federation for the module ----------------------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("report")
    write_demo_data(root / "data", hospitals=3, seed=0, images_per_hospital=(20, 20, 20))  # the tables are used
    raw = {**ehr_config(root / "data", root / "runs", name="report", rounds=2), "explain": {"enabled": False}}
    Pipeline(parse_config(raw), progress=False, log=lambda m: None).run()
    run_dir = root / "runs" / "report"
    body, summaries = synthetic_explanations(run_dir, root / "data", round=2)
    (run_dir / "explanations.json").write_text(json.dumps(body))
    return run_dir, summaries


@pytest.fixture(scope="module")
def consortium_report(federation) -> Path:
    return write_consortium_report(federation[0])


@pytest.fixture(scope="module")
def hospital_report(federation, tmp_path_factory) -> Path:
    run_dir, summaries = federation
    return write_hospital_report(
        tmp_path_factory.mktemp("hospital_a"), hospital="hospital_a",
        run_dir_identity=json.loads((run_dir / "run.json").read_text())["identity"],
        metrics=read_metrics(run_dir / "metrics.jsonl"), summary=summaries["hospital_a"], patients=table_patients())


@pytest.fixture
def run_dir(federation, tmp_path) -> Path:
    """A private copy of the run directory, for tests that change it."""
    return Path(shutil.copytree(federation[0], tmp_path / "run", ignore=shutil.ignore_patterns("report.html")))


def table_patients() -> list[PatientExplanation]:
    contributions = [("creatinine", "2.3", 0.42), ("age", "81", 0.31), ("systolic_bp", "152", -0.12),
                     ("smoker", "<b>never</b>", -0.05), ("sodium", "139", 0.01), ("height_cm", "170.2", 0.004)]
    return [
        PatientExplanation("A-000365", "row-17", 1, 1 / (1 + math.exp(-(-0.8 + sum(c[2] for c in contributions)))), -0.8,
                           contributions, None, None),
        PatientExplanation("<script>alert(1)</script>", "row-3", 0, 0.2, -0.8, [("age", "40", -0.6)], None, None),
    ]


# -- tests ----------------------------------------------------------------------------------------


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def hanley_mcneil(a: float, n_pos: int, n_neg: int) -> tuple[float, float]:
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg))
    return max(0.0, a - Z95 * se), min(1.0, a + Z95 * se)


def wilson(p: float, n: int) -> tuple[float, float]:
    z = Z95
    p = round(p * n) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_the_consortium_report_is_one_self_contained_file_with_every_section_and_the_run_figures(federation, consortium_report):
    run_dir, path = federation[0], consortium_report
    assert path == run_dir / "report.html"
    page = assert_self_contained(path)
    assert page.headings["h2"] == [*TABLE_SECTIONS, "Update screening", "Privacy"]
    text = path.read_text()
    # The figures of the last round, with intervals computed here from its class counts.
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert last["round"] == 2
    for name, m in last["hospitals"].items():
        n_pos, n_neg = sum(m["positive_bins"]), sum(m["negative_bins"])
        lo, hi = hanley_mcneil(m["auroc"], n_pos, n_neg)
        assert f"<td>{name}</td><td>{m['n']}</td><td>{n_pos}</td><td>{m['auroc']:.3f} ({lo:.3f}–{hi:.3f})</td>" in text
        lo, hi = wilson(m["accuracy"], m["n"])
        assert f"{m['accuracy']:.3f} ({lo:.3f}–{hi:.3f})" in text
    pos = sum(sum(m["positive_bins"]) for m in last["hospitals"].values())
    neg = sum(sum(m["negative_bins"]) for m in last["hospitals"].values())
    assert last["pooled"]["positives"] == pos and last["pooled"]["pooled_over"] == sorted(last["hospitals"])
    lo, hi = hanley_mcneil(last["pooled"]["auroc"], pos, neg)
    assert (f"<td>pooled (hospital_a, hospital_b, hospital_c)</td><td>{last['pooled']['n']}</td><td>{pos}</td>"
            f"<td>{last['pooled']['auroc']:.3f} ({lo:.3f}–{hi:.3f})") in text
    data = json.loads((run_dir / "data.json").read_text())["hospitals"]["hospital_b"]
    assert f"<td>hospital_b</td><td>{data['train_examples']}</td><td>{data['holdout_examples']}</td>" in text
    assert "2 of 2 finished" in text and "plaintext" in text and "spent epsilon" not in text
    assert text.count('<span class="pass">pass</span>') == 2 + 3 and "FAIL" not in text
    assert 'role="alert"' not in text  # a finished run with explanations raises no notice
    # Figures: calibration per hospital; six dependence plots.
    assert len(page.images) == 3 + 1 + 1 + 1 + 6 + 1


def test_without_explanations_the_report_says_so_instead_of_looking_complete(run_dir):
    (run_dir / "explanations.json").unlink()
    page = assert_self_contained(write_consortium_report(run_dir))
    assert page.headings["h2"] == [*TABLE_SECTIONS[:4], "Explanations", "Update screening", "Privacy"]
    assert not set(EXPLANATION_SECTIONS) & set(page.headings["h2"])
    text = (run_dir / "report.html").read_text()
    assert 'role="alert">Explanations were not computed for this run' in text


def test_a_failed_check_a_failed_hospital_and_a_stopped_run_are_flagged_at_the_top(run_dir):
    body = json.loads((run_dir / "explanations.json").read_text())
    body["consortium"]["checks"]["driving_above_noise"] = False
    del body["hospitals"]["hospital_c"]
    body["failures"] = {"hospital_c": "HospitalError: hospital_c: model not prepared"}
    (run_dir / "explanations.json").write_text(json.dumps(body))
    identity = json.loads((run_dir / "run.json").read_text())
    identity["identity"]["run"]["rounds"] = 5
    (run_dir / "run.json").write_text(json.dumps(identity))
    text = write_consortium_report(run_dir).read_text()
    assert 'role="alert">This run stopped after round 2 of 5' in text
    assert 'role="alert">Explanation checks failed (driving_above_noise at consortium)' in text
    assert 'role="alert">Explanations failed at hospital_c, which the explanation sections leave out: HospitalError' in text
    assert "<td>hospital_c</td><td>900</td><td>300</td><td>1200</td><td>263 positive</td><td>0</td><td>failed</td>" in text
    assert text.count('<span class="fail">FAIL</span>') == 1


def test_an_unusable_run_directory_is_refused_by_name_and_no_report_is_left(run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no such run directory"):
        write_consortium_report(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"not a fedward run directory \(no run.json\)"):
        write_consortium_report(empty)
    shutil.copy(run_dir / "run.json", empty / "run.json")
    with pytest.raises(CheckpointError, match="no finished round yet"):
        write_consortium_report(empty)
    write_consortium_report(run_dir)  # a good report first, then its explanations get damaged
    (run_dir / "explanations.json").write_text('{"round": 2}')
    with pytest.raises(CheckpointError, match="explanations.json is not an explanations file"):
        write_consortium_report(run_dir)
    assert not list(tmp_path.rglob("report.html"))  # the old report does not stand in for the new one


def test_the_reliability_points_are_the_released_bins():
    rng = np.random.default_rng(0)
    scores = rng.beta(2, 3, 5000)
    labels = rng.random(5000) < scores
    bins = score_bins(scores, labels, np.arange(5000), 10)
    mean_predicted, observed, counts = reliability(bins)
    for k, (lo, hi) in enumerate(zip(bins.low, bins.high)):
        inside = (scores >= lo / 100) & (scores < hi / 100)
        assert counts[k] == inside.sum() and observed[k] == pytest.approx(labels[inside].mean())
        assert mean_predicted[k] == pytest.approx((lo + hi) / 200)


def test_a_hospital_report_holds_its_own_figures_and_patients_in_words(federation, hospital_report, tmp_path):
    run_dir, summaries = federation
    path = hospital_report
    assert path.name == "report.html"
    page = assert_self_contained(path)
    assert page.headings["h2"] == [*TABLE_SECTIONS[:7], "Checks", "Patients"]  # no drift: that needs the consortium
    assert page.headings["h3"][-2:] == ["Patient A-000365, sample row-17", "Patient <script>alert(1)</script>, sample row-3"]
    text = path.read_text()
    assert "<td>hospital_a</td>" in text and "<td>hospital_b</td>" not in text
    assert "<li>creatinine = 2.3 raised the predicted risk (+0.42 log-odds)</li>" in text
    assert "<li>systolic_bp = 152 lowered the predicted risk (-0.12 log-odds)</li>" in text
    assert "smoker = &lt;b&gt;never&lt;/b&gt; lowered" in text and "<script>" not in text
    assert "The other 1 features together moved it by +0.00 log-odds." in text  # top 5 of 6 in words
    identity = json.loads((run_dir / "run.json").read_text())["identity"]
    with pytest.raises(DataError, match="no hospital named 'hospital_z'"):
        write_hospital_report(tmp_path, hospital="hospital_z", run_dir_identity=identity,
                              metrics=read_metrics(run_dir / "metrics.jsonl"), summary=summaries["hospital_a"], patients=[])
    assert not (tmp_path / "report.html").exists()


def test_image_explanations_show_the_aggregate_map_and_the_patient_overlay(run_dir, tmp_path):
    yy, xx = np.mgrid[0:8, 0:8]
    blob = np.exp(-((yy - 3) ** 2 + (xx - 4) ** 2) / 4.0)
    summaries = {h: ExplanationSummary(h, 2, 90, -0.5, (), blob * (k + 1) / 3, 5e-8, 0.0, 4.0, {"additivity": True})
                 for k, h in enumerate(HOSPITALS)}
    consortium = ConsortiumExplanation(2, HOSPITALS, (), {}, {h: {} for h in HOSPITALS}, {h: {} for h in HOSPITALS}, {},
                                       blob * 2 / 3, 5e-8, {"additivity": True})
    body = {"round": 2, "hospitals": {h: to_jsonable(s) for h, s in summaries.items()}, "consortium": to_jsonable(consortium)}
    (run_dir / "explanations.json").write_text(json.dumps(body))
    page = assert_self_contained(write_consortium_report(run_dir))
    assert page.headings["h2"] == [*TABLE_SECTIONS[:4], "Image attributions", "Checks", "Update screening", "Privacy"]
    image = np.clip(blob.repeat(8, 0).repeat(8, 1) + 0.1 * np.random.default_rng(0).random((64, 64)), 0, 1)
    patient = PatientExplanation("P/7", "1.2.840.99", 1, 0.81, -0.5, [], image, (image - 0.5) * 0.05)
    path = write_patient_explanation(tmp_path / "patients", patient)
    assert path.parent == tmp_path / "patients" and path.name == "patient-P_7-1.2.840.99.html"
    page = assert_self_contained(path)
    assert page.headings["h2"] == ["Patient P/7, sample 1.2.840.99"] and len(page.images) == 1
    assert "moved it by" in path.read_text()


# -- in a real browser ----------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = f"headless Chromium test needs {', '.join(missing)} (make browser)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,4000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))


def test_the_reports_render_in_headless_chromium_with_every_image_loaded(consortium_report, hospital_report):
    driver = browser()
    try:
        for path, title, sections in ((consortium_report, "fedward report: report", [*TABLE_SECTIONS, "Update screening", "Privacy"]),
                                      (hospital_report, "fedward report: report at hospital_a", [*TABLE_SECTIONS[:7], "Checks", "Patients"])):
            driver.get(path.as_uri())
            assert driver.title == title
            assert driver.execute_script("return [...document.querySelectorAll('h2')].map(h => h.textContent)") == sections
            images = driver.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth])")
            assert images and all(complete and width > 0 for complete, width in images)
            severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not severe, severe
    finally:
        driver.quit()
