"""Block-sparse LSTMs through the library and the CLI: schedules, masks that stay zero, the tiny
PTB block config end to end."""
import json
from pathlib import Path

import pytest
import torch

from conftest import need_data
from sparse_ensembles import pruning
from sparse_ensembles.experiments.cli import main
from sparse_ensembles.experiments.config import SGDConfig, need
from sparse_ensembles.models import LSTMLM
from sparse_ensembles.priors import BlockLasso
from sparse_ensembles.samplers import SGLD
from sparse_ensembles.training import Constrained, Holder

ROOT = Path(__file__).resolve().parents[1]
TINY_BLOCK = str(ROOT / "configs" / "tiny_lm_block.toml")


def _sgd(**kw) -> SGDConfig:
    c = SGDConfig(**kw)
    c.validate(need)
    return c


def test_linear_and_cubic_schedules_rise_from_their_start_epoch_and_reach_the_target():
    lin = _sgd(epochs=10, prune="gradual", sparsity=0.8, prune_start=2, prune_ramp=4)
    assert [lin.pruned_fraction(e) for e in range(10)] == pytest.approx([0, 0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8, 0.8])
    cub = _sgd(epochs=10, prune="gradual", sparsity=0.8, prune_schedule="cubic", prune_start=1, prune_ramp=3)
    fr = [cub.pruned_fraction(e) for e in range(10)]
    assert fr[0] == 0 and fr[3] == pytest.approx(0.8) and all(a <= b for a, b in zip(fr, fr[1:]))
    assert fr[1] > 0.8 / 3  # cubic prunes fast at first
    assert _sgd(prune="pre", sparsity=0.5).pruned_fraction(0) == 0.5


def test_a_gradual_ramp_that_ends_after_the_last_epoch_is_a_config_error():
    with pytest.raises(ValueError, match="prune_ramp"):
        _sgd(epochs=5, prune="gradual", sparsity=0.8, prune_start=3, prune_ramp=4)


def test_random_pre_pruning_removes_the_fraction_of_blocks_in_each_matrix():
    model = LSTMLM(50, [40], 40, block=(16, 16))
    params = dict(model.named_parameters())
    fams = model.groups("block")
    masks = pruning.random_group_masks(params, fams, 0.75, torch.Generator().manual_seed(0))
    pruning.apply_masks(model, masks)
    for fam in fams:
        zero = (fam.sq_norms(params) == 0).float().mean().item()
        assert zero == pytest.approx(round(0.75 * fam.size) / fam.size)
    again = pruning.random_group_masks(params, fams, 0.75, torch.Generator().manual_seed(0))
    assert all(torch.equal(masks[n], again[n]) for n in masks)


def _lm_loss(model, tokens):
    logits, _ = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def test_frozen_blocks_stay_exactly_zero_through_momentum_sgd_with_the_block_lasso():
    torch.manual_seed(0)
    model = LSTMLM(30, [24], 24, block=(8, 8))
    params = dict(model.named_parameters())
    fams = model.groups("block")
    tokens = torch.randint(0, 30, (4, 9))
    sgd = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    # momentum built up before pruning must not move the frozen blocks afterwards
    opt = Constrained(sgd, params, BlockLasso(fams, 1e-3), Holder({}))
    for _ in range(3):
        opt.zero_grad()
        _lm_loss(model, tokens).backward()
        opt.step()
    opt.masks.value = pruning.group_masks(params, fams, sparsity=0.5)
    pruning.apply_masks(model, opt.masks.value)
    for _ in range(5):
        opt.zero_grad()
        _lm_loss(model, tokens).backward()
        opt.step()
    for name, keep in opt.masks.value.items():
        assert torch.equal(params[name].detach()[~keep], torch.zeros(int((~keep).sum())))
        assert params[name].detach()[keep].abs().sum() > 0
    assert pruning.group_sparsity(params, fams) == pytest.approx(0.5, abs=0.05)


