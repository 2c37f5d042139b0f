import math

import pytest
import torch

from sparse_ensembles import metrics
from sparse_ensembles import uncertainty as U


def _random_logp(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(*shape, generator=g), -1)


def _tied_scores(seed):
    g = torch.Generator().manual_seed(seed)
    # few distinct values: many ties within and across the two groups
    return (torch.randint(0, 6, (37,), generator=g).float(), torch.randint(2, 8, (23,), generator=g).float())


# -- ensemble scores ------------------------------------------------------------------------------
def test_entropy_of_uniform_and_of_one_hot_predictions():
    assert U.entropy(torch.full((1, 4), 0.25).log()).item() == pytest.approx(math.log(4))
    assert U.entropy(torch.tensor([[0.0, -math.inf, -math.inf]])).item() == 0.0  # 0 log 0 = 0, no nan


def test_mutual_information_is_zero_when_members_agree_and_positive_when_they_disagree():
    same = _random_logp(1, 5, 3).expand(4, 5, 3)
    mi = U.mutual_information(U.ensemble_mean_logp(same), U.expected_entropy(same))
    assert mi.abs().max().item() < 1e-6
    # two confident members that disagree: MI = H[(0.5, 0.5)] - ~0 = ~log 2
    disagree = torch.tensor([[[0.999, 0.001]], [[0.001, 0.999]]]).log()
    mi = U.mutual_information(U.ensemble_mean_logp(disagree), U.expected_entropy(disagree))
    assert mi.item() > 0.6
    assert U.predictive_entropy(U.ensemble_mean_logp(disagree)).item() == pytest.approx(math.log(2), abs=1e-6)


def test_streaming_mutual_information_equals_the_batch_computation():
    logp = _random_logp(5, 20, 4, seed=1)
    stream = U.UncertaintyStream()
    for member in logp:
        stream.add(member)
    mean_logp = U.ensemble_mean_logp(logp)
    assert stream.members == 5
    torch.testing.assert_close(stream.mean_logp, mean_logp)
    torch.testing.assert_close(stream.entropy, U.predictive_entropy(mean_logp))
    torch.testing.assert_close(stream.expected_entropy, U.expected_entropy(logp))
    torch.testing.assert_close(stream.mutual_information, U.mutual_information(mean_logp, U.expected_entropy(logp)))
    assert (stream.mutual_information > 0).all()


def test_empty_stream_and_mismatched_member_are_refused():
    stream = U.UncertaintyStream()
    with pytest.raises(ValueError, match="no member"):
        stream.mean_logp
    stream.add(_random_logp(3, 4))
    with pytest.raises(ValueError, match="differs"):
        stream.add(_random_logp(3, 5))


# -- OOD detection --------------------------------------------------------------------------------
def test_auroc_of_a_perfect_separator_is_one_and_of_identical_scores_is_half():
    assert U.auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.9])) == 1.0
    assert U.auroc(torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2, 0.3])) == 0.0
    assert U.auroc(torch.full((7,), 0.4), torch.full((3,), 0.4)) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_equals_the_pairwise_count_with_ties(seed):
    s_in, s_out = _tied_scores(seed)
    pairs = [(a > b) + 0.5 * (a == b) for a in s_out.tolist() for b in s_in.tolist()]
    assert U.auroc(s_in, s_out) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupr_equals_brute_force_average_precision_with_ties(seed):
    s_in, s_out = _tied_scores(seed)
    scores = s_in.tolist() + s_out.tolist()
    positive = [False] * len(s_in) + [True] * len(s_out)
    # AP = mean over positives of the precision of the rule "score >= that positive's score"
    precisions = []
    for s, pos in zip(scores, positive):
        if pos:
            flagged = [p for t, p in zip(scores, positive) if t >= s]
            precisions.append(sum(flagged) / len(flagged))
    assert U.aupr(s_in, s_out) == pytest.approx(sum(precisions) / len(precisions), abs=1e-12)
    assert U.aupr(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9])) == 1.0


