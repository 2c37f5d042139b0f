"""The one-call API (issue 25): SparseEnsemble(model, budget).fit(train, valid) on a user's own model."""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sparse_ensembles.fit import CollapseWarning, Recipe, SparseEnsemble, prunability
from sparse_ensembles.models.mlp import CompactMLP

SMALL = dict(sgd_epochs=3, sgd_lr=0.1, burn_in=2, thin=1, members=(2, 3), sparsities=(0.5, 0.8),
             retrain_epochs=2, retrain_lr=0.05)


def _data(seed=0, n=600):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x @ torch.randn(20, 3, generator=g) + 0.5 * torch.randn(n, 3, generator=g)).argmax(1)
    train = DataLoader(TensorDataset(x[:400], y[:400]), batch_size=50, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    valid = DataLoader(TensorDataset(x[400:], y[400:]), batch_size=100)
    return x, y, train, valid


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))


def test_fit_chooses_the_lowest_valid_nll_within_the_budget_and_returns_compacted_members(tmp_path):
    x, y, train, valid = _data()
    ens = SparseEnsemble(_net(), budget={"params": 1.0}, recipe=Recipe(**SMALL), workdir=tmp_path, progress=False)
    ens.fit(train, valid)
    rows = ens.candidates
    assert len(rows) == 1 + 2 * 2  # the dense network, 2 sparsities x 2 member counts
    eligible = [r for r in rows if r["params_ratio"] <= 1.0]
    assert [r["within_budget"] for r in rows] == [r["params_ratio"] <= 1.0 for r in rows]
    assert ens.chosen["valid_nll"] == min(r["valid_nll"] for r in eligible)
    assert sum(r["chosen"] for r in rows) == 1
    if ens.chosen["chain"] is not None:
        assert len(ens.members) == ens.chosen["members"]
        assert all(isinstance(m, CompactMLP) for m in ens.members)
    out = ens(x[:7])
    assert out.shape == (7, 3) and torch.allclose(out.exp().sum(-1), torch.ones(7), atol=1e-5)
    assert "<- chosen" in ens.report(print_table=False)
    assert all(r["latency_ms"] > 0 for r in rows) and rows[0]["latency_ratio"] == 1.0
    assert (tmp_path / "fit.json").exists() and (tmp_path / "frontier.png").stat().st_size > 5000


def test_fit_resumes_from_its_workdir_without_retraining_and_refuses_other_settings(tmp_path):
    _, _, train, valid = _data()
    first = SparseEnsemble(_net(), recipe=Recipe(**SMALL), workdir=tmp_path, progress=False).fit(train, valid)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("member_*.pt")}
    again = SparseEnsemble(_net(), recipe=Recipe(**SMALL), workdir=tmp_path, progress=False).fit(train, valid)
    assert [r["valid_nll"] for r in again.candidates] == [r["valid_nll"] for r in first.candidates]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("member_*.pt")} == stamps  # nothing retrained
    wider = SparseEnsemble(_net(), recipe=Recipe(**{**SMALL, "sparsities": (0.5, 0.8, 0.9)}), workdir=tmp_path,
                           progress=False).fit(train, valid)  # a wider grid reuses the chain and members on disk
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(wider.candidates) == 1 + 3 * 2
    with pytest.raises(ValueError, match="holds a fit made with other retrain_epochs"):
        SparseEnsemble(_net(), recipe=Recipe(**{**SMALL, "retrain_epochs": 3}), workdir=tmp_path,
                       progress=False).fit(train, valid)


def test_save_and_load_round_trip_gives_the_same_outputs_from_tensors_only(tmp_path):
    x, _, train, valid = _data()
    ens = SparseEnsemble(_net(), budget={"params": 2.0}, recipe=Recipe(**SMALL), workdir=tmp_path / "w",
                         progress=False).fit(train, valid)
    ens.save(tmp_path / "saved")
    torch.load(tmp_path / "saved" / "tensors.pt", weights_only=True)  # no pickled code in the file
    back = SparseEnsemble.load(tmp_path / "saved")
    assert torch.equal(back(x[:50]), ens(x[:50]))
    assert back.chosen == ens.chosen