def test_pre_pruned_blocks_stay_exactly_zero_through_sgld_noise():
    torch.manual_seed(0)
    model = LSTMLM(30, [24], 24, block=(8, 8))
    params = dict(model.named_parameters())
    fams = model.groups("block")
    masks = pruning.random_group_masks(params, fams, 0.8, torch.Generator().manual_seed(1))
    pruning.apply_masks(model, masks)
    sampler = SGLD(model.named_parameters(), 0.1, num_data=1000, temperature=1.0,
                   prior=BlockLasso(fams, 1.0), masks=masks, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(0, 30, (4, 9))
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(5):
        sampler.zero_grad()
        _lm_loss(model, tokens).backward()
        sampler.step()
    sampler.synchronize()
    for name, keep in masks.items():
        assert torch.equal(params[name].detach()[~keep], torch.zeros(int((~keep).sum())))
        assert not torch.equal(params[name].detach()[keep], before[name][keep])  # the kept ones moved


def test_tiny_block_config_trains_gradually_pruned_sgd_and_block_sparse_sse_members(tmp_path):
    need_data("ptb")
    out = tmp_path / "tiny_block"
    assert main(["run", TINY_BLOCK, "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["SGD x1", "SGLD+GSP x2", "SGLD+GSP+PR 80%"]
    sgd = torch.load(out / "sgd" / "member_000.pt", weights_only=True)
    assert sgd["meta"]["group_sparsity"] == pytest.approx(0.8, abs=0.03)  # 8x8 blocks of 128x32 matrices
    trace = json.loads((out / "sgd" / "group_norms_000.json").read_text())
    assert [t["epoch"] for t in trace] == [0, 1, 2, 3] and trace[0]["shape"] == [16, 4]
    assert trace[0]["group_sparsity"] == 0 and trace[-1]["group_sparsity"] == pytest.approx(0.8, abs=0.03)
    for f in sorted((out / "pruned_80").glob("member_*.pt")):
        meta = torch.load(f, weights_only=True)["meta"]
        assert meta["block_sparsity"] >= 0.79
    assert all(r["ppl_test"] < 10000 for r in rows)


def test_gradual_retraining_of_block_pruned_samples_ramps_from_no_pruned_blocks_to_the_target(tmp_path, monkeypatch):
    """retrain.ramp_epochs with prune.structure = "blocks": the block sparsity rises along the cubic
    schedule from the sample's (none pruned) to the target; it used to start at the target (one-shot),
    because the empty mask set of a sample counted as fully pruned."""
    need_data("ptb")
    from sparse_ensembles.experiments.stages import PruneRetrain
    asked = []
    masks = PruneRetrain.masks

    def recorded(self, ctx, model, sparsity, *args, **kw):
        asked.append(sparsity)
        return masks(self, ctx, model, sparsity, *args, **kw)
    monkeypatch.setattr(PruneRetrain, "masks", recorded)
    out = tmp_path / "ramp"
    assert main(["run", TINY_BLOCK, "--out", str(out), "--no-progress", "--set", "sgd.members=0",
                 "--set", "sampler.samples=1", "--set", "retrain.epochs=3", "--set", "retrain.ramp_epochs=2"]) == 0
    # the sample's own masks, then epochs 0, 1, 2 at cubic_sparsity(t, 0, 0.8, 2) = 0, 0.7, 0.8
    assert asked == pytest.approx([0.0, 0.0, 0.7, 0.8])
    meta = torch.load(out / "pruned_80" / "member_000.pt", weights_only=True)["meta"]
    assert meta["block_sparsity"] >= 0.79


def test_mlp_block_grouping_tiles_every_weight_matrix_once_with_smaller_edge_blocks():
    from sparse_ensembles.models import MLP
    torch.manual_seed(0)
    model = MLP([30, 20, 7], block=(8, 16))
    params = dict(model.named_parameters())
    fams = model.groups("block")
    assert [f.params[0] for f in fams] == [n for n, p in params.items() if p.dim() == 2]
    for fam in fams:
        w = params[fam.params[0]]
        count = fam.broadcast(torch.ones(fam.size), fam.params[0], w)
        assert torch.equal(count, torch.ones_like(w))  # each entry in exactly one block
        torch.testing.assert_close(fam.sq_norms(params).sum(), w.detach().pow(2).sum())
    assert [f.grid for f in fams] == [(3, 2), (1, 2)]  # 20x30 in 8x16 blocks; 7x20 (block clipped to 7 rows)
    assert MLP.from_spec(model.spec()).block == [8, 16]


def test_an_unknown_sgd_grouping_is_a_config_error_before_any_training(tmp_path, capsys):
    need_data("ptb")
    out = tmp_path / "bad"
    assert main(["run", TINY_BLOCK, "--out", str(out), "--no-progress", "--set", "sgd.grouping=blocks"]) != 0
    assert "sgd.grouping" in capsys.readouterr().err
    assert not (out / "sgd").exists() or not list((out / "sgd").glob("member_*.pt"))


def test_block_kernel_training_runs_the_kernel_and_matches_the_dense_path(tmp_path, monkeypatch):
    """experiment.block_kernel: the SGD member (gradual block pruning) and the retrained block-pruned
    members train on the compiled block-sparse layer (each step split over 2 threads) and end where
    the dense path ends (float reassociation; with dropout, so the kernel must not move the RNG);
    members are saved as plain LSTMLMs either way."""
    need_data("ptb")
    from sparse_ensembles.compact import block_lstm as bl
    calls = {"n": 0}
    forward = bl.BlockSparseLSTMFunction.forward

    def counted(*args, **kw):
        calls["n"] += 1
        return forward(*args, **kw)
    monkeypatch.setattr(bl.BlockSparseLSTMFunction, "forward", staticmethod(counted))
    runs = {}
    kernel = "numba_parallel"
    for executor in ("off", kernel):
        out = tmp_path / executor
        calls["n"] = 0
        assert main(["run", TINY_BLOCK, "--out", str(out), "--no-progress", "--set",
                     f"experiment.block_kernel='{executor}'", "--set", "sampler.samples=1",
                     "--set", "experiment.threads=2", "--set", "model.dropout=0.2"]) == 0
        runs[executor] = (out, calls["n"], json.loads((out / "results.json").read_text()))
    assert runs["off"][1] == 0
    # 2 layers x (3 SGD epochs + 1 retraining epoch) x 50 minibatches of 20 x 20 tokens
    assert runs[kernel][1] == 2 * 4 * 50
    for stage in ("sgd/member_000.pt", "pruned_80/member_000.pt"):
        a, b = (torch.load(runs[e][0] / stage, weights_only=True)["state_dict"] for e in ("off", kernel))
        assert a.keys() == b.keys() and not any("keep" in k for k in a)
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=0, msg=f"{stage}: {k}")  # 4e-7 measured
    for ra, rb in zip(runs["off"][2], runs[kernel][2]):
        assert rb["ppl_valid"] == pytest.approx(ra["ppl_valid"], rel=1e-5)


def test_block_kernel_on_a_model_without_lstm_layers_or_an_unknown_value_is_a_config_error():
    from sparse_ensembles.experiments import config as config_mod
    with pytest.raises(config_mod.ConfigError, match="experiment.block_kernel.*lstm_lm"):
        config_mod.load(ROOT / "configs" / "tiny.toml", ["experiment.block_kernel='auto'"])
    with pytest.raises(config_mod.ConfigError, match="experiment.block_kernel.*'off'"):
        config_mod.load(TINY_BLOCK, ["experiment.block_kernel='yes'"])
    assert config_mod.load(TINY_BLOCK, ["experiment.block_kernel='auto'"]).experiment.block_kernel == "auto"


def test_global_block_scope_removes_the_weakest_blocks_of_all_matrices_until_the_weight_fraction_is_reached():
    """scope="global": one norm threshold over every matrix's blocks (edge blocks counted by their own
    entries), removing the target fraction of all weights; the families' own sparsities differ."""
    torch.manual_seed(0)
    model = LSTMLM(50, [40], 40, block=(16, 16), block_softmax=True, softmax_block=(8, 8))
    params = dict(model.named_parameters())
    fams = model.groups("block")
    with torch.no_grad():  # the softmax weight 10x smaller than the LSTM's: global pruning takes it first
        params["decoder.weight"].mul_(0.1)
    masks = pruning.group_masks(params, fams, sparsity=0.6, scope="global")
    total = sum(params[f.param].numel() for f in fams)
    removed = sum(int((~masks[f.param]).sum()) for f in fams)
    biggest = max(min(f.tile[0], f.shape[0]) * min(f.tile[1], f.shape[1]) for f in fams)
    assert abs(removed - 0.6 * total) <= biggest / 2  # within half a block of the target
    masked = {n: p * masks[n] if n in masks else p for n, p in params.items()}
    kept_score = {f.param: f.sq_norms(masked) > 0 for f in fams}
    rms = {f.param: f.sq_norms(params).sqrt() / (f.tile[0] * f.tile[1]) ** 0.5 for f in fams}  # the pruning score
    lowest_kept = min(float(rms[n][k].min().detach()) for n, k in kept_score.items() if k.any())
    highest_removed = max(float(rms[n][~k].max().detach()) for n, k in kept_score.items() if (~k).any())
    assert highest_removed <= lowest_kept  # one threshold over all matrices
    frac = {f.param: 1 - float(kept_score[f.param].float().mean()) for f in fams}
    assert frac["decoder.weight"] > 0.9 and frac["lstms.0.weight_hh_l0"] < 0.6
    per_matrix = pruning.group_masks(params, fams, sparsity=0.6)  # the default: 60% of each matrix's blocks
    for f in fams:
        zero = (f.sq_norms({f.param: params[f.param] * per_matrix[f.param]}) == 0).float().mean().item()
        assert zero == pytest.approx(round(0.6 * f.size) / f.size)
    with pytest.raises(ValueError, match="scope"):
        pruning.group_masks(params, fams, sparsity=0.6, scope="layer")


def test_prune_block_scope_reaches_block_pruning_of_samples_and_is_refused_for_weight_pruning(tmp_path, monkeypatch):
    need_data("ptb")
    scopes = []
    group_masks = pruning.group_masks

    def recorded(*args, **kw):
        scopes.append(kw.get("scope"))
        return group_masks(*args, **kw)
    monkeypatch.setattr(pruning, "group_masks", recorded)
    out = tmp_path / "global"
    assert main(["run", TINY_BLOCK, "--out", str(out), "--no-progress", "--set", "sgd.members=0",
                 "--set", "sampler.samples=1", "--set", "retrain.epochs=1", "--set", "prune.block_scope=global"]) == 0
    assert "global" in scopes and "family" not in scopes
    meta = torch.load(out / "pruned_80" / "member_000.pt", weights_only=True)["meta"]
    assert 0.7 < meta["sparsity"] < 0.9
    assert main(["run", TINY_BLOCK, "--out", str(tmp_path / "bad"), "--no-progress", "--set", "prune.structure=weights",
                 "--set", "prune.block_scope=global"]) == 2