def test_fpr95_on_a_hand_made_case():
    s_out = torch.arange(1.0, 21.0)  # 20 OOD scores 1..20: 95% = 19 flagged, threshold = 2
    s_in = torch.tensor([0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 0.5, 0.2, 0.1, 0.3])  # 2.0, 2.5, 3.0 are >= 2
    assert U.fpr_at_tpr(s_in, s_out) == pytest.approx(0.3)
    res = U.ood_metrics(s_in, s_out)
    assert set(res) == {"auroc", "aupr", "fpr95"} and res["fpr95"] == pytest.approx(0.3)
    # 10 OOD scores: ceil(9.5) = 10 must be flagged, so the threshold is the smallest OOD score
    assert U.fpr_at_tpr(torch.tensor([0.5, 1.0, 2.0, 3.0]), torch.arange(1.0, 11.0)) == 0.75


# -- selective prediction -------------------------------------------------------------------------
def test_risk_coverage_and_aurc_of_a_hand_made_case():
    conf = torch.tensor([0.7, 0.9, 0.6, 0.8])  # unsorted on purpose
    correct = torch.tensor([1, 1, 1, 0])
    cov, risk = U.risk_coverage(conf, correct)
    torch.testing.assert_close(cov, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(risk, torch.tensor([0.0, 0.5, 1 / 3, 0.25], dtype=torch.float64))
    assert U.aurc(conf, correct.bool()) == pytest.approx((0 + 0.5 + 1 / 3 + 0.25) / 4)


def test_risk_coverage_accepts_a_tie_group_whole():
    conf = torch.tensor([0.9, 0.8, 0.8, 0.6])
    correct = torch.tensor([1, 0, 1, 1])
    cov, risk = U.risk_coverage(conf, correct)
    torch.testing.assert_close(cov, torch.tensor([0.25, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(risk, torch.tensor([0.0, 1 / 3, 0.25], dtype=torch.float64))
    # k = 2 inside the tie group takes the group's risk
    assert U.aurc(conf, correct) == pytest.approx((0 + 1 / 3 + 1 / 3 + 0.25) / 4)


def test_error_at_80_percent_coverage():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = torch.tensor([1, 0, 1, 1, 0])
    assert U.error_at_coverage(conf, correct, 0.8) == pytest.approx(0.25)  # 4 most confident, 1 wrong
    assert U.error_at_coverage(conf, correct, 1.0) == pytest.approx(0.4)
    assert U.error_at_coverage(conf, correct, 0.3) == pytest.approx(0.5)  # ceil(1.5) = 2 examples
    tied = torch.tensor([0.9, 0.8, 0.7, 0.7, 0.5])  # the 4th rank sits in a tie group of 3rd and 4th
    assert U.error_at_coverage(tied, correct, 0.6) == pytest.approx(0.25)


# -- calibration ----------------------------------------------------------------------------------
def test_reliability_ece_equals_metrics_ece():
    logp = _random_logp(500, 10, seed=3)
    y = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(4))
    r = U.reliability(logp, y)
    assert r["ece"] == metrics.ece(logp, y)
    weighted = float((r["counts"] / r["n"] * (r["accuracy"] - r["confidence"]).abs()).sum())
    assert weighted == pytest.approx(metrics.ece(logp, y), abs=1e-6)
    assert int(r["counts"].sum()) == 500 and len(r["edges"]) == 16
    # probabilities give the same diagram; top-1 only gives the same too
    assert U.reliability(logp.exp(), y)["ece"] == pytest.approx(r["ece"], abs=1e-6)
    top, pred = logp.max(-1)
    assert U.reliability_from_topk(top, pred == y)["ece"] == r["ece"]


def test_reliability_of_flattened_token_predictions():
    logp = _random_logp(3, 7, 50, seed=5)  # (batch, time, vocab) next-word log-probabilities
    y = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(6))
    r = U.reliability(logp.reshape(-1, 50), y.reshape(-1), bins=10)
    assert r["n"] == 21 and r["ece"] == metrics.ece(logp.reshape(-1, 50), y.reshape(-1), bins=10)


def test_plot_reliability_writes_a_png(tmp_path):
    logp = _random_logp(200, 5, seed=7)
    y = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(8))
    curves = {"SGD x1": U.reliability(logp, y), "SGLD+GSP+PR 96%": U.reliability(torch.log_softmax(logp / 2, -1), y, bins=10)}
    path = U.plot_reliability(curves, tmp_path / "reliability.png")
    assert path.exists() and path.stat().st_size > 1024
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
