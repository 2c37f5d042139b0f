"""``sampler.vectorize = true`` in a config: the stage's chains run as one batched computation and
write the same samples as separate chains, also when the run is killed and resumed; what it cannot
vectorise is refused before work starts."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import need_data
from sparse_ensembles.experiments import config as config_mod
from sparse_ensembles.experiments.config import ConfigError
from sparse_ensembles.experiments.stages import Chain, build_stages

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STAGE = "sgld_gsp"  # the sparse chain: its group Lasso runs batched over the chains (add_grad_chains_)


def _args(out, *sets):
    return [sys.executable, "-m", "sparse_ensembles", "run", TINY, "--out", str(out), "--no-progress",
            "--only", STAGE, "--set", "sampler.chains=3"] + [a for s in sets for a in ("--set", s)]


def _run(out, *sets, resume=False):
    proc = subprocess.run(_args(out, *sets) + (["--resume"] if resume else []), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def _samples(out):
    return [torch.load(out / STAGE / f"sample_{k:03d}.pt", weights_only=True)["state_dict"] for k in range(3)]


@pytest.fixture(scope="module")
def vectorised_run(tmp_path_factory):
    need_data("mnist")
    out = tmp_path_factory.mktemp("vectorised") / "run"
    log = _run(out, "sampler.vectorize=true")
    assert "chains 1, 2, 3 (vectorised)" in log
    return out


def test_vectorised_chains_in_a_run_write_the_samples_of_separate_chains(vectorised_run, tmp_path):
    _run(tmp_path / "separate")
    for k, (a, b) in enumerate(zip(_samples(tmp_path / "separate"), _samples(vectorised_run))):
        for n in a:  # chain c writes sample c (3 chains, 3 samples)
            assert torch.allclose(a[n], b[n], atol=1e-5, rtol=0), (k, n, (a[n] - b[n]).abs().max())


def test_a_vectorised_stage_killed_after_its_first_checkpoint_resumes_to_the_same_samples(vectorised_run, tmp_path):
    """SIGKILL once the chains' first epoch is checkpointed; ``--resume`` continues all three chains
    from it and writes, bit for bit, the samples of the uninterrupted run."""
    out = tmp_path / "killed"
    job = subprocess.Popen(_args(out, "sampler.vectorize=true"), cwd=ROOT, env=ENV, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / STAGE / "chains_0_1_2.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(60)
    assert checkpoint.exists(), "the run ended or stalled before its first checkpoint"
    assert not list((out / STAGE).glob("chain_*.done")), "the kill came after the chains had finished"
    log = _run(out, "sampler.vectorize=true", resume=True)
    assert "(vectorised): resuming after epoch" in log  # from the checkpoint, not from the start
    for k, (a, b) in enumerate(zip(_samples(vectorised_run), _samples(out))):
        for n in a:
            assert torch.equal(a[n], b[n]), (k, n, (a[n] - b[n]).abs().max())


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
            "--only", STAGE, "--set", "sampler.chains=3", "--set", "sampler.vectorize=true",
            "--set", "sampler.lr=1e12"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env={
        **__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    # the chains' gradient check or the loss check, whichever sees it first
    assert "diverged" in proc.stderr and "learning rate" in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path / STAGE).glob("sample_*.pt"))


def test_vectorised_chains_with_sampler_compile_prior_write_the_eager_samples(vectorised_run, tmp_path):
    _run(tmp_path / "compiled", "sampler.vectorize=true", "sampler.compile_prior=true")
    for k, (a, b) in enumerate(zip(_samples(vectorised_run), _samples(tmp_path / "compiled"))):
        for n in a:  # the compiled group Lasso sums in another order: equal up to float rounding
            assert torch.allclose(a[n], b[n], atol=1e-5, rtol=0), (k, n, (a[n] - b[n]).abs().max())