class _OwnNet(nn.Module):
    """Not an nn.Sequential, nor a chain torch.fx can map to one (it scales a hidden layer): fit falls
    back to unstructured masks at full size."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(20, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(2.0 * torch.tanh(self.a(x)))


class _DictData(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": self.y[i]}


def test_an_unsupported_model_falls_back_to_masks_at_full_size_and_dict_batches_work(tmp_path):
    x, y, _, _ = _data()
    train = DataLoader(_DictData(x[:400], y[:400]), batch_size=50, shuffle=True)
    valid = DataLoader(_DictData(x[400:], y[400:]), batch_size=100)
    torch.manual_seed(0)
    net = _OwnNet()
    report = prunability(net)
    assert not report["compacts"] and "not an nn.Sequential" in report["reason"]
    ens = SparseEnsemble(net, budget={"params": 2.0}, recipe=Recipe(**{**SMALL, "sparsities": (0.8,), "members": (2,)}),
                         workdir=tmp_path / "w", progress=False).fit(train, valid)
    pruned = [r for r in ens.candidates if r["chain"]]
    assert pruned and all(0.3 < r["params_ratio"] < 0.6 for r in pruned)  # 2 members at 80%: masks, not removal
    ens.save(tmp_path / "saved")
    with pytest.raises(ValueError, match="pass it: SparseEnsemble.load"):
        SparseEnsemble.load(tmp_path / "saved")
    if ens.chosen["chain"] is not None:
        back = SparseEnsemble.load(tmp_path / "saved", model=_OwnNet())
        assert torch.equal(back(x[:9]), ens(x[:9]))


def test_prunability_names_the_layer_that_cannot_be_compacted():
    report = prunability(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)))
    assert not report["compacts"] and "only groups=1" in report["reason"]
    assert prunability(_net())["compacts"]
    assert prunability(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)))["compacts"]


@pytest.mark.filterwarnings("ignore::sparse_ensembles.fit.CollapseWarning")
def test_fit_on_a_user_cnn_returns_members_shrunk_to_fewer_channels(tmp_path):
    from sparse_ensembles.models.sequential import CompactSequential
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()  # top half brighter than the bottom
    train = DataLoader(TensorDataset(x[:200], y[:200]), batch_size=50, shuffle=True)
    valid = DataLoader(TensorDataset(x[200:], y[200:]), batch_size=100)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 2))
    rec = Recipe(**{**SMALL, "sparsities": (0.8,), "members": (2,), "lams": (30.0,), "group_threshold": 0.05})
    ens = SparseEnsemble(net, budget=None, recipe=rec, workdir=tmp_path / "w", progress=False).fit(train, valid)
    row = next(r for r in ens.candidates if r["chain"])
    assert row["flops_ratio"] < 2.0  # two members at 80% cost less than two dense networks
    ens.members = nn.ModuleList(ens._member(None, tmp_path / "w" / "chain_lam30_T0.01" / f"sample_{k:03d}.pt", 0.8,
                                            k, train) for k in range(2))
    assert all(isinstance(m, CompactSequential) for m in ens.members)
    assert all(m[0].out_channels < 8 for m in ens.members)  # whole channels went: physically smaller


def test_collapse_warning_fires_for_a_chain_at_temperature_zero_with_a_tiny_step_and_not_for_a_healthy_one(tmp_path):
    _, _, train, valid = _data()
    frozen = Recipe(**{**SMALL, "temperatures": (0.0,), "chain_lr": 1e-6, "sparsities": (0.5,), "members": (3,)})
    with pytest.warns(CollapseWarning, match="nearly one network"):
        SparseEnsemble(_net(), recipe=frozen, workdir=tmp_path / "a", progress=False).fit(train, valid)
    healthy = Recipe(**{**SMALL, "temperatures": (1.0,), "chain_lr": 0.1, "sparsities": (0.5,), "members": (3,)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        ens = SparseEnsemble(_net(), recipe=healthy, workdir=tmp_path / "b", progress=False).fit(train, valid)
    d = ens.diagnostics["lam3_T1"]
    assert d["disagreement"] > 0.01 and d["relative_distance"] > 1e-3


def test_successive_halving_gives_the_full_search_to_the_better_half_of_the_grid(tmp_path):
    _, _, train, valid = _data()
    rec = Recipe(**{**SMALL, "lams": (0.1, 30.0), "sparsities": (0.5,), "members": (2,)})
    ens = SparseEnsemble(_net(), recipe=rec, workdir=tmp_path, progress=False).fit(train, valid)
    halving = ens.diagnostics["halving"]
    assert len(halving) == 2
    winner = min(halving, key=lambda h: h["valid_nll"])
    assert {r["chain"] for r in ens.candidates if r["chain"]} == {f"lam{winner['lam']:g}_T0.01"}


def test_bad_recipe_and_budget_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match="Recipe.sparsities"):
        SparseEnsemble(_net(), recipe={"sparsities": (1.2,)})
    with pytest.raises(ValueError, match="budget must map"):
        SparseEnsemble(_net(), budget={"memory": 1.0})
    with pytest.raises(ValueError, match="task 'segmentation'"):
        SparseEnsemble(_net(), task="segmentation")


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_export_writes_one_graph_with_a_dynamic_batch_equal_to_eager(tmp_path, suffix):
    x, _, train, valid = _data()
    ens = SparseEnsemble(_net(), budget={"params": 2.0}, recipe=Recipe(**{**SMALL, "sparsities": (0.5,), "members": (3,)}),
                         workdir=tmp_path / "w", progress=False).fit(train, valid)
    assert ens.chosen["members"] == 3  # 3 members at 50% fit 2x and beat the dense network on valid here
    out = ens.export(tmp_path / f"ens{suffix}", x[:64], repeats=3)
    assert out["max_abs_diff"] <= 1e-5 and out["exported_ms"] > 0
    other = x[100:117]  # another batch size: the batch dimension was exported as dynamic
    if suffix == ".pt2":
        got = torch.export.load(str(tmp_path / "ens.pt2")).module()(other)
    else:
        import onnxruntime
        sess = onnxruntime.InferenceSession(str(tmp_path / "ens.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"x": other.numpy()})[0])
    torch.testing.assert_close(got, ens(other), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="writes \\*.onnx or \\*.pt2"):
        ens.export(tmp_path / "ens.bin", x[:8])


def _regression_data(seed=0, n=500):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 5, generator=g) * 4 - 2
    noise = 0.1 + 0.3 * (x[:, 0] > 0)  # heteroscedastic: the learned variance has something to learn
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] + noise * torch.randn(n, generator=g)
    train = DataLoader(TensorDataset(x[:300], y[:300]), batch_size=50, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    return x, y, train, DataLoader(TensorDataset(x[300:], y[300:]), batch_size=100)


@pytest.mark.parametrize("outputs,task", [(2, "regression"), (1, "fixed")])
def test_regression_fit_scores_rmse_mixture_nll_and_coverage_and_returns_mean_and_variance(tmp_path, outputs, task):
    from sparse_ensembles.fit import Regression
    x, y, train, valid = _regression_data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, outputs))
    objective = "regression" if task == "regression" else Regression(noise_std=0.3)
    rec = Recipe(**{**SMALL, "sgd_epochs": 20, "sgd_lr": 0.05, "chain_lr": 0.01, "retrain_lr": 0.01,
                    "sparsities": (0.5,), "members": (3,)})
    ens = SparseEnsemble(net, task=objective, budget={"params": 2.0}, recipe=rec, workdir=tmp_path / "w",
                         progress=False).fit(train, valid)
    row = ens.candidates[0]
    assert {"valid_rmse", "valid_nll", "valid_coverage95"} <= set(row)
    assert row["valid_rmse"] < float(y[300:].std())  # it learned something
    assert 0.0 <= row["valid_coverage95"] <= 1.0
    out = ens(x[:10])
    assert out.shape == (10, 2) and bool((out[:, 1] > 0).all())
    if task == "fixed" and ens.chosen["members"] == 1:
        torch.testing.assert_close(out[:, 1], torch.full((10,), 0.09))
    assert "valid rmse" in ens.report(print_table=False)
    ens.save(tmp_path / "saved")
    torch.testing.assert_close(SparseEnsemble.load(tmp_path / "saved")(x[:10]), out)


def test_regression_metrics_of_a_mixture_equal_the_closed_forms():
    from sparse_ensembles.metrics import regression_metrics
    y = torch.tensor([0.0, 1.0])
    mean = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    var = torch.tensor([[1.0, 1.0], [0.25, 0.25]])
    got = regression_metrics(mean, var, y)
    normal = lambda v, d: torch.exp(-0.5 * d * d / v) / torch.sqrt(2 * torch.pi * torch.tensor(v))  # noqa: E731
    nll0 = -torch.log(0.5 * (normal(1.0, torch.tensor(0.0)) + normal(1.0, torch.tensor(2.0))))
    nll1 = -torch.log(normal(0.25, torch.tensor(0.0)))
    assert got["nll"] == pytest.approx(float(nll0 + nll1) / 2, rel=1e-6)
    assert got["rmse"] == pytest.approx((1.0 / 2) ** 0.5)  # mixture means 1 and 1 against 0 and 1
    # example 0: mixture variance 1 + 1 = 2, |0 - 1| <= 1.96 sqrt(2): inside; example 1 inside
    assert got["coverage95"] == 1.0


def test_a_latency_budget_chooses_among_candidates_whose_measured_latency_fits(tmp_path):
    _, _, train, valid = _data()
    ens = SparseEnsemble(_net(), budget={"latency": 1.5}, recipe=Recipe(**{**SMALL, "sparsities": (0.5,)}),
                         workdir=tmp_path, progress=False).fit(train, valid)
    assert all(r["within_budget"] == (r["latency_ratio"] <= 1.5 + 1e-12) for r in ens.candidates)
    assert ens.chosen["latency_ratio"] <= 1.5
    with pytest.raises(ValueError, match="latency budget needs Recipe.latency_repeats"):
        SparseEnsemble(_net(), budget={"latency": 1.5}, recipe=Recipe(**{**SMALL, "latency_repeats": 0}),
                       workdir=tmp_path / "b", progress=False).fit(train, valid)


class _ChainNet(nn.Module):
    """Not an nn.Sequential, but its forward is a chain that torch.fx can trace."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        x = self.pool(nn.functional.relu(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(20, 20)
        self.b = nn.Linear(20, 3)

    def forward(self, x):
        return self.b(x + self.a(x))


