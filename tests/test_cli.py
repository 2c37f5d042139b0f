"""The tiny config end to end through the CLI, resume, bad input."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import need_data
from sparse_ensembles.experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")
KEYS = {"method", "members", "sparsity", "error", "nll", "ece", "brier", "params", "flops", "params_ratio",
        "flops_ratio", "train_seconds"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    need_data("mnist")
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["run", TINY, "--out", str(out), "--no-progress"]) == 0
    return out


def test_tiny_config_runs_end_to_end_and_writes_results_members_and_plots(tiny_run):
    rows = json.loads((tiny_run / "results.json").read_text())
    assert [r["method"] for r in rows] == ["SGD x1", "SGD x2", "SGLD x3", "SGLD+GSP x3", "SGLD+GSP+PR 90%"]
    for r in rows:
        assert KEYS <= set(r)
        assert 0 <= r["error"] <= 1 and r["nll"] > 0
    pruned = rows[-1]
    assert pruned["params"] < rows[2]["params"] and pruned["flops"] <= rows[2]["flops"]
    assert (tiny_run / "config.toml").exists()
    assert len(list((tiny_run / "pruned_90").glob("member_*.pt"))) == 3
    for png in ("members_curve.png", "frontier.png", "pixels_SGLD_GSP_PR_90pct.png"):
        assert (tiny_run / png).stat().st_size > 1000


def test_resume_redoes_only_missing_work(tiny_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    kept = out / "sgld" / "sample_000.pt"
    stamp = kept.stat().st_mtime_ns
    (out / "pruned_90" / "member_001.pt").unlink()
    assert main(["run", TINY, "--out", str(out), "--resume", "--no-progress"]) == 0
    assert kept.stat().st_mtime_ns == stamp  # finished samples are not recomputed
    assert (out / "pruned_90" / "member_001.pt").exists()


def test_interrupted_chain_resumes_from_its_checkpoint_with_the_same_samples(tiny_run, tmp_path):
    out = tmp_path / "cut"
    shutil.copytree(tiny_run, out)
    # pretend the GSP chain stopped after epoch 3: drop its later samples and results
    import torch

    for f in ["done.json", "chain_0.done", "sample_001.pt", "sample_002.pt"]:
        (out / "sgld_gsp" / f).unlink()
    shutil.rmtree(out / "pruned_90")
    # rebuild the epoch-3 chain state by rerunning the chain only up to there
    assert main(["run", TINY, "--out", str(tmp_path / "short"), "--no-progress", "--set", "sampler.samples=1",
                 "--set", "sgd.members=0", "--set", "prune.sparsities=[]"]) == 0
    shutil.copy(tmp_path / "short" / "sgld_gsp" / "chain_0.pt", out / "sgld_gsp" / "chain_0.pt")
    assert main(["run", TINY, "--out", str(out), "--resume", "--no-progress"]) == 0
    for k in (1, 2):
        a = torch.load(out / "sgld_gsp" / f"sample_00{k}.pt", weights_only=True)["state_dict"]
        b = torch.load(tiny_run / "sgld_gsp" / f"sample_00{k}.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_several_chains_share_the_samples_each_from_its_own_init(tmp_path):
    need_data("mnist")
    import torch
    from sparse_ensembles import checkpoint

    out = tmp_path / "chains"
    assert main(["run", TINY, "--out", str(out), "--no-progress", "--set", "sgd.members=0", "--set",
                 "sampler.plain_chain=false", "--set", "sampler.chains=3", "--set", "prune.sparsities=[]"]) == 0
    files = sorted((out / "sgld_gsp").glob("sample_*.pt"))
    metas = [torch.load(f, weights_only=True)["meta"] for f in files]
    assert [m["chain"] for m in metas] == [0, 1, 2]
    assert [m["epoch"] for m in metas] == [3, 3, 3]  # burn_in 2 + thin 1: one sample per chain
    w = [dict(checkpoint.load_member(f)[0].named_parameters())["1.weight"] for f in files]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert main(["run", TINY, "--out", str(tmp_path / "bad"), "--set", "sampler.chains=2"]) != 0


def test_gradual_pruning_during_retraining_reaches_the_target_sparsity(tmp_path):
    need_data("mnist")
    import torch

    out = tmp_path / "ramp"
    assert main(["run", TINY, "--out", str(out), "--no-progress", "--set", "sgd.members=0", "--set",
                 "sampler.plain_chain=false", "--set", "sampler.samples=1", "--set", "retrain.epochs=3",
                 "--set", "retrain.ramp_epochs=2"]) == 0
    meta = torch.load(out / "pruned_90" / "member_000.pt", weights_only=True)["meta"]
    row = json.loads((out / "results.json").read_text())[-1]
    assert row["method"] == "SGLD+GSP+PR 90%" and row["params_ratio"] < 0.12
    assert meta["sparsity"] >= 0.9
    # tiny retrains 2 epochs: a ramp of 2 would never train at the target mask, so it is rejected
    assert main(["run", TINY, "--out", str(tmp_path / "bad"), "--set", "retrain.ramp_epochs=2"]) != 0


@pytest.mark.parametrize("ramp", [0, 1])
def test_prune_widths_give_structured_members_of_at_most_those_widths(tmp_path, capsys, ramp):
    need_data("mnist")
    import torch

    out = tmp_path / "widths"
    assert main(["run", TINY, "--out", str(out), "--no-progress", "--set", "sgd.members=0", "--set",
                 "sampler.plain_chain=false", "--set", "sampler.samples=1", "--set", "prune.widths=[100, 16, 8]",
                 "--set", f"retrain.ramp_epochs={ramp}"]) == 0
    spec = torch.load(out / "pruned_90" / "member_000.pt", weights_only=True)["spec"]
    assert all(w <= k for w, k in zip(spec["widths"], [100, 16, 8])) and spec["widths"][-1] == 10
    capsys.readouterr()
    assert main(["run", TINY, "--out", str(tmp_path / "bad"), "--set", "prune.widths=[100, 16]"]) != 0
    assert "prune.widths" in capsys.readouterr().err


def test_evaluate_recomputes_the_same_table(tiny_run, capsys):
    before = json.loads((tiny_run / "results.json").read_text())
    assert main(["evaluate", str(tiny_run)]) == 0
    after = json.loads((tiny_run / "results.json").read_text())
    assert [r["error"] for r in after] == [r["error"] for r in before]
    assert "SGLD+GSP+PR 90%" in capsys.readouterr().out


def test_existing_run_directory_without_resume_is_refused(tiny_run, capsys):
    assert main(["run", TINY, "--out", str(tiny_run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_diverging_chain_gives_clear_error_and_leaves_no_partial_files(tmp_path, capsys):
    need_data("mnist")
    out = tmp_path / "boom"
    code = main(["run", TINY, "--out", str(out), "--no-progress", "--set", "sgd.members=0",
                 "--set", "sampler.lr=1e12"])
    assert code == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "learning rate" in err
    for f in out.rglob("*.pt"):  # whatever was written is complete and loadable
        import torch
        torch.load(f, weights_only=True)


def test_bad_config_value_and_missing_data_are_clear_errors(tmp_path, capsys, monkeypatch):
    assert main(["run", TINY, "--out", str(tmp_path / "a"), "--set", "prune.scope=diagonal"]) == 2
    assert "prune.scope" in capsys.readouterr().err
    monkeypatch.setenv("SPARSE_ENSEMBLES_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["run", TINY, "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err


TINY_LM = str(ROOT / "configs" / "tiny_lm.toml")


def test_tiny_lm_config_runs_the_whole_sse_pipeline_on_ptb_and_shrinks_lstm_members(tmp_path):
    import math

    import torch

    from sparse_ensembles import checkpoint
    from sparse_ensembles.models import LSTMLM

    need_data("ptb")
    out = tmp_path / "tiny_lm"
    assert main(["run", TINY_LM, "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["SGD x1", "SGD x2", "SGLD x2", "SGLD+GSP x2", "SGLD+GSP+PR 90%"]
    for r in rows:
        assert {"ppl_valid", "ppl_test", "nll_valid", "nll_test", "params", "flops", "train_seconds"} <= set(r)
        assert math.isclose(r["ppl_test"], math.exp(r["nll_test"]), rel_tol=1e-9)
        assert r["ppl_test"] < 10000  # better than a uniform guess over the 10k-word vocabulary
        assert 0 <= r["ece"] <= 1 and 0 <= r["aurc"] <= 1 and 0 < r["word_error"] <= 1  # next-word calibration
    pruned = rows[-1]
    assert pruned["params_ratio"] < 0.5 * rows[3]["params_ratio"]
    assert (out / "reliability.png").stat().st_size > 1000
    for f in sorted((out / "pruned_90").glob("member_*.pt")):
        blob = torch.load(f, weights_only=True)
        assert blob["spec"]["kind"] == "lstm_lm" and blob["meta"]["sparsity"] >= 0.9
        model, _ = checkpoint.load_member(f)
        assert isinstance(model, LSTMLM) and all(h <= 32 for h in model.hidden)
        weights = torch.cat([w.detach().flatten() for w in model.prunable_weights().values()])
        assert float(weights.eq(0).float().mean()) >= 0.85  # the saved tensors are sparse, not just the meta



def test_resume_with_an_override_keeps_the_original_config_and_records_the_change(tiny_run, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(tiny_run, out)
    original = (out / "config.toml").read_text()
    assert main(["run", TINY, "--out", str(out), "--resume", "--no-progress", "--set", "retrain.lr=0.07"]) == 0
    assert (out / "config.toml").read_text() == original
    history = json.loads((out / "resumes.json").read_text())
    assert history[-1]["overrides"] == ["retrain.lr=0.07"]
    assert history[-1]["changed"] == {"retrain.lr": [0.05, 0.07]}
    assert "lr = 0.07" in (out / "config.current.toml").read_text()


def test_derived_seeds_differ_across_stages_indices_and_purposes_and_repeat_for_the_same_keys():
    from sparse_ensembles.experiments.stages import derive_seed

    seeds = {derive_seed(s, stage, k, purpose) for s in range(3) for stage in ("sgd", "sgld", "sgld_gsp")
             for k in range(200) for purpose in ("init", "data", "noise")}
    assert len(seeds) == 3 * 3 * 200 * 3  # the old offsets (seed * 1000 + k) collided from k = 1000 on
    assert derive_seed(0, "sgd", 5, "init") == derive_seed(0, "sgd", 5, "init") < 2**63


def test_asking_for_cuda_where_there_is_none_is_a_clear_config_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    assert main(["run", TINY, "--out", str(tmp_path / "gpu"), "--set", "experiment.device=cuda"]) == 2
    assert "experiment.device" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_tiny_run_on_cuda_matches_the_cpu_run_closely(tiny_run, tmp_path):
    need_data("mnist")
    out = tmp_path / "cuda"
    assert main(["run", TINY, "--out", str(out), "--no-progress", "--set", "experiment.device=cuda"]) == 0
    gpu = json.loads((out / "results.json").read_text())
    cpu = json.loads((tiny_run / "results.json").read_text())
    assert [r["method"] for r in gpu] == [r["method"] for r in cpu]
    # same seeds and data order; float rounding differs between devices, so allow a few images
    assert abs(gpu[0]["error"] - cpu[0]["error"]) <= 0.02
    assert all(r["params"] > 0 for r in gpu)


# The tiny MLP run's numbers as this release computes them (2 CPU threads, torch 2.13.0). A change
# that moves them (seeds, data order, sampler, pruning, evaluation) must be deliberate: rerun
# `sparse-ensembles run configs/tiny.toml` and update the table with the reason in the commit.
# Tolerances absorb float rounding between machines (3 of 1000 test images, 1% NLL), not changes.
PINNED_TINY = {  # method: (test error, test NLL, nonzero params)
    "SGD x1": (0.191, 0.59906, 52650),
    "SGD x2": (0.182, 0.56915, 105300),
    "SGLD x3": (0.263, 1.15800, 157950),
    "SGLD+GSP x3": (0.387, 1.54398, 157950),
    "SGLD+GSP+PR 90%": (0.384, 1.45151, 16080),
}


PINNED_TORCH = "2.13.0"  # the numbers above hold for this torch only (2.11 moves SGLD x3 by 1 point)


def test_tiny_run_reproduces_its_pinned_numbers(tiny_run):
    import torch
    if torch.__version__.split("+")[0] != PINNED_TORCH:
        pytest.skip(f"the pinned numbers are those of torch {PINNED_TORCH}; this is torch {torch.__version__}, "
                    "whose kernels round differently")
    rows = {r["method"]: r for r in json.loads((tiny_run / "results.json").read_text())}
    assert set(rows) == set(PINNED_TINY)
    for method, (error, nll, params) in PINNED_TINY.items():
        r = rows[method]
        assert abs(r["error"] - error) <= 0.003, (method, r["error"])
        assert abs(r["nll"] - nll) <= 0.01 * nll, (method, r["nll"])
        assert abs(r["params"] - params) <= 0.01 * params, (method, r["params"])


def test_lstm_prune_widths_give_iss_members_shrunk_to_those_unit_counts(tmp_path):
    import torch

    need_data("ptb")
    out = tmp_path / "iss_widths"
    assert main(["run", TINY_LM, "--out", str(out), "--no-progress", "--set", "sgd.members=0", "--set",
                 "sampler.plain_chain=false", "--set", "prune.widths=[24, 16, 12]"]) == 0
    for f in sorted((out / "pruned_90").glob("member_*.pt")):
        spec = torch.load(f, weights_only=True)["spec"]
        assert spec["emb"] <= 24 and spec["hidden"][0] <= 16 and spec["hidden"][1] <= 12
    row = json.loads((out / "results.json").read_text())[-1]
    assert row["flops_ratio"] < 0.5 * 2  # two members, each under half a dense model's sub-matrix FLOPs


def test_evaluate_with_ood_adds_detection_selective_prediction_and_reliability_for_every_row(tiny_run, tmp_path, capsys):
    """MNIST in, Fashion-MNIST out: every row gets AUROC / AUPR / FPR95 by predictive entropy (and
    by mutual information for ensembles) on test and on valid, AURC and the error at 80% coverage,
    and a reliability diagram is drawn."""
    need_data("fashion-mnist")
    out = tmp_path / "ood"
    shutil.copytree(tiny_run, out)
    assert main(["evaluate", str(out), "--ood", "fashion-mnist"]) == 0
    rows = json.loads((out / "results.json").read_text())
    for r in rows:
        assert 0.5 < r["ood_auroc"] <= 1 and 0 <= r["ood_aupr"] <= 1 and 0 <= r["ood_fpr95"] <= 1
        assert 0 <= r["aurc"] <= r["error"] + 1e-9 and 0 <= r["error_at_80"] <= r["error"] + 1e-9
        assert ("ood_auroc_mi" in r) == (r["members"] > 1)
        # the same on the valid split (the OOD set's last training images), to choose settings by
        assert 0.5 < r["ood_auroc_valid"] <= 1 and r["ood_auroc_valid"] != r["ood_auroc"]
    assert (out / "reliability.png").stat().st_size > 1000


def test_an_ood_dataset_of_another_shape_is_a_clear_config_error(tiny_run, tmp_path, capsys, monkeypatch):
    import torch

    from sparse_ensembles.tasks import classification

    real = classification.load_image_dataset

    def fake(name, path=None, allow_download=False):  # CIFAR-shaped images without CIFAR files
        return (None, None, torch.rand(5, 3072), torch.zeros(5).long()) if name == "cifar10" else real(name, path, allow_download)
    monkeypatch.setattr(classification, "load_image_dataset", fake)
    out = tmp_path / "bad"
    shutil.copytree(tiny_run, out)
    assert main(["evaluate", str(out), "--ood", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert "3072 features" in err and "same shape" in err


def test_distill_cli_trains_a_student_on_a_cached_truncated_teacher_from_a_run_row(tiny_run, tmp_path):
    """Teacher = the tiny run's pruned ensemble; student = the tiny MLP with the SGD schedule. The
    table gets the label-only student (SGD x1), the distilled one, and the distilled one pruned to
    90%, retrained on the same loss and shrunk; the cache reports its size."""
    out = tmp_path / "kd"
    args = ["distill", TINY, "--teacher", f"{tiny_run}:SGLD+GSP+PR 90%", "--out", str(out), "--no-progress",
            "--set", "sampler.samples=0", "--set", "sgd.members=1", "--lam", "0.7", "--set", "distill.sparsities=[0.9]"]
    assert main(args) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(rows) == ["SGD x1", "KD(SGLD+GSP+PR 90%, lam 0.7) x1", "KD(SGLD+GSP+PR 90%, lam 0.7)+PR 90%"]
    assert rows["KD(SGLD+GSP+PR 90%, lam 0.7) x1"]["error"] < 0.5
    sparse = rows["KD(SGLD+GSP+PR 90%, lam 0.7)+PR 90%"]
    assert sparse["params_ratio"] < 0.15 and sparse["error"] < 0.6
    info = json.loads((out / "distill" / "teacher.json").read_text())
    assert info["row"] == "SGLD+GSP+PR 90%" and info["members"] == 3 and info["rows"] == 2000 and info["cache_bytes"] > 0
    assert 1 <= info["mean_kept"] <= 10


def test_self_distillation_trains_model_b_on_model_a_and_a_missing_teacher_row_is_a_clear_error(tiny_run, tmp_path, capsys):
    out = tmp_path / "self"
    assert main(["run", TINY, "--out", str(out), "--no-progress", "--set", "sampler.samples=0",
                 "--set", "sgd.members=1", "--set", "distill.teacher=\"self\""]) == 0
    assert [r["method"] for r in json.loads((out / "results.json").read_text())] == ["SGD x1", "self-distilled (lam 0.5) x1"]
    assert main(["distill", TINY, "--teacher", f"{tiny_run}:no such row", "--out", str(tmp_path / "bad"),
                 "--no-progress", "--set", "sampler.samples=0"]) == 2
    err = capsys.readouterr().err
    assert "no such row" in err and "SGLD+GSP+PR 90%" in err
    assert not (tmp_path / "bad" / "sgd").exists()  # checked before any training


def test_evaluate_only_recomputes_the_chosen_stages_and_takes_other_rows_from_their_last_evaluation(tiny_run, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(tiny_run, out)
    full = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    # mark one cached row so we can tell a reused row from a recomputed one; drop another's cache
    marked = out / "metrics" / "SGLD_x3.json"
    m = json.loads(marked.read_text())
    m["error"] = 0.123456
    marked.write_text(json.dumps(m))
    (out / "metrics" / "SGLD_GSP_x3.json").unlink()
    (out / "metrics" / "SGD_x1.json").write_text(json.dumps({"method": "SGD x1", "error": 0.999}))  # stale, recomputed
    assert main(["evaluate", str(out), "--only", "sgd", "--only", "pruned_*"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert rows["SGLD x3"]["error"] == 0.123456  # reused as saved
    assert "SGLD+GSP x3" not in rows  # no saved evaluation: left out, not invented
    assert rows["SGD x1"]["error"] == full["SGD x1"]["error"]  # recomputed
    assert rows["SGLD+GSP+PR 90%"]["nll"] == full["SGLD+GSP+PR 90%"]["nll"]
    assert (out / "reliability.png").exists() and (out / "members_curve.png").exists()


def _broken_copy(tiny_run, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(tiny_run, out)
    return out, sorted((out / "sgd").glob("member_*.pt"))[0]


class _Payload:
    """Pickles to a call of print: a file whose loading would run code."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("damage, cause", [
    ("code", "pickled objects or code"),
    ("truncated", "truncated or corrupt"),
    ("not_a_member", "not a member file"),
])
def test_evaluate_on_a_damaged_member_file_names_the_file_the_cause_and_the_fix(tiny_run, tmp_path, capsys, damage, cause):
    import torch
    out, member = _broken_copy(tiny_run, tmp_path, damage)
    if damage == "code":
        torch.save({"spec": _Payload(), "state_dict": {}}, member)
    elif damage == "truncated":
        member.write_bytes(member.read_bytes()[: member.stat().st_size // 2])
    else:
        torch.save({"weights": torch.zeros(3)}, member)
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr()
    assert "this must never run" not in err.out
    assert "Traceback" not in err.err and err.err.startswith("error: ")
    assert str(out / "sgd") in err.err and cause in err.err and "--resume" in err.err


def test_resume_after_a_corrupt_chain_checkpoint_is_a_clear_error_naming_it(tiny_run, tmp_path, capsys):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_run, out)
    chain = out / "sgld"
    (chain / "done.json").unlink()
    (chain / "chain_0.done").unlink(missing_ok=True)
    ckpt = chain / "chain_0.pt"  # the chain's epoch checkpoint
    ckpt.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["run", TINY, "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "truncated or corrupt" in err and "restarts from its first epoch" in err


def test_a_broken_run_config_or_results_json_is_a_clear_error(tiny_run, tmp_path, capsys):
    out = tmp_path / "cfg"
    shutil.copytree(tiny_run, out)
    (out / "config.current.toml").write_text("[experiment\nname = ")
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "config.current.toml" in err and "cannot be read" in err and "restore it" in err
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    out2 = tmp_path / "json"
    shutil.copytree(tiny_run, out2)
    (out2 / "sgld" / "done.json").write_text('{"train_seconds": 1.')
    assert main(["run", TINY, "--out", str(out2), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(out2 / "sgld" / "done.json") in err and "not valid JSON" in err


def test_overlapping_only_patterns_print_and_store_each_row_once(tmp_path, capsys):
    need_data("mnist")
    out = tmp_path / "overlap"
    config = str(ROOT / "configs" / "tiny_cnn_sa.toml")
    # 'sghmc_ssgl_sa' matches three of the patterns; each stage must still give one row
    assert main(["run", config, "--out", str(out), "--no-progress", "--set", "sampler.burn_in=0",
                 "--only", "sgd", "--only", "*_sa", "--only", "*sa*", "--only", "sghmc_ssgl_sa"]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("SGD", "SGHMC"))]
    printed = [cells[0] for cells in table if len(cells) > 2 and cells[2].isdigit()]  # rows, not log lines
    stored = [r["method"] for r in json.loads((out / "results.json").read_text())]
    assert stored == ["SGD x1", "SGHMC+SSGL(sa) x2"]
    assert printed == ["SGD", "SGHMC+SSGL(sa)"]


def test_counter_noise_on_a_gpu_run_is_refused_before_any_work_with_the_fix(tmp_path, capsys, monkeypatch):
    import torch
    import sparse_ensembles.experiments.pipeline as pipeline

    need_data("mnist")
    monkeypatch.setattr(pipeline, "resolve_device", lambda name: torch.device("meta"))  # stands in for cuda
    out = tmp_path / "gpu"
    assert main(["run", TINY, "--out", str(out), "--no-progress", "--set", "sampler.noise='gaussian_parallel'"]) == 2
    err = capsys.readouterr().err
    assert "gaussian_parallel" in err and "sampler.noise = 'gaussian'" in err
    assert not list(out.rglob("*.pt"))  # refused before the SGD stage trained anything
