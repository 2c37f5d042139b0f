"""One chain on two processes (sparse_ensembles.distributed): the 2-rank chain is the one-process
chain on the global batch, its noise has the variance of T (not T / 2), and what cannot be split is
refused. Two gloo processes started with torch.multiprocessing (one launch for the module)."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from sparse_ensembles.distributed import ShardedLoss, shard
from sparse_ensembles.experiments import config as config_mod
from sparse_ensembles.samplers import SGHMC, SGLD
from sparse_ensembles.training import train_epoch

ROWS, BATCH, LR, T = 46, 15, 0.05, 1.0  # batches of 15 (split 7 / 8) and 1 (rank 0 holds no row)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _batches(x, y):
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, ROWS, BATCH)]


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _loss(model, batch, state=None):
    x, y = batch
    return F.cross_entropy(model(x), y), state


def _chain(kind, sharded: bool, epochs=3):
    """A chain of ``kind`` from the same start and noise seed: (final parameters, epoch losses)."""
    model = _model()
    cls, extra = (SGLD, {}) if kind == "sgld" else (SGHMC, {"friction": 0.1})
    sampler = cls(model.parameters(), LR, num_data=ROWS, temperature=T,
                  generator=torch.Generator().manual_seed(7), **extra)
    loss_fn = ShardedLoss(model, _loss) if sharded else _loss
    x, y = _data()
    losses = [train_epoch(model, sampler, _batches(x, y), loss_fn=loss_fn) for _ in range(epochs)]
    return [p.detach().clone() for p in model.parameters()], losses


def _noise_only(loss_fn):
    """One SGLD step at zero gradient from zero parameters: the step is the injected noise alone."""
    model = nn.Linear(200, 100)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    sampler = SGLD(model.parameters(), LR, num_data=ROWS, temperature=T, generator=torch.Generator().manual_seed(3))
    x, y = _data()
    zero = lambda m, b, s=None: ((m(F.pad(b[0], (0, 194))).sum() * 0), s)
    train_epoch(model, sampler, _batches(x, y)[:1], loss_fn=loss_fn(zero))
    return model.weight.detach().clone()


def _worker(rank, size, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    torch.set_num_threads(1)
    try:
        result = {}
        for kind in ("sgld", "sghmc"):
            result[kind], result[kind + "_losses"] = _chain(kind, sharded=True)
        result["noise"] = _noise_only(_ShardedZero)
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


class _ShardedZero:
    """ShardedLoss built lazily on the model the loss first sees (the noise-only chain's)."""

    def __init__(self, loss_fn):
        self.loss_fn, self.sharded = loss_fn, None

    def __call__(self, model, batch, state=None):
        if self.sharded is None:
            self.sharded = ShardedLoss(model, self.loss_fn)
        return self.sharded(model, batch, state)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp")
    mp.spawn(_worker, args=(2, str(folder / "init"), str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("kind", ["sgld", "sghmc"])
def test_a_two_rank_chain_equals_the_one_process_chain_on_the_global_batch_with_uneven_shares(two_ranks, kind):
    one, _ = _chain(kind, sharded=False)
    for rank in two_ranks:
        for a, b in zip(rank[kind], one):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    for a, b in zip(*(r[kind] for r in two_ranks)):  # both ranks hold the same chain, bit for bit
        assert torch.equal(a, b)


def test_every_rank_reports_the_global_batch_mean_loss(two_ranks):
    assert two_ranks[0]["sgld_losses"] == two_ranks[1]["sgld_losses"]
    _, one = _chain("sgld", sharded=False)
    for a, b in zip(two_ranks[0]["sgld_losses"], one):
        assert math.isclose(a, b, rel_tol=1e-5), (a, b)


def test_the_injected_noise_has_the_variance_of_T_not_T_over_the_number_of_ranks(two_ranks):
    steps = [r["noise"] for r in two_ranks]
    assert torch.equal(steps[0], steps[1])  # one draw, the same on every rank
    variance = steps[0].var().item()
    expected = 2 * LR * T / ROWS
    # 20,000 draws: the sample variance is within 3% of its expectation (about 1% standard error)
    assert abs(variance / expected - 1) < 0.03, (variance, expected)
    assert abs(variance / (expected / 2) - 1) > 0.5  # and far from the averaged T / 2 chain


def test_shard_splits_rows_of_tuples_and_dicts_and_leaves_an_empty_share_weighted_zero():
    batch = (torch.arange(5), torch.arange(5) * 10)
    (a, b), rows, total = shard(batch, 1, 2)
    assert a.tolist() == [2, 3, 4] and b.tolist() == [20, 30, 40] and (rows, total) == (3, 5)
    local, rows, total = shard({"x": torch.arange(3), "tag": "t"}, 2, 4)
    assert local["x"].tolist() == [1] and local["tag"] == "t" and rows == 1
    local, rows, total = shard(torch.arange(1), 0, 2)
    assert rows == 0 and total == 1 and local.tolist() == [0]  # a stand-in row, weighted 0
    with pytest.raises(TypeError, match="no tensor"):
        shard(("a", "b"), 0, 2)


def test_a_batchnorm_net_is_refused_on_cpu_with_the_reason_and_the_fix(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm.*GPUs only.*data_parallel = 1"):
            ShardedLoss(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), _loss)
    finally:
        dist.destroy_process_group()


def test_sampler_data_parallel_must_be_a_positive_rank_count():
    with pytest.raises(config_mod.ConfigError, match="sampler.data_parallel"):
        config_mod.load("configs/tiny.toml", ["sampler.data_parallel=0"])
    assert config_mod.load("configs/tiny.toml", ["sampler.data_parallel=2"]).sampler.data_parallel == 2