def test_a_module_whose_forward_is_a_chain_is_traced_into_a_sequential_that_compacts():
    from sparse_ensembles.models.sequential import as_sequential
    net = _ChainNet()
    seq = as_sequential(net)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(seq(x), net(x))
    report = prunability(net)
    assert report["compacts"] and "traced by torch.fx as a chain" in report["reason"]
    report = prunability(_Residual())
    assert not report["compacts"] and "'add'" in report["reason"] and "only tensor input" in report["reason"]


def test_a_budget_no_candidate_meets_is_refused_naming_the_lowest_ratios_and_keeping_the_candidates(tmp_path):
    _, _, train, valid = _data()
    with pytest.raises(ValueError, match=r"no candidate fits the budget \{'params': 0.01\}.*lowest ratios"):
        SparseEnsemble(_net(), budget={"params": 0.01}, recipe=Recipe(**SMALL), workdir=tmp_path, progress=False).fit(
            train, valid)
    assert (tmp_path / "fit.json").exists()


def test_a_one_output_regression_ensemble_exports_with_a_dynamic_batch(tmp_path):
    from sparse_ensembles.fit import Regression
    x, y, train, valid = _regression_data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
    rec = Recipe(**{**SMALL, "sgd_lr": 0.05, "chain_lr": 0.01, "retrain_lr": 0.01, "sparsities": (0.5,), "members": (2,)})
    ens = SparseEnsemble(net, task=Regression(0.3), budget={"params": 2.0}, recipe=rec, workdir=tmp_path / "w",
                         progress=False).fit(train, valid)
    out = ens.export(tmp_path / "r.pt2", x[:8], repeats=1)
    assert out["max_abs_diff"] <= 1e-5
    torch.testing.assert_close(torch.export.load(str(tmp_path / "r.pt2")).module()(x[:3]), ens(x[:3]))


