"""Everything that leaves a hospital, under which protection, and the test that shows it.

One table, read by the privacy ledger of every run (privacy.json, the report's Privacy section)
and written into docs/privacy.md by `python -m fedward.outflows`; a test holds the two equal. A
row names the fields as the run's files and the driver hold them. "not tested" says so plainly.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Outflow:
    what: str
    fields: str
    to: str
    protection: str
    shown_by: str  # the tests that demonstrate the protection, or "not tested"


OUTFLOWS = (
    Outflow("model update, every round", "the change of the weights (flat float32), its weight and example count",
            "the driver", "as `privacy:` sets it: in the clear, masked (secure aggregation) or CKKS-encrypted; clipped and noised under "
            "DP-FedAvg or trained under DP-SGD, with ε in this ledger",
            "tests/privacy/test_masking.py, tests/privacy/test_lying_driver.py, tests/privacy/test_ckks.py, tests/privacy/test_dp_fedavg.py, "
            "tests/privacy/test_dp_sgd.py"),
    Outflow("training metrics, every round", "train_loss (and DP-SGD's noise multiplier, sample rate and steps)",
            "the driver; metrics.jsonl, privacy.json", "none: a mean over training batches; covered by DP-SGD only when it is on",
            "not tested"),
    Outflow("evaluation in the clear, every round", "positive_bins, negative_bins, bin_low, bin_high; n, positives, auroc (two decimals), "
            "auprc, accuracy, sensitivity, specificity (multiclass: each class's bins and AUROC; regression: r2, mse, mae to two "
            "significant digits)",
            "the driver; metrics.jsonl, reports", "every bin holds the hospital's release floor in patients of each outcome, the figures "
            "come from the bins (the AUROC rounded); below the floor: \"held back: fewer than N patients\"",
            "tests/privacy/test_release_attack.py, tests/fedward/test_release.py, tests/fedward/test_tasks.py"),
    Outflow("evaluation statistics, every round", "per-class counts of scores in 0.01 slices and the loss sum (multiclass: also the "
            "confusion matrix; regression: sums of targets and errors, the predicted-against-observed counts)",
            "the driver, padded; one contributing hospital opens their sum", "one-time pads from the hospitals' evaluation key, which the "
            "driver never holds; only pooled figures over two or more hospitals leave the opening hospital, rounded to three decimals, "
            "cells under its floor held back (and a row of regression predictions with a single cell left)",
            "tests/fedward/test_pooling.py, tests/privacy/test_release_attack.py"),
    Outflow("figures per patient group (`subgroups:`)", "per released group: score bins cut at the threshold; its exact histograms padded",
            "the driver; subgroups.json", "a group leaves with subgroups.min_count patients of each outcome (never below the floor), its "
            "bins too; pooled figures as for the evaluation statistics",
            "tests/fedward/test_subgroups.py"),
    Outflow("explanation aggregates (`explain:`)", "mean |SHAP| per feature, mean SHAP per feature bin, the base value, the image map",
            "the driver; explanations.json", "bins under explain.min_bin_count distinct patients suppressed; base value from held-out "
            "patients; optional noise",
            "tests/explain/test_aggregate.py"),
    Outflow("data counts", "training, held-out and validation samples and patients; samples per class; skipped inputs per reason",
            "the driver; data.json, reports", "counts per class and per reason under the floor held back (\"fewer than N\")",
            "tests/e2e/test_release.py"),
    Outflow("feature summaries for harmonization (tables), before round 1", "per feature over the training split: count, mean, "
            "sum of squared deviations, missing count; per categorical feature, counts of values seen data.table.min_category_count "
            "times or more, the rest folded into OTHER", "the driver; preprocessing.json holds the merged vocabulary and moments",
            "sums over all training patients; category counts from min_category_count (5), not the release floor, and small missing or "
            "OTHER counts are released as they are", "not tested"),
    Outflow("target sums (regression), before round 1", "count, sum and sum of squares of the training split's targets", "the driver",
            "sums over all training patients", "not tested"),
    Outflow("aggregation protocol messages", "set-up of secure aggregation, encryption and the evaluation key: public keys, "
            "signed advertisements and weights, sealed shares of secrets, signed survivor sets, unmasking shares, decrypted sums",
            "the driver, relayed to the other hospitals", "shares sealed for their recipient (ChaCha20-Poly1305 under X25519); a hospital "
            "checks what it is told before it answers (docs/privacy.md, \"Against a lying driver\")",
            "tests/privacy/test_masking.py, tests/privacy/test_lying_driver.py, tests/fedward/test_pooling.py"),
    Outflow("build report, before round 1", "fedward's and torch's versions, the study code's provenance (a file's sha256 or a "
            "package's version), the model layout's digest", "the driver", "none: it names code, not data", "not tested"),
    Outflow("model update screening", "norms, distances and cosines of each change to the round's median, computed by the driver",
            "metrics.jsonl", "computed only from changes the driver sees in the clear", "not tested"),
    Outflow("fingerprints", "a hash of the usable inputs' content hashes; a hash of the held-out sample ids",
            "the driver; data.json, manifest.json", "one-way hashes: they show whether the data or the split changed, not a sample",
            "not tested"),
)

BEGIN, END = "<!-- outflows table: begin -->", "<!-- outflows table: end -->"


def protection(what: str) -> str:
    return next(o.protection for o in OUTFLOWS if o.what == what)


def ledger_rows() -> list[dict[str, str]]:
    return [asdict(o) for o in OUTFLOWS]


def table() -> str:
    rows = ["| what leaves | fields | to | protection | shown by |", "|---|---|---|---|---|"]
    rows += [f"| {o.what} | {o.fields} | {o.to} | {o.protection} | {o.shown_by} |" for o in OUTFLOWS]
    return "\n".join(rows)


def with_table(text: str) -> str:
    """`text` (docs/privacy.md) with the table between its markers replaced by today's."""
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    doc = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/privacy.md")
    doc.write_text(with_table(doc.read_text()))
