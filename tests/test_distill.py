"""Distillation losses, truncated teacher cache and teachers (sparse_ensembles.distill)."""

import pytest
import torch
import torch.nn.functional as F

from sparse_ensembles import checkpoint
from sparse_ensembles.distill import (EnsembleTeacher, MixtureTeacher, ModelTeacher, TeacherCache, geras_loss,
                                      hinton_cached_loss, hinton_loss, logit_l2_loss, soft_cross_entropy, temper,
                                      truncate_topk, truncation_accuracy_cost, truncation_stats)
from sparse_ensembles.experiments.stages import member_files
from sparse_ensembles.experiments.teachers import teacher_from_run
from sparse_ensembles.models.lstm_lm import LSTMLM
from sparse_ensembles.models.mlp import MLP


def _logits(n=32, c=7, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=g)


def _dense(indices, kept, c):
    return torch.zeros(indices.shape[0], c, dtype=kept.dtype).scatter_add_(1, indices.clamp_min(0), kept)


# -- losses ---------------------------------------------------------------------------------------
def test_geras_lam_zero_is_label_cross_entropy_bit_for_bit():
    s, y = _logits(), torch.randint(0, 7, (32,))
    teacher = _logits(seed=1).softmax(-1)
    assert torch.equal(geras_loss(s, y, teacher, 0.0), F.cross_entropy(s, y))
    assert torch.equal(geras_loss(s, y, teacher, 0), F.cross_entropy(s, y))


def test_geras_lam_one_is_soft_cross_entropy_bit_for_bit():
    s, y = _logits(), torch.randint(0, 7, (32,))
    teacher = _logits(seed=1).softmax(-1)
    assert torch.equal(geras_loss(s, y, teacher, 1.0), soft_cross_entropy(s, teacher))
    trunc = truncate_topk(teacher, 0.9)
    assert torch.equal(geras_loss(s, y, trunc, 1.0), soft_cross_entropy(s, trunc))


def test_geras_mixes_soft_and_hard_terms_and_rejects_bad_lam():
    s, y = _logits(), torch.randint(0, 7, (32,))
    teacher = _logits(seed=1).softmax(-1)
    want = 0.3 * soft_cross_entropy(s, teacher) + 0.7 * F.cross_entropy(s, y)
    assert torch.allclose(geras_loss(s, y, teacher, 0.3), want)
    with pytest.raises(ValueError, match="lam"):
        geras_loss(s, y, teacher, 1.5)


def test_soft_cross_entropy_with_one_hot_teacher_equals_label_cross_entropy():
    s, y = _logits(), torch.randint(0, 7, (32,))
    one_hot = F.one_hot(y, 7).float()
    assert torch.allclose(soft_cross_entropy(s, one_hot), F.cross_entropy(s, y), atol=1e-6)
    # the same as a truncated teacher of one class per row
    assert torch.allclose(soft_cross_entropy(s, (y[:, None], torch.ones(32, 1))), F.cross_entropy(s, y), atol=1e-6)


def test_losses_accept_token_logits_of_a_language_model():
    s, y = torch.randn(2, 5, 9), torch.randint(0, 9, (2, 5))
    teacher = torch.randn(2, 5, 9).softmax(-1)
    assert torch.equal(geras_loss(s, y, teacher, 0.0), F.cross_entropy(s.reshape(-1, 9), y.reshape(-1)))
    assert torch.allclose(soft_cross_entropy(s, teacher), soft_cross_entropy(s.reshape(-1, 9), teacher.reshape(-1, 9)))


