"""``sampler.vectorize = true`` in a config: the stage's chains run as one batched computation and
write the same samples as separate chains; what it cannot vectorise is refused before work starts."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import need_data
from sparse_ensembles.experiments import config as config_mod
from sparse_ensembles.experiments.config import ConfigError
from sparse_ensembles.experiments.stages import Chain, build_stages

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")


def _run(out, *sets):
    args = [sys.executable, "-m", "sparse_ensembles", "run", TINY, "--out", str(out), "--no-progress",
            "--only", "sgld", "--set", "sampler.chains=3"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env={
        **__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def test_vectorised_chains_in_a_run_write_the_samples_of_separate_chains(tmp_path):
    need_data("mnist")
    _run(tmp_path / "separate")
    log = _run(tmp_path / "vectorised", "sampler.vectorize=true")
    assert "chains 1, 2, 3 (vectorised)" in log
    for k in range(3):  # chain c writes sample c (3 chains, 3 samples)
        a = torch.load(tmp_path / "separate" / "sgld" / f"sample_{k:03d}.pt", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "vectorised" / "sgld" / f"sample_{k:03d}.pt", weights_only=True)["state_dict"]
        for n in a:
            assert torch.allclose(a[n], b[n], atol=1e-5, rtol=0), (k, n, (a[n] - b[n]).abs().max())


@pytest.mark.parametrize("override, key", [("sampler.kind=sghmc", "sampler.kind"),
                                           ("sampler.max_grad_norm=1.0", "sampler.max_grad_norm"),
                                           ("sampler.noise=rademacher", "sampler.noise")])
def test_what_cannot_be_vectorised_is_refused_naming_the_setting(tmp_path, override, key):
    cfg = config_mod.load(TINY, ["sampler.vectorize=true", override])
    chains = [s for s in build_stages(cfg) if isinstance(s, Chain)]
    with pytest.raises(ConfigError, match=f"sampler.vectorize = true with this {key}"):
        for s in chains:
            s.check(tmp_path)


def test_a_diverging_vectorised_stage_stops_with_a_divergence_message_and_keeps_no_samples(tmp_path):
    need_data("mnist")
    args = [sys.executable, "-m", "sparse_ensembles", "run", TINY, "--out", str(tmp_path), "--no-progress",
            "--only", "sgld", "--set", "sampler.chains=3", "--set", "sampler.vectorize=true",
            "--set", "sampler.lr=1e12"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env={
        **__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    # the chains' gradient check or the loss check, whichever sees it first
    assert "diverged" in proc.stderr and "learning rate" in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path / "sgld").glob("sample_*.pt"))
