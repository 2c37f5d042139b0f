"""Config variants (one run, several chain -> prune recipes), --only, stage locks, the SGD lr rule,
and the LM rows of the SSE paper's PTB table on a tiny subset through the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need_data
from sparse_ensembles.experiments.cli import main
from sparse_ensembles.experiments.config import ConfigError, SGDConfig, from_dict, load, to_toml
from sparse_ensembles.checkpoint import claim
from sparse_ensembles.experiments.stages import build_stages

ROOT = Path(__file__).resolve().parents[1]
TINY_LM = ROOT / "configs" / "tiny_lm.toml"

VARIANTS = """
[variants.iss_se]
model.tie_embeddings = true
prior.grouping = "iss"

[variants.untied]
prior.grouping = "untied"

[variants.tied]
prior.grouping = "tied"
prior.lam = 2.0
"""


def _lm_config(extra: str = VARIANTS):
    import tomllib
    return from_dict(tomllib.loads(TINY_LM.read_text() + extra))


def test_variant_changes_only_its_keys_and_the_base_keeps_its_own():
    cfg = _lm_config()
    assert list(cfg.variants) == ["iss_se", "untied", "tied"]
    iss = cfg.variant("iss_se")
    assert iss.model.tie_embeddings and iss.prior.grouping == "iss" and iss.prior.lam == cfg.prior.lam
    assert cfg.variant("tied").prior.lam == 2.0 and cfg.variant("tied").model.tie_embeddings is False
    assert not cfg.model.tie_embeddings and cfg.prior.grouping == "iss"


def test_variants_survive_the_written_config_round_trip():
    import tomllib
    cfg = _lm_config()
    again = from_dict(tomllib.loads(to_toml(cfg)))
    assert again.variants == cfg.variants and again.to_dict() == cfg.to_dict()


def test_set_reaches_into_one_variant_and_a_misspelt_variant_is_an_error(tmp_path):
    path = tmp_path / "lm.toml"
    path.write_text(TINY_LM.read_text() + VARIANTS)
    cfg = load(path, ["variants.iss_se.prune.widths=[8, 8]", "variants.tied.prior.lam=3.0"])
    assert cfg.variant("iss_se").prune.widths == [8, 8] and cfg.variant("iss_se").model.tie_embeddings
    assert cfg.variant("tied").prior.lam == 3.0 and cfg.variant("untied").prune.widths == cfg.prune.widths
    with pytest.raises(ConfigError, match="no such variant.*iss_se"):
        load(path, ["variants.iss_sd.prune.widths=[8, 8]"])


def test_stages_run_one_chain_and_pruning_per_variant_and_the_plain_chain_once():
    names = [s.name for s in build_stages(_lm_config())]
    assert names == ["sgd", "sgld", "sgld_gsp_iss_se", "pruned_90_iss_se", "sgld_gsp_untied", "pruned_90_untied",
                     "sgld_gsp_tied", "pruned_90_tied"]


def test_a_variant_changing_the_prior_kind_starts_that_section_afresh_and_its_samples_are_pruned_too():
    cfg = _lm_config('[variants.plain]\nprior.kind = "gaussian"\nprior.precision = 2.0\n')
    v = cfg.variant("plain")
    assert cfg.kinds["prior"] == "group_lasso" and v.kinds["prior"] == "gaussian" and v.prior.precision == 2.0
    # a Gaussian chain's samples are pruned and retrained as well ("SGLD+PR"), as without variants
    assert [s.name for s in build_stages(cfg)] == ["sgd", "sgld_plain", "pruned_90_plain"]


@pytest.mark.parametrize("extra, match", [
    ("[variants.a]\ntask.bptt = 5\n", r"variants.a.task: a variant may change only"),
    ("[variants.a]\nprior.lamda = 5\n", r"\[variants.a\]: unknown config key prior.lamda"),
    ("[variants.a]\nprior.lam = -1\n", r"\[variants.a\]: prior.lam: must be > 0"),
    ("[variants.\"a b\"]\nprior.lam = 1\n", r"letters, digits"),
])
def test_bad_variant_is_a_config_error_naming_the_variant_and_key(extra, match):
    with pytest.raises(ConfigError, match=match):
        _lm_config(extra)


@pytest.mark.parametrize("extra, match", [
    ('[distill]\nteacher = "self"\ntau = 2.0\n', r'distill.tau: only the "hinton" loss has a temperature'),
    ('[distill]\nteacher = "self"\nloss = "kl"\n', r'distill.loss: "geras"'),
    ('[distill]\nteacher = "self"\nloss = "hinton"\ntau = 0\n', r"distill.tau: the softening temperature"),
])
def test_bad_distillation_loss_settings_are_config_errors_naming_the_key(extra, match):
    with pytest.raises(ConfigError, match=match):
        _lm_config(extra)


def test_sgd_lr_rule_is_a_step_decay_by_default_and_zaremba_with_decay_start():
    step = SGDConfig(lr=0.5, lr_decay=0.5, decay_every=10)
    assert [step.lr_at(e) for e in (0, 9, 10, 19, 20)] == [0.5, 0.5, 0.25, 0.25, 0.125]
    zaremba = SGDConfig(lr=1.0, lr_decay=0.5, decay_every=1, decay_start=4, epochs=13)
    assert [zaremba.lr_at(e) for e in range(6)] == [1, 1, 1, 1, 0.5, 0.25]


def test_claim_skips_a_stage_another_process_holds_and_takes_it_once_that_process_is_gone(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(tmp_path / 'a' / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush(); print('held', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    (tmp_path / "a").mkdir()
    try:
        assert holder.stdout.readline().strip() == "held"
        with claim(tmp_path / "a" / ".lock") as pid:
            assert pid == holder.pid
    finally:
        holder.kill()  # dies holding the lock: the kernel releases it
        holder.wait()
    with claim(tmp_path / "a" / ".lock") as pid:
        assert pid is None and (tmp_path / "a" / ".lock").read_text() == str(os.getpid())
        with claim(tmp_path / "a" / ".lock") as again:  # a second claim (another open file) is refused
            assert again == os.getpid()


def test_two_processes_share_the_sgd_stage_member_by_member_each_member_locked_on_its_own(tmp_path):
    """A process holding member 0's lock (another run training it) makes this run skip member 0 and
    train member 1; once the holder is gone, a resume trains member 0."""
    need_data("ptb")
    out = tmp_path / "run"
    lock = out / "sgd" / ".member_000.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, time\n"
        f"f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    args = ["run", str(TINY_LM), "--out", str(out), "--no-progress", "--resume", "--only", "sgd",
            "--set", "sgd.members=2", "--set", "sgd.epochs=1"]
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(args) == 0
        assert not (out / "sgd" / "member_000.pt").exists() and (out / "sgd" / "member_001.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0
    assert (out / "sgd" / "member_000.pt").exists()


LM_KEYS = {"method", "members", "ppl_valid", "ppl_test", "nll_test", "params", "flops", "params_ratio",
           "flops_ratio", "train_seconds"}


def test_lm_rows_for_each_grouping_with_and_without_shared_embeddings_through_the_cli(tmp_path):
    """The PTB table's rows on a tiny subset: SGD x1 / xM, SGLD xM, and SGLD+GSP+PR for untied, tied
    and ISS groups with and without SE; each pruned member keeps its 90% mask through retraining
    (its nonzero weights, not just its recorded mask), and two processes split the work by --only."""
    from sparse_ensembles import checkpoint
    from sparse_ensembles.models import LSTMLM

    need_data("ptb")
    config = tmp_path / "lm.toml"
    config.write_text(TINY_LM.read_text() + "".join(
        f"\n[variants.{g}{'_se' if se else ''}]\nprior.grouping = \"{g}\"\nmodel.tie_embeddings = {str(se).lower()}\n"
        for g in ("iss", "untied", "tied") for se in (True, False)))
    out = tmp_path / "run"
    common = ["run", str(config), "--out", str(out), "--no-progress", "--set", "sampler.samples=1",
              "--set", "retrain.epochs=1", "--set", "sgd.epochs=1", "--set", "task.train_tokens=8000",
              "--set", "task.valid_tokens=2000", "--set", "task.test_tokens=2000"]
    assert main(common + ["--only", "sgd", "--only", "sgld"]) == 0
    assert not (out / "sgld_gsp_iss").exists()
    assert main(common + ["--resume", "--only", "*gsp*", "--only", "pruned_*"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    variants = [f"{g}{s}" for g in ("iss", "untied", "tied") for s in ("_se", "")]
    assert list(rows) == (["SGD x1", "SGD x2", "SGLD x1"]
                          + [m for v in variants for m in (f"SGLD+GSP({v}) x1", f"SGLD+GSP({v})+PR 90%")])
    for r in rows.values():
        assert LM_KEYS <= set(r) and 1 < r["ppl_test"] < 10000
    dense = LSTMLM(10000, [32, 32], 32).cost()
    for v in variants:
        (member,) = sorted((out / f"pruned_90_{v}").glob("member_*.pt"))
        model, meta = checkpoint.load_member(member)
        assert model.tie == v.endswith("_se") and meta["sparsity"] >= 0.9
        # nonzero_macs = nonzeros of the prunable matrices: at most 10% of the dense model's survive
        assert model.cost()["nonzero_macs"] <= 0.1 * dense["nonzero_macs"] + 1
    assert rows["SGLD+GSP(iss_se)+PR 90%"]["params_ratio"] < 0.25


def test_tiny_cnn_sa_config_runs_sghmc_sa_em_and_fixed_prior_chains_pruned_on_a_schedule(tmp_path):
    """SGHMC with the SSGL prior (SA, EM and fixed latents) on a CNN through the CLI: each chain's
    samples come out at the schedule's sparsity on the covered weights, and the first conv (not
    covered) stays dense."""
    from sparse_ensembles import checkpoint

    need_data("mnist")
    out = tmp_path / "cnn"
    assert main(["run", str(ROOT / "configs" / "tiny_cnn_sa.toml"), "--out", str(out), "--no-progress"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(rows) == ["SGD x1", "SGHMC+SSGL(sa) x2", "SGHMC+SSGL(em) x2", "SGHMC+SSGL(fixed) x2"]
    for variant in ("sa", "em", "fixed"):
        row = rows[f"SGHMC+SSGL({variant}) x2"]
        assert 0.4 < row["sparsity"] < 0.5 and row["error"] < 0.5  # measured: s_k of each sample, below the target
        trace = json.loads((out / f"sghmc_ssgl_{variant}" / "trace_0.json").read_text())
        assert [t["epoch"] for t in trace] == [1, 2, 3] and all(t["sigma"] > 0 and 0 < t["delta"] < 1 for t in trace)
        assert trace[-1]["sparsity"] >= 0.4  # the schedule's, over the covered weights
        for f in sorted((out / f"sghmc_ssgl_{variant}").glob("sample_*.pt")):
            model, meta = checkpoint.load_member(f)
            weights = dict(model.named_parameters())
            first, *covered = list(model.prunable_weights())
            assert float((weights[first] == 0).float().mean()) < 0.01
            s = 0.5 * (1 - 0.8 ** (meta["epoch"] * 20 / 2))  # 20 steps per epoch, per layer
            for n in covered:
                assert int((weights[n] == 0).sum()) >= int(s * weights[n].numel()) > 0.4 * weights[n].numel()


def test_distilling_an_lstm_ensemble_through_the_cli_uses_a_truncated_per_token_cache(tmp_path):
    """PTB subset: an SGD x2 LSTM ensemble distilled into one LSTM of the same size; the cache holds
    one truncated row per training token and the student's row is in the table."""
    need_data("ptb")
    teacher = tmp_path / "teacher"
    base = ["--no-progress", "--set", "sampler.samples=0", "--set", "sgd.epochs=1", "--set", "task.train_tokens=4000"]
    assert main(["run", str(TINY_LM), "--out", str(teacher), "--set", "sgd.members=2"] + base) == 0
    student = tmp_path / "student"
    assert main(["distill", str(TINY_LM), "--teacher", f"{teacher}:SGD x2", "--out", str(student),
                 "--set", "sgd.members=1", "--set", "distill.mass=0.9", "--set", "distill.max_k=50"] + base) == 0
    rows = {r["method"]: r for r in json.loads((student / "results.json").read_text())}
    assert list(rows) == ["SGD x1", "KD(SGD x2, lam 0.5) x1"] and rows["KD(SGD x2, lam 0.5) x1"]["ppl_test"] < 10000
    info = json.loads((student / "distill" / "teacher.json").read_text())
    assert info["rows"] == 20 * (4000 // 20 - 1) and 1 <= info["mean_kept"] <= 50