def test_hinton_tau_squared_keeps_student_gradient_norm_independent_of_tau():
    """Random logits N(0, 1) (small spread, 64 x 10): ||d loss / d student logits|| at tau = 4 and
    tau = 8 agree within 10% with the tau^2 factor, and differ by ~tau^2 ratio (4x) without it."""
    s, t = _logits(64, 10, seed=2, scale=1.0), _logits(64, 10, seed=3, scale=1.0)

    def grad_norm(tau, scaled=True):
        x = s.clone().requires_grad_()
        loss = hinton_loss(x, t, tau=tau)
        (loss if scaled else loss / tau ** 2).backward()
        return x.grad.norm().item()

    ratio = grad_norm(4.0) / grad_norm(8.0)
    assert abs(ratio - 1) < 0.10, ratio
    assert 3.5 < grad_norm(4.0, scaled=False) / grad_norm(8.0, scaled=False) < 4.5


def test_hinton_loss_is_tau_squared_kl_and_mixes_with_labels():
    s, t, y = _logits(), _logits(seed=1), torch.randint(0, 7, (32,))
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean")
    assert torch.allclose(hinton_loss(s, t, tau=2.0), 4 * kl, atol=1e-6)
    assert torch.equal(hinton_loss(s, t, y, tau=2.0, lam=0.0), F.cross_entropy(s, y))
    assert torch.equal(hinton_loss(s, t, y, tau=2.0, lam=1.0), hinton_loss(s, t, tau=2.0))
    assert torch.equal(hinton_loss(s, t, y, tau=2.0, alpha_soft=0.25), hinton_loss(s, t, y, tau=2.0, lam=0.25))
    # the teacher may be given as log-probabilities (softmax is shift invariant)
    assert torch.allclose(hinton_loss(s, t.log_softmax(-1), tau=3.0), hinton_loss(s, t, tau=3.0), atol=1e-6)


def test_hinton_on_cached_probabilities_has_the_gradient_of_hinton_on_logits_and_tau_one_is_geras():
    """The cache stores probabilities: tau^2 * CE(temper(p), softmax(s / tau)) differs from
    Hinton's tau^2 * KL by a constant, so the student gradients agree, dense and truncated (a
    truncation that keeps every class); at tau = 1 it is the Geras loss bit for bit."""
    s, t, y = _logits(), _logits(seed=1), torch.randint(0, 7, (32,))
    p = t.softmax(-1)
    full = truncate_topk(p, mass=1.0)

    def grad(fn):
        x = s.clone().requires_grad_()
        fn(x).backward()
        return x.grad

    want = grad(lambda x: hinton_loss(x, t, y, tau=3.0, lam=0.7))
    assert torch.allclose(grad(lambda x: hinton_cached_loss(x, y, p, 0.7, 3.0)), want, atol=1e-6)
    assert torch.allclose(grad(lambda x: hinton_cached_loss(x, y, full, 0.7, 3.0)), want, atol=1e-6)
    assert torch.equal(hinton_cached_loss(s, y, full, 0.7, 1.0), geras_loss(s, y, full, 0.7))
    idx, tempered = temper(full, 3.0)
    assert torch.allclose(tempered.sum(-1), torch.ones(32)) and torch.equal(idx, full[0])
    with pytest.raises(ValueError, match="tau"):
        temper(p, 0.0)


def test_logit_l2_is_mean_squared_difference_and_centering_ignores_row_shifts():
    s, t = _logits(), _logits(seed=1)
    assert torch.allclose(logit_l2_loss(s, t), ((s - t) ** 2).mean())
    shifted = t + torch.randn(32, 1)
    assert torch.allclose(logit_l2_loss(s, shifted, center=True), logit_l2_loss(s, t, center=True), atol=1e-5)
    assert not torch.allclose(logit_l2_loss(s, shifted), logit_l2_loss(s, t))


