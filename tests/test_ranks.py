"""torchrun: the ranks of a job share a run's units by a static deal, and the result does not
depend on how many ranks there are, also for a chain trained over two ranks or a 2-rank job killed
mid-run and resumed in one process (2-process gloo runs on CPU; four launches in all)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import need_data
from sparse_ensembles.experiments.ranks import Ranks, run_waves

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")
TORCHRUN = Path(sys.executable).with_name("torchrun")


class FakeStage:
    """Units 0..n-1, written as files; ready once ``needs`` is done. Records (rank, unit) per run."""

    def __init__(self, name, n, needs=None):
        self.name, self.n, self.needs, self.ran, self.finished_by = name, n, needs, [], []

    def units(self, out):
        return [k for k in range(self.n) if not (out / f"{self.name}_{k}").exists()]

    def run_unit(self, ctx, k):
        self.ran.append((ctx.rank, k))
        (ctx.out / f"{self.name}_{k}").touch()

    def finish(self, ctx):
        self.finished_by.append(ctx.rank)

    def ready(self, out):
        return self.needs is None or self.needs.done(out)

    def done(self, out):
        return not self.units(out)


class ThreadRanks(Ranks):
    """Ranks of one process, as threads meeting at a threading.Barrier."""

    def __init__(self, rank, size, meeting):
        super().__init__(rank, size)
        self.meeting = meeting

    def barrier(self):
        self.meeting.wait(timeout=30)


def test_units_of_a_wave_are_dealt_round_robin_and_later_waves_wait_for_their_inputs(tmp_path):
    """Rank r of 2 runs the units at even / odd positions of each wave's list; rank 0 alone finishes."""
    import threading
    from types import SimpleNamespace
    a, b = FakeStage("sgd", 3), FakeStage("chain", 2)
    c = FakeStage("pruned", 2, needs=b)
    meeting, errors = threading.Barrier(2), []

    def rank(r):
        try:
            run_waves([a, b, c], SimpleNamespace(out=tmp_path, rank=r), ThreadRanks(r, 2, meeting), log=lambda _: None)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # wave 1 lists sgd[0], sgd[1], sgd[2], chain[0], chain[1]; wave 2 (after the chain) pruned[0], pruned[1]
    assert sorted(a.ran) == [(0, 0), (0, 2), (1, 1)] and sorted(b.ran) == [(0, 1), (1, 0)]
    assert sorted(c.ran) == [(0, 0), (1, 1)]
    assert a.finished_by == b.finished_by == c.finished_by == [0]


def _run(args, env_extra, cwd):
    env = {**os.environ, **env_extra}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _same_runs(one: Path, two: Path):
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert strip(json.loads((one / "results.json").read_text())) == strip(json.loads((two / "results.json").read_text()))
    files = sorted(p.relative_to(one) for p in one.rglob("*.pt") if "member" in p.name or "sample" in p.name)
    assert len(files) == 11  # 2 SGD members, 3 + 3 samples, 3 pruned members
    for f in files:
        x, y = torch.load(one / f, weights_only=True), torch.load(two / f, weights_only=True)
        assert x["state_dict"].keys() == y["state_dict"].keys()
        for k in x["state_dict"]:
            assert torch.equal(x["state_dict"][k], y["state_dict"][k]), (f, k)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    need_data("mnist")
    out = tmp_path_factory.mktemp("ranks") / "one"
    # torchrun gives each rank one thread; the same here, so that float sums are in the same order
    _run([sys.executable, "-m", "sparse_ensembles", "run", TINY, "--out", str(out), "--no-progress"],
         {"OMP_NUM_THREADS": "1"}, ROOT)
    return out


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_a_two_rank_torchrun_run_equals_the_one_process_run_bit_for_bit(one_process_run, tmp_path):
    out = tmp_path / "two"
    log = _run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "sparse_ensembles", "run", TINY,
                "--out", str(out), "--no-progress"], {}, ROOT)
    assert "[rank 1] wave of 3 stage(s), 4 unit(s) over 2 ranks; mine: sgd[1], sgld_gsp[0]" in log
    _same_runs(one_process_run, out)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_a_run_started_in_one_process_and_interrupted_resumes_under_two_ranks_to_the_same_result(
        one_process_run, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(one_process_run, out)
    # as if the one-process run had been killed after its SGD members and the first chain's samples
    for folder in ("sgld_gsp", "pruned_90"):
        shutil.rmtree(out / folder)
    (out / "sgld" / "done.json").unlink()
    for f in ("results.json",):
        (out / f).unlink()
    log = _run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "sparse_ensembles", "run", TINY,
                "--out", str(out), "--no-progress", "--resume"], {}, ROOT)
    assert "mine: sgld_gsp[0]" in log and "sgd[" not in log.split("wave of")[1].split("\n")[0]
    _same_runs(one_process_run, out)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_a_two_rank_job_killed_mid_run_resumes_in_one_process_to_the_same_result(one_process_run, tmp_path):
    """SIGKILL to the whole job (launcher and both ranks, as a scheduler does) once the first chain
    sample is on disk; the finished units are kept and a one-process ``--resume`` ends bit for bit
    where the uninterrupted run does."""
    out = tmp_path / "killed"
    job = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "sparse_ensembles", "run",
                            TINY, "--out", str(out), "--no-progress"], cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "sgld_gsp" / "sample_000.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(60)
    assert first.exists(), "the job ended or stalled before its first chain sample"
    assert not (out / "results.json").exists(), "the kill came after the job had finished: nothing to resume"
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt") if "sample" in p.name or "member" in p.name}
    _run([sys.executable, "-m", "sparse_ensembles", "run", TINY, "--out", str(out), "--no-progress", "--resume"],
         {"OMP_NUM_THREADS": "1"}, ROOT)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished work is not redone
    _same_runs(one_process_run, out)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_a_chain_trained_over_two_ranks_equals_the_one_process_chain(one_process_run, tmp_path):
    """``sampler.data_parallel = 2``: both ranks train the one chain on halves of each batch (the
    gradients averaged, the noise alike on each rank); its samples equal the one-process chain's up to
    the order of float sums, and only the group's first rank writes them."""
    out = tmp_path / "dp"
    log = _run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "sparse_ensembles", "run", TINY,
                "--out", str(out), "--no-progress", "--only", "sgd", "--only", "sgld",
                "--set", "sampler.data_parallel=2"], {}, ROOT)
    assert "[rank 1] wave of 2 stage(s), 3 unit(s) over 2 ranks; mine: sgld[0] (rank 2 of 2), sgd[1]" in log
    samples = sorted((out / "sgld").glob("sample_*.pt"))
    assert [p.name for p in samples] == ["sample_000.pt", "sample_001.pt", "sample_002.pt"]
    for f in samples:
        x = torch.load(one_process_run / "sgld" / f.name, weights_only=True)["state_dict"]
        y = torch.load(f, weights_only=True)["state_dict"]
        for k in x:
            assert torch.allclose(x[k], y[k], atol=1e-6, rtol=0), (f.name, k, (x[k] - y[k]).abs().max())
