"""Every shipped config loads, builds its stages, and builds each variant's model for its task's
dimensions (no data needed), with the SSGL prior's name patterns matching parameters."""
from pathlib import Path

import pytest

from sparse_ensembles.experiments import config as config_mod
from sparse_ensembles.experiments.config import SSGLConfig
from sparse_ensembles.experiments.stages import build_stages, ssgl_names
from sparse_ensembles.samplers import from_summed_loss
from sparse_ensembles.models import model_class

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
DIMS = {"mnist": {"in_features": 784, "classes": 10}, "fashion-mnist": {"in_features": 784, "classes": 10},
        "cifar10": {"in_features": 3072, "classes": 10}, "ptb": {"vocab": 10000},
        "wikitext2": {"vocab": 33278}}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads_builds_its_stages_and_every_variant_model(path):
    cfg = config_mod.load(path)
    stages = build_stages(cfg)
    assert stages and len({s.name for s in stages}) == len(stages)
    dims = DIMS[cfg.task.dataset]
    for name, variant in cfg.recipes():
        model = model_class(variant.kinds["model"]).from_config(variant.model, dims)
        if isinstance(variant.prior, SSGLConfig):
            covered = ssgl_names(variant.prior, model)
            first = next(iter(model.prunable_weights()))
            assert covered and (variant.prior.names or first not in covered), (name, covered)


def test_resnet20_configs_cover_every_conv_but_the_stem_and_have_the_four_methods_at_four_sparsities():
    for name in ("fmnist_resnet20_sa", "cifar10_resnet20_sa"):
        cfg = config_mod.load(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml")
        table = {f"{m}_{s}" for m in ("sa_anneal", "sa", "em", "plain") for s in (30, 50, 70, 90)}
        assert table <= set(cfg.variants)
        authors_plain = {f"ssgl_plain_{s}" for s in (30, 50, 70, 90)} & set(cfg.variants)
        assert all(cfg.variant(n).prune.target == 0.9 for n in set(cfg.variants) - table - authors_plain)  # extra: 90%
        for n in authors_plain:  # the authors' SGHMC row: the SSGL loss with frozen kappas
            p = cfg.variant(n).prior
            assert p.omega == 0.0 and (p.kappa0, p.kappa1) == (5e-4, 5e-4)
        v = cfg.variant("sa_anneal_90")
        model = model_class("resnet20").from_config(v.model, DIMS[cfg.task.dataset])
        covered = ssgl_names(v.prior, model)
        convs = [n for n, p in model.named_parameters() if p.dim() == 4]
        assert covered == convs[1:] and v.prune.target == 0.9 and (v.prior.v0, v.prior.v1) == (0.005, 1e-5)
        assert cfg.variant("plain_90").kinds["prior"] == "gaussian" and cfg.variant("em_30").prior.omega == 1.0
        assert all(cfg.variant(n).prune.names == ["blocks.*.conv*.weight"] for n in cfg.variants)  # same layers pruned


def test_cifar10_resnet20_config_holds_the_authors_step_in_our_units():
    cfg = config_mod.load(Path(__file__).resolve().parents[1] / "configs" / "cifar10_resnet20_sa.toml")
    s = from_summed_loss(2e-9, 50_000, batch_size=1000, inverse_temperature=1000, epochs=1000, lr_milestones=(700, 900))
    c = cfg.variant("sa_anneal_90").sampler
    assert c.lr == pytest.approx(s.lr) and c.num_data == s.num_data and c.temperature == pytest.approx(s.temperature)
    assert c.schedule == "step" and c.milestone_unit == "fraction" and c.lr_milestones == [0.7, 0.9]
    # 50,000 of the authors' steps = our epochs of 45,000 / 1000 = 45 steps
    assert abs(c.epochs_per_chain * 45 - 50_000) < 45 and cfg.variant("sa_anneal_90").prior.sa_on == "sigma2"


def test_cpu_resnet20_config_pruning_schedule_reaches_its_target_within_the_chain():
    # with the authors' U = 50 steps copied into a 1,500-step chain, s_k stopped at 0.26 S
    cfg = config_mod.load(Path(__file__).resolve().parents[1] / "configs" / "fmnist_resnet20_sa.toml")
    steps = cfg.sampler.epochs_per_chain * cfg.task.train_subset // cfg.task.batch_size
    for name in cfg.variants:
        p = cfg.variant(name).prune
        assert 1 - p.decay ** (steps / p.every) >= 0.99, (name, steps, p.every)


@pytest.mark.parametrize("name", ["mnist_cnn_sa", "fmnist_cnn_sa"])
def test_cnn_estep_short_variant_keeps_the_sum_of_the_authors_sa_weights_over_its_shorter_chain(name):
    # the authors' CNN chain: 1000 epochs x 50 steps of 0.02 / (1000 + k)^0.75; ours: 50,000 images / batch
    # 100 per epoch for epochs_per_chain epochs, with omega_c and omega_A compressed (docs/adaptive.md)
    cfg = config_mod.load(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml")
    v = cfg.variant("estep_short")
    steps = v.sampler.epochs_per_chain * (60_000 - cfg.task.valid_size) // cfg.task.batch_size
    ours = sum(v.prior.omega_c / (v.prior.omega_A + k) ** v.prior.omega_alpha for k in range(steps))
    theirs = sum(0.02 / (1000 + k) ** 0.75 for k in range(50_000))
    uncompressed = sum(0.02 / (1000 + k) ** 0.75 for k in range(steps))
    assert v.prior.omega < 0 and v.prior.latent_start == "estep"
    assert ours == pytest.approx(theirs, rel=0.02) and uncompressed < 0.35 * theirs
