"""FusedLSTMEnsemble: equal to running the members one by one (own carried states, then the log of
the mean of their softmaxes) over several segments, for members of different widths, tied and
untied, and a single member; padded units stay zero; clear errors for incompatible members."""
import math

import pytest
import torch

from sparse_ensembles.compact.lstm import FusedLSTMEnsemble, _log_mean_softmax
from sparse_ensembles.models import LSTMLM

VOCAB = 50
ATOL = 1e-5


def _member(hidden, emb=None, tie=False, seed=0):
    torch.manual_seed(seed)
    emb = hidden[-1] if tie else emb
    return LSTMLM(VOCAB, list(hidden), emb, dropout=0.3, tie=tie, init_scale=0.5).eval()


def _shrunk_members(tie, n=3, widths=(9, 8), emb=7):
    """Members ISS-shrunk from one model to different widths per layer, as an ensemble stores them."""
    big = _member(widths, emb, tie, seed=0)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        keep = [torch.rand(f.size, generator=g) < 0.6 for f in big.unit_groups()]
        for k in keep:
            k[0] = True
        out.append(big.shrink(keep).eval())
    return out


@torch.no_grad()
def _sequential(members, segments):
    """Reference: every member on its own, own state carried; log mean_m softmax per segment."""
    states = [None] * len(members)
    outs = []
    for seg in segments:
        logps = []
        for k, m in enumerate(members):
            logits, states[k] = m(seg, states[k])
            logps.append(torch.log_softmax(logits, -1))
        outs.append(torch.logsumexp(torch.stack(logps), 0) - math.log(len(members)))
    return outs, states


@torch.no_grad()
def _assert_matches_sequential(members, batch=3, lengths=(1, 4, 1, 1, 6)):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, VOCAB, (batch, sum(lengths)), generator=g)
    segments = tokens.split(list(lengths), dim=1)
    expected, member_states = _sequential(members, segments)
    fused = FusedLSTMEnsemble(members)
    state = None
    for seg, exp in zip(segments, expected):
        out, state = fused(seg, state)
        assert out.shape == exp.shape
        torch.testing.assert_close(out, exp, atol=ATOL, rtol=0)
    for k, own in enumerate(member_states):
        for (h, c), (h_ref, c_ref) in zip(fused.member_state(state, k), own):
            torch.testing.assert_close(h, h_ref, atol=ATOL, rtol=0)
            torch.testing.assert_close(c, c_ref, atol=ATOL, rtol=0)
    return fused, state


def test_fused_equals_sequential_for_members_of_different_widths_untied():
    members = _shrunk_members(tie=False)
    assert len({tuple(m.hidden) for m in members}) > 1 and len({m.emb for m in members}) > 1
    _assert_matches_sequential(members)


def test_fused_equals_sequential_for_tied_members_of_different_widths():
    members = _shrunk_members(tie=True)
    assert all(m.tie for m in members) and len({tuple(m.hidden) for m in members}) > 1
    _assert_matches_sequential(members)


def test_fused_equals_sequential_for_independent_mixed_tied_and_untied_three_layer_members():
    members = [_member([5, 7, 4], emb=6, seed=3), _member([8, 3, 6], tie=True, seed=4),
               _member([2, 9, 5], emb=3, seed=5)]
    _assert_matches_sequential(members, batch=2)


def test_fused_single_member_equals_its_log_softmax():
    (member,) = _shrunk_members(tie=False, n=1)
    _assert_matches_sequential([member], batch=1)
    _assert_matches_sequential([member], batch=4, lengths=(3, 1, 5))


def test_fused_state_round_trips_through_member_states_and_continues_exactly():
    members = _shrunk_members(tie=False)
    tokens = torch.randint(0, VOCAB, (2, 7))
    fused = FusedLSTMEnsemble(members)
    with torch.no_grad():
        _, state = fused(tokens[:, :4])
        own = [fused.member_state(state, k) for k in range(len(members))]
        rebuilt = fused.from_member_states(own)
        a, _ = fused(tokens[:, 4:], state)
        b, _ = fused(tokens[:, 4:], rebuilt)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_padded_units_stay_exactly_zero():
    members = _shrunk_members(tie=False)
    fused, state = _assert_matches_sequential(members)
    for k, hidden in enumerate(fused.member_hidden):
        for (h, c), n in zip(state, hidden):
            assert torch.count_nonzero(h[k, :, n:]) == 0 and torch.count_nonzero(c[k, :, n:]) == 0
    assert any(n < h.shape[-1] for hidden in fused.member_hidden for (h, _), n in zip(state, hidden))


def test_fused_output_is_a_normalised_distribution_and_works_in_float64():
    members = [m.double() for m in _shrunk_members(tie=True)]
    fused = FusedLSTMEnsemble(members)
    with torch.no_grad():
        out, _ = fused(torch.randint(0, VOCAB, (2, 3)))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 3, dtype=torch.float64))
    _assert_matches_sequential(members)


def test_log_mean_softmax_falls_back_exactly_where_probabilities_underflow():
    logits = torch.randn(3, 5, VOCAB) * 200  # log-probabilities far below float32's range
    expected = torch.logsumexp(torch.log_softmax(logits, -1), 0) - math.log(3)
    out = _log_mean_softmax(logits)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_padded_macs_counts_padding_overhead():
    members = [_member([4, 6], emb=3, seed=0), _member([6, 2], emb=5, seed=1)]
    macs = FusedLSTMEnsemble(members).padded_macs()
    own = [4 * 4 * (3 + 4) + 4 * 6 * (4 + 6) + 6 * VOCAB, 4 * 6 * (5 + 6) + 4 * 2 * (6 + 2) + 2 * VOCAB]
    assert macs["members"] == sum(own) == sum(m.cost()["flops"] // 2 for m in members)
    assert macs["padded"] == 2 * (4 * 6 * (5 + 6) + 4 * 6 * (6 + 6) + 6 * VOCAB)
    assert macs["overhead"] == pytest.approx(macs["padded"] / macs["members"])


def test_members_with_different_vocabularies_are_rejected():
    a = _member([4, 4], emb=4)
    b = LSTMLM(VOCAB + 1, [4, 4], 4).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        FusedLSTMEnsemble([a, b])


def test_members_with_different_layer_counts_are_rejected():
    with pytest.raises(ValueError, match="number of LSTM layers"):
        FusedLSTMEnsemble([_member([4, 4], emb=4), _member([4, 4, 4], emb=4)])


def test_empty_ensemble_and_non_lstm_members_are_rejected():
    with pytest.raises(ValueError, match="at least one member"):
        FusedLSTMEnsemble([])
    with pytest.raises(ValueError, match="must be LSTMLM"):
        FusedLSTMEnsemble([torch.nn.Linear(2, 2)])