# -- truncation -----------------------------------------------------------------------------------
def test_truncated_rows_sum_to_one_keep_the_requested_mass_and_respect_max_k():
    probs = _logits(200, 50, seed=4, scale=3.0).softmax(-1)
    for mass in (0.5, 0.9, 0.99):
        idx, kept = truncate_topk(probs, mass)
        valid = idx >= 0
        assert torch.allclose(kept.sum(-1), torch.ones(200), atol=1e-6)
        assert torch.all(kept[~valid] == 0)
        original = torch.where(valid, probs.double().gather(1, idx.clamp_min(0)), torch.zeros((), dtype=torch.float64))
        assert torch.all(original.sum(-1) >= mass - 1e-9)
        # the smallest such prefix: without its last kept class a row is below the mass
        last = valid.sum(-1) - 1
        without_last = original.sum(-1) - original.gather(1, last[:, None]).squeeze(1)
        assert torch.all(without_last < mass)
        stats = truncation_stats(probs, idx, kept)
        assert stats["mass_kept_mean"] >= mass and stats["max_kept"] == idx.shape[1]
    idx, kept = truncate_topk(probs, 0.999, max_k=3)
    assert idx.shape[1] <= 3 and torch.allclose(kept.sum(-1), torch.ones(200), atol=1e-6)
    assert torch.equal(idx[:, 0], probs.argmax(-1))


def test_soft_cross_entropy_on_truncated_form_equals_dense_renormalised_truncation():
    s = _logits(40, 30, seed=5)
    probs = _logits(40, 30, seed=6, scale=3.0).softmax(-1)
    idx, kept = truncate_topk(probs, 0.9)
    assert (idx == -1).any()  # padding is exercised
    dense = _dense(idx, kept, 30)
    assert torch.allclose(soft_cross_entropy(s, (idx, kept)), soft_cross_entropy(s, dense), atol=1e-6)
    # the gradient too
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    soft_cross_entropy(a, (idx, kept)).backward()
    soft_cross_entropy(b, dense).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_truncation_accuracy_cost_keeps_argmax_and_reports_nll_change():
    probs = _logits(100, 10, seed=7, scale=2.0).softmax(-1)
    y = torch.randint(0, 10, (100,))
    idx, kept = truncate_topk(probs, 0.8)
    cost = truncation_accuracy_cost(probs, y, idx, kept)
    assert cost["acc_diff"] == 0.0
    assert cost["nll_full"] == pytest.approx(F.nll_loss(probs.log(), y).item(), rel=1e-5)
    assert 0 < cost["label_dropped"] < 1 and cost["nll_diff"] > 0  # dropped labels: floored, NLL rises


# -- cache ----------------------------------------------------------------------------------------
def test_cache_round_trips_exactly_and_lookup_returns_the_right_rows(tmp_path):
    probs = _logits(50, 12, seed=8, scale=2.5).softmax(-1)
    idx, kept = truncate_topk(probs, 0.95)
    cache = TeacherCache.from_truncated(idx, kept, 12, meta={"mass": 0.95})
    cache.save(tmp_path / "teacher.pt")
    back = TeacherCache.load(tmp_path / "teacher.pt")
    assert back.indices.dtype == torch.int32 and back.probs.dtype == torch.float32
    for name in ("indices", "probs", "offsets", "batch_starts"):
        assert torch.equal(getattr(back, name), getattr(cache, name))
    assert back.num_classes == 12 and back.meta == {"mass": 0.95}
    rows = torch.tensor([7, 0, 49, 7, 23])
    li, lp = back.lookup(rows)
    assert li.dtype == torch.long
    assert torch.equal(_dense(li, lp, 12), _dense(idx[rows], kept[rows], 12))
    assert torch.equal(back.dense(rows), _dense(idx[rows], kept[rows], 12))


def test_cache_of_a_streamed_ensemble_matches_the_in_memory_ensemble_teacher(tmp_path):
    torch.manual_seed(1)
    members = [MLP([6, 5, 4]) for _ in range(3)]
    for k, m in enumerate(members):
        checkpoint.save_member(tmp_path / f"member_{k}.pt", m)
    x = torch.randn(23, 6)
    teacher = EnsembleTeacher(members)
    in_memory = TeacherCache.from_teacher(teacher, x, mass=1.0, batch_size=10)
    streamed = TeacherCache.from_members(sorted(tmp_path.glob("member_*.pt")), x, mass=1.0, batch_size=10,
                                         chunk_batches=2)
    assert len(streamed) == 23 and streamed.batch_starts.tolist() == [0, 10, 20, 23]
    assert torch.allclose(streamed.dense(), teacher.log_probs(x).exp(), atol=1e-6)
    assert torch.allclose(in_memory.dense(), streamed.dense(), atol=1e-6)
    assert torch.equal(streamed.lookup_batch(1)[0], streamed.lookup(torch.arange(10, 20))[0])