@pytest.mark.parametrize("loader_generator", [True, False])
def test_a_fit_killed_mid_chain_and_resumed_ends_bit_for_bit_like_an_uninterrupted_one(tmp_path, monkeypatch,
                                                                                        loader_generator):
    import sparse_ensembles.fit as fit_module

    x, y, _, valid = _data()

    def loader():  # shuffled, with its own generator or drawing from the global RNG
        gen = torch.Generator().manual_seed(5) if loader_generator else None
        return DataLoader(TensorDataset(x[:400], y[:400]), batch_size=50, shuffle=True, generator=gen)

    recipe = Recipe(**{**SMALL, "burn_in": 3, "members": (2,), "sparsities": (0.5,)})
    whole = SparseEnsemble(_net(), recipe=recipe, workdir=tmp_path / "whole", progress=False).fit(loader(), valid)

    real, calls = fit_module.train_epoch, []

    def dies_in_the_chain(*args, where="", **kwargs):
        calls.append(where)
        if where.startswith("SGLD chain") and sum(c.startswith("SGLD chain") for c in calls) == 3:
            raise KeyboardInterrupt  # killed during the chain's third epoch (two are checkpointed)
        return real(*args, where=where, **kwargs)

    monkeypatch.setattr(fit_module, "train_epoch", dies_in_the_chain)
    with pytest.raises(KeyboardInterrupt):
        SparseEnsemble(_net(), recipe=recipe, workdir=tmp_path / "cut", progress=False).fit(loader(), valid)
    assert list((tmp_path / "cut").rglob("chain.ckpt"))  # the chain stopped part-way
    monkeypatch.undo()
    torch.manual_seed(1234)  # a new process: the global RNG is wherever it is
    resumed = SparseEnsemble(_net(), recipe=recipe, workdir=tmp_path / "cut", progress=False).fit(loader(), valid)
    assert torch.equal(resumed(x[:50]), whole(x[:50]))
    assert [r["valid_nll"] for r in resumed.candidates] == [r["valid_nll"] for r in whole.candidates]


