import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from fedward.metrics import auprc_from_histograms, auroc_error_bound, auroc_from_histograms, score_histograms


def test_pooled_auroc_from_histograms_is_within_its_bound_of_the_exact_value():
    rng = np.random.default_rng(0)
    parts = []
    for shift in (0.5, 1.0, 1.5):  # three hospitals with different separation
        labels = rng.random(400) < 0.3
        scores = 1 / (1 + np.exp(-(rng.normal(size=400) + shift * labels)))
        parts.append((scores, labels))
    hists = [score_histograms(s, l) for s, l in parts]
    pos = sum(h[0] for h in hists)
    neg = sum(h[1] for h in hists)
    scores = np.concatenate([s for s, _ in parts])
    labels = np.concatenate([l for _, l in parts])
    exact = roc_auc_score(labels, scores)
    bound = auroc_error_bound(pos, neg)
    assert abs(auroc_from_histograms(pos, neg) - exact) <= bound
    assert bound < 0.01
    assert abs(auprc_from_histograms(pos, neg) - average_precision_score(labels, scores)) < 0.01


def test_histograms_count_every_sample_once_including_the_edges():
    pos, neg = score_histograms(np.array([0.0, 1.0, 0.5, 0.999]), np.array([1, 1, 0, 0]))
    assert pos.sum() == 2 and neg.sum() == 2
    assert pos[0] == 1 and pos[-1] == 1
    assert np.isnan(auroc_from_histograms(pos, np.zeros_like(neg)))


def test_a_hospitals_exact_auroc_and_average_precision_are_scikit_learns():
    from fedward.metrics import auroc, average_precision

    rng = np.random.default_rng(1)
    for n, decimals in ((7, 1), (50, 1), (400, 2), (1000, 6)):  # coarse scores make many ties
        labels = rng.random(n) < 0.3
        labels[:2] = [True, False]
        scores = np.round(1 / (1 + np.exp(-(rng.normal(size=n) + labels))), decimals)
        assert abs(auroc(labels, scores) - roc_auc_score(labels, scores)) < 1e-12
        assert abs(average_precision(labels, scores) - average_precision_score(labels, scores)) < 1e-12
    assert np.isnan(auroc(np.ones(5, bool), np.linspace(0, 1, 5))) and np.isnan(average_precision(np.zeros(5, bool), np.linspace(0, 1, 5)))
