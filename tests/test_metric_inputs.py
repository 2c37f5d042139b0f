"""Metrics refuse input they cannot score (issue 24 item 2): every refusal is a MetricInputError
naming the metric, the problem and the fix; ``drop_nonfinite=True`` scores exactly the clean rows."""
import math

import pytest
import torch

from sparse_ensembles import metrics, uncertainty
from sparse_ensembles.ensembles import mean_of_probs
from sparse_ensembles.metrics import MetricInputError


def _preds(n=200, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(2 * torch.randn(n, c, generator=g), -1)
    y = torch.randint(0, c, (n,), generator=g)
    return logp, y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_every_classification_metric_accepts_any_float_dtype_and_matches_float32(dtype):
    logp, y = _preds()
    ref = metrics.classification_metrics(logp, y)
    got = metrics.classification_metrics(logp.to(dtype), y)
    tol = 1e-6 if dtype == torch.float64 else 2e-2
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=tol), k


@pytest.mark.parametrize("metric", [metrics.error, metrics.nll, metrics.ece, metrics.brier])
def test_labels_of_another_length_are_refused_naming_the_metric_and_the_fix(metric):
    logp, y = _preds()
    with pytest.raises(MetricInputError, match=rf"^{metric.__name__}: 200 predictions but labels of shape \(150,\); "
                                               r"pass one integer label per prediction row"):
        metric(logp, y[:150])


@pytest.mark.parametrize("metric", [metrics.error, metrics.nll, metrics.ece, metrics.brier])
def test_empty_input_is_refused(metric):
    with pytest.raises(MetricInputError, match=rf"^{metric.__name__}: no examples"):
        metric(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_float_labels_out_of_range_labels_and_integer_predictions_are_refused():
    logp, y = _preds()
    with pytest.raises(MetricInputError, match="labels must be integers.*y.long"):
        metrics.nll(logp, y.float())
    with pytest.raises(MetricInputError, match=r"labels must lie in \[0, 5\), got \[1, 7\]"):
        metrics.error(logp, torch.where(y == 0, 7, y))
    with pytest.raises(MetricInputError, match="must be floating point"):
        metrics.brier(logp.argmax(-1, keepdim=True), y)
    with pytest.raises(MetricInputError, match="bins must be a positive integer"):
        metrics.ece(logp, y, bins=0)


@pytest.mark.parametrize("metric", [metrics.error, metrics.nll, metrics.ece, metrics.brier])
def test_nan_rows_are_refused_unless_dropped_and_dropping_equals_scoring_the_clean_rows(metric):
    logp, y = _preds()
    bad = logp.clone()
    bad[3, 1] = float("nan")
    bad[10, 0] = float("inf")
    with pytest.raises(MetricInputError, match=rf"^{metric.__name__}: 2 of 200 prediction rows hold NaN or inf; "
                                               r".*drop_nonfinite=True"):
        metric(bad, y)
    keep = torch.ones(200, dtype=torch.bool)
    keep[[3, 10]] = False
    assert metric(bad, y, drop_nonfinite=True) == metric(logp[keep], y[keep])


def test_minus_inf_is_a_probability_of_zero_not_an_error():
    logp = torch.log(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # -inf entries
    y = torch.tensor([0, 0])
    assert metrics.error(logp, y) == 0.5
    assert metrics.nll(logp, y) == math.inf
    assert metrics.brier(logp, y) == pytest.approx(1.0)  # (0 + 0 + 1 + 1) / 2


def test_all_rows_nonfinite_is_refused_even_when_dropping():
    logp = torch.full((4, 3), float("nan"))
    with pytest.raises(MetricInputError, match="all 4 prediction rows hold NaN or inf"):
        metrics.error(logp, torch.zeros(4, dtype=torch.long), drop_nonfinite=True)


def test_ood_metrics_refuse_nan_scores_and_dropping_them_equals_the_clean_scores():
    g = torch.Generator().manual_seed(1)
    s_in, s_out = torch.randn(500, generator=g), torch.randn(300, generator=g) + 1
    bad_in = s_in.clone()
    bad_in[::100] = float("nan")
    for fn in (uncertainty.auroc, uncertainty.aupr, uncertainty.fpr_at_tpr):
        with pytest.raises(MetricInputError, match=rf"^{fn.__name__}: 5 of 500 in-distribution scores hold NaN"):
            fn(bad_in, s_out)
    clean = s_in[bad_in.isfinite()]
    assert uncertainty.ood_metrics(bad_in, s_out, drop_nonfinite=True) == uncertainty.ood_metrics(clean, s_out)
    with pytest.raises(MetricInputError, match="got 3 in-distribution and 0 OOD scores"):
        uncertainty.ood_metrics(torch.randn(3), torch.zeros(0))


def test_selective_prediction_refuses_nan_confidences_and_bad_flags():
    g = torch.Generator().manual_seed(2)
    conf = torch.rand(100, generator=g)
    correct = torch.rand(100, generator=g) > 0.3
    bad = conf.clone()
    bad[7] = float("nan")
    for fn in (uncertainty.risk_coverage, uncertainty.aurc, uncertainty.error_at_coverage):
        with pytest.raises(MetricInputError, match=rf"^{fn.__name__}: 1 of 100 confidences hold NaN"):
            fn(bad, correct)
    keep = bad.isfinite()
    assert uncertainty.aurc(bad, correct, drop_nonfinite=True) == uncertainty.aurc(conf[keep], correct[keep])
    assert (uncertainty.error_at_coverage(bad, correct, drop_nonfinite=True)
            == uncertainty.error_at_coverage(conf[keep], correct[keep]))
    with pytest.raises(MetricInputError, match="bool or 0/1"):
        uncertainty.aurc(conf, correct.long() * 2)
    with pytest.raises(MetricInputError, match="got 100 confidences and 99 correctness flags"):
        uncertainty.aurc(conf, correct[:99])
    with pytest.raises(MetricInputError, match="confidences hold NaN"):
        uncertainty.reliability_from_topk(bad.log(), correct)


def test_an_ensemble_of_zero_members_is_refused_with_a_clear_error():
    with pytest.raises(MetricInputError, match="M >= 1"):
        uncertainty.ensemble_mean_logp(torch.zeros(0, 4, 3))
    with pytest.raises(ValueError, match="0 members"):
        mean_of_probs(torch.zeros(0, 4, 3))