@pytest.mark.filterwarnings("ignore::sparse_ensembles.fit.CollapseWarning")
def test_fit_on_the_built_in_resnet20_kind_shrinks_members_to_fewer_channels_and_reloads_them(tmp_path):
    from sparse_ensembles.models.resnet20 import ResNet20
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    train = DataLoader(TensorDataset(x[:200], y[:200]), batch_size=50, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    valid = DataLoader(TensorDataset(x[200:], y[200:]), batch_size=100)
    torch.manual_seed(0)
    net = ResNet20([1, 8, 8], 2, [4, 8, 8])  # residual: not a chain, so only the kind's own structure shrinks it
    report = prunability(net)
    assert report["compacts"] and "resnet20" in report["reason"]
    rec = Recipe(**{**SMALL, "sparsities": (0.8,), "members": (2,), "lams": (30.0,), "group_threshold": 0.05})
    ens = SparseEnsemble(net, budget=None, recipe=rec, workdir=tmp_path / "w", progress=False).fit(train, valid)
    members = ens._member(None, tmp_path / "w" / "chain_lam30_T0.01" / "sample_000.pt", 0.8, 0, train)
    assert isinstance(members, ResNet20) and sum(members.inner) < sum(net.inner)  # conv1 channels removed
    row = next(r for r in ens.candidates if r["chain"])
    assert row["params_ratio"] < 2.0 and row["flops_ratio"] < 2.0
    ens.save(tmp_path / "ens")
    again = SparseEnsemble.load(tmp_path / "ens")
    torch.testing.assert_close(again(x[200:]), ens.eval()(x[200:]), atol=1e-6, rtol=0)


def _token_segments(seed=0, vocab=12, n=6000, rows=10, bptt=10):
    """A stream where each word mostly follows from the last (w -> 3w + 1 mod vocab), in BPTT segments."""
    from sparse_ensembles.data.text import batchify, bptt_segments
    g = torch.Generator().manual_seed(seed)
    words = [0]
    for _ in range(n - 1):
        words.append((3 * words[-1] + 1) % vocab if torch.rand(1, generator=g) < 0.8
                     else int(torch.randint(vocab, (1,), generator=g)))
    stream = torch.tensor(words)
    return (list(bptt_segments(batchify(stream[:5000], rows), bptt)),
            list(bptt_segments(batchify(stream[5000:], rows), bptt)))


@pytest.mark.filterwarnings("ignore::sparse_ensembles.fit.CollapseWarning")
def test_fit_on_an_lstm_language_model_scores_perplexity_and_shrinks_members_by_iss(tmp_path):
    from sparse_ensembles.models.lstm_lm import LSTMLM
    train, valid = _token_segments()
    torch.manual_seed(0)
    net = LSTMLM(12, [16, 16], 8, init_scale=0.1, grouping="iss")
    rec = Recipe(**{**SMALL, "sgd_epochs": 8, "sgd_lr": 5.0, "sgd_decay_every": 100, "chain_lr": 5.0, "retrain_lr": 2.5,
                    "max_grad_norm": 5.0, "lams": (0.3,), "sparsities": (0.5,), "members": (2,), "group_threshold": 0.06})
    ens = SparseEnsemble(net, task="language_model", budget=None, recipe=rec, workdir=tmp_path / "w",
                         progress=False).fit(train, valid)
    dense, sparse = ens.candidates[0], next(r for r in ens.candidates if r["chain"])
    assert dense["valid_ppl"] < 4.0  # learnt the rule: a uniform guess is 12, the stream's entropy about 2.5
    assert sparse["valid_ppl"] == pytest.approx(math.exp(sparse["valid_nll"]))
    member = ens._member(None, tmp_path / "w" / "chain_lam0.3_T0.01" / "sample_000.pt", 0.5, 0, train)
    assert isinstance(member, LSTMLM) and sum(member.hidden) < 32  # ISS removed whole LSTM units
    x = valid[0][0]
    out = ens.eval()(x)  # log mean_m p_m(w) over the vocabulary, each member from a zero state
    assert out.shape == (10, 10, 12) and torch.allclose(out.exp().sum(-1), torch.ones(10, 10), atol=1e-5)
    ens.save(tmp_path / "ens")
    torch.testing.assert_close(SparseEnsemble.load(tmp_path / "ens")(x), out, atol=1e-6, rtol=0)
    for suffix in (".pt2", ".onnx"):  # the members' LSTMs unrolled into one graph, batch rows dynamic
        assert ens.export(tmp_path / f"lm{suffix}", x, repeats=3)["max_abs_diff"] <= 1e-5


def test_a_stateful_model_and_a_stateless_task_are_refused_naming_the_fix():
    from sparse_ensembles.models.lstm_lm import LSTMLM
    with pytest.raises(ValueError, match="task=\"language_model\""):
        SparseEnsemble(LSTMLM(50, [8], 8), progress=False)
    with pytest.raises(ValueError, match="stateful"):
        SparseEnsemble(_net(), task="language_model", progress=False)