def test_language_model_cache_carries_each_members_state_across_segments():
    torch.manual_seed(2)
    members = [LSTMLM(9, [4], 3) for _ in range(2)]
    tokens = torch.randint(0, 9, (2, 12))
    segments = [(tokens[:, i:i + 4], None) for i in range(0, 12, 4)]
    cache = TeacherCache.from_members(members, segments, mass=1.0, chunk_batches=1)
    full = EnsembleTeacher(members).log_probs(tokens)  # one pass over the whole stream
    want = torch.cat([full[:, i:i + 4].reshape(-1, 9) for i in range(0, 12, 4)])
    assert torch.allclose(cache.dense(), want.exp(), atol=1e-5)
    state, outs = None, []
    for x, _ in segments:
        logp, state = EnsembleTeacher(members).lm_log_probs(x, state)
        outs.append(logp)
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-5)


# -- teachers -------------------------------------------------------------------------------------
def test_ensemble_teacher_is_the_mean_of_member_softmaxes():
    torch.manual_seed(3)
    members = [MLP([6, 8, 5]) for _ in range(4)]
    x = torch.randn(10, 6)
    want = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
    assert torch.allclose(EnsembleTeacher(members).log_probs(x).exp(), want, atol=1e-6)
    assert torch.allclose(ModelTeacher(members[0]).log_probs(x), members[0](x).log_softmax(-1))


def test_mixture_teacher_is_gamma_pa_plus_one_minus_gamma_pb():
    torch.manual_seed(4)
    a = EnsembleTeacher([MLP([6, 8, 5]) for _ in range(2)])
    b = ModelTeacher(MLP([6, 3, 3, 5]))
    x = torch.randn(10, 6)
    pa, pb = a.log_probs(x).exp(), b.log_probs(x).exp()
    for gamma in (0.0, 0.3, 1.0):
        got = MixtureTeacher(a, b, gamma).log_probs(x).exp()
        assert torch.allclose(got, gamma * pa + (1 - gamma) * pb, atol=1e-6)


def _fake_run(tmp_path):
    (tmp_path / "config.toml").write_text(
        '[experiment]\nname = "t"\n[task]\nkind = "classification"\n[model]\nkind = "mlp"\nsizes = [6, 5, 3]\n'
        '[sgd]\nmembers = 2\n[sampler]\nkind = "sgld"\nsamples = 1\n[prior]\nkind = "group_lasso"\n'
        '[prune]\nsparsities = [0.9]\n')
    torch.manual_seed(5)
    for path in ("sgd/member_000.pt", "sgd/member_001.pt", "sgld_gsp/sample_000.pt", "pruned_90/member_000.pt"):
        checkpoint.save_member(tmp_path / path, MLP([6, 5, 3]))
    return tmp_path


def test_teacher_from_run_picks_rows_by_their_results_name(tmp_path):
    run = _fake_run(tmp_path)
    name, files = member_files(run)
    assert name == "SGLD+GSP+PR 90%" and [f.parent.name for f in files] == ["pruned_90"]
    assert len(teacher_from_run(run, "SGD x1")) == 1 and len(teacher_from_run(run, "SGD x2")) == 2
    x = torch.randn(4, 6)
    first, _ = checkpoint.load_member(run / "sgd" / "member_000.pt")
    assert torch.allclose(teacher_from_run(run, "SGD x1").log_probs(x), first(x).log_softmax(-1))
    with pytest.raises(ValueError, match=r"available rows: \['SGD x1', 'SGD x2', 'SGLD\+GSP x1', 'SGLD\+GSP\+PR 90%'\]"):
        teacher_from_run(run, "SGLD x3")
