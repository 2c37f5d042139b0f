"""The benchmarks' --quick modes run on a fresh clone (no run directory, no data needed) and write their keys."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import need_data

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "SPARSE_ENSEMBLES_RESULTS": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_lstm_inference_quick_writes_speedups_and_ensemble_ratio_on_synthetic_members(tmp_path):
    out = run_quick("lstm_inference.py", tmp_path, "--threads", "1")
    files = list(tmp_path.glob("lstm_inference*_quick.json"))
    assert len(files) == 1, out
    r = json.loads(files[0].read_text())
    for key in ("iss_speedup_batch1", "iss_speedup_batch20", "flops_ratio", "ensemble_vs_single_dense"):
        assert r[key] > 0, key
    assert r["flops_ratio"] > 1  # the synthetic ISS members are smaller than the dense LM
    assert out.strip().splitlines()[-1].startswith("lstm_inference")  # the one-line summary comes last


def test_sse_seeds_quick_writes_per_seed_rows_spread_and_target_verdict(tmp_path):
    need_data("mnist")  # the tiny config reads MNIST
    out = run_quick("sse_seeds.py", tmp_path, "tiny", "--seeds", "0", "1", "--sparsity", "0.9",
                    "--runs", str(tmp_path / "runs"))
    r = json.loads((tmp_path / "tiny_quick_seeds.json").read_text())
    assert [s["seed"] for s in r["per_seed"]] == [0, 1]
    errors = [s["sse"]["error_test"] for s in r["per_seed"]]
    assert errors[0] != errors[1]  # the seed reaches init, data order and noise
    spread = r["summary"]["sse"]["error_test"]
    assert abs(spread["mean"] - sum(errors) / 2) < 1e-12 and spread["std"] > 0
    assert r["summary"]["sse"]["params_ratio"]["max"] < 1  # 90% of a tiny net: under one dense model
    assert r["target"]["sgd_many"] is None and r["target"]["met"] is False  # no full table to compare with
    assert out.strip().splitlines()[-1].startswith("tiny_quick_seeds")


def test_sse_seeds_tag_keeps_a_candidate_recipe_apart_from_the_shipped_record(tmp_path):
    """--tag names the run directories and the results file, so a candidate never overwrites the shipped seeds."""
    need_data("mnist")
    out = run_quick("sse_seeds.py", tmp_path, "tiny", "--seeds", "0", "1", "--sparsity", "0.9", "--tag", "lam2",
                    "--set", "prior.lam=2.0", "--runs", str(tmp_path / "runs"))
    assert not (tmp_path / "tiny_quick_seeds.json").exists()
    r = json.loads((tmp_path / "tiny_lam2_quick_seeds.json").read_text())
    assert [Path(s["run"]).name for s in r["per_seed"]] == ["tiny_lam2_quick_seed0", "tiny_lam2_quick_seed1"]
    assert "prior.lam=2.0" in r["overrides"]
    assert out.strip().splitlines()[-1].startswith("tiny_lam2_quick_seeds")


def test_sse_tables_stage_seconds_counts_each_chain_once_and_the_largest_sgd_ensemble():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sse_tables import stage_seconds
    rows = [{"method": "SGD x1", "train_seconds": 10.0}, {"method": "SGD x4", "train_seconds": 40.0},
            {"method": "SGLD x4", "train_seconds": 7.0},
            {"method": "SGLD+GSP(iss) x4", "train_seconds": 100.0},
            {"method": "SGLD+GSP(iss)+PR 90%", "train_seconds": 130.0},  # chain 100 + retraining 30
            {"method": "SGLD+GSP(iss)+PR 80%", "train_seconds": 125.0}]  # the same chain + retraining 25
    assert stage_seconds(rows) == 40 + 7 + 100 + 30 + 25


def test_compact_inference_sparsity_takes_a_percent_or_a_fraction_and_rejects_words():
    import argparse

    import pytest
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compact_inference import _percent
    assert _percent("96") == _percent("0.96") == _percent("96%") == "96"
    assert _percent("0.9") == "90"
    with pytest.raises(argparse.ArgumentTypeError, match="percent"):
        _percent("high")


def test_block_sparse_quick_writes_the_layer_and_product_speedups_at_80_percent(tmp_path):
    out = run_quick("block_sparse.py", tmp_path)
    r = json.loads((tmp_path / "block_sparse_quick.json").read_text())
    for key in ("layer_inference_speedup_80", "layer_train_speedup_80", "matmul_speedup_80_batch1"):
        assert r[key] > 0, key
    assert all(row["sparsity"] == 80 and row["block"] == [32, 32] for row in r["rows"])
    assert out.strip()


def test_block_lm_train_quick_writes_the_whole_model_step_and_inference_speedups(tmp_path):
    out = run_quick("block_lm_train.py", tmp_path)
    r = json.loads((tmp_path / "block_lm_train_quick.json").read_text())
    for kind in ("train_step", "inference"):
        assert r[kind]["speedup"] > 0 and r[kind]["dense_ms"] > 0 and r[kind]["kernel_ms"] > 0, kind
        assert r[kind]["kernel_executor"] in ("numba", "numba_parallel")
    assert r["sparsity"] == 0.8 and "block_lm_train" in out


def test_block_sse_recipes_reports_member_and_ensemble_valid_perplexity_of_a_run(tmp_path):
    need_data("ptb")
    import math

    from sparse_ensembles.experiments.cli import main
    run = tmp_path / "tiny_block"
    assert main(["run", str(ROOT / "configs" / "tiny_lm_block.toml"), "--out", str(run), "--no-progress",
                 "--set", "sgd.members=0", "--set", "retrain.epochs=2", "--set", "retrain.ramp_epochs=1"]) == 0
    env = {**os.environ, "SPARSE_ENSEMBLES_RESULTS": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "block_sse_recipes.py"), str(run)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((tmp_path / "block_sse_recipes.json").read_text())["runs"][0]
    assert r["recipe"]["retrain_epochs"] == 2 and r["recipe"]["ramp_epochs"] == 1
    ppls = [m["ppl_valid"] for m in r["members"]]
    assert len(ppls) == 2 and all(m["block_sparsity"] >= 0.79 for m in r["members"])
    # averaging probabilities: the ensemble is no worse than the members' geometric mean (Jensen)
    assert r["ensemble_ppl_valid"] <= math.exp(sum(math.log(p) for p in ppls) / 2) + 1e-6


def test_gpu_checks_script_runs_its_steps_on_cpu_and_writes_the_lstm_and_scaling_ratios(tmp_path):
    env = {**os.environ, "SPARSE_ENSEMBLES_RESULTS": str(tmp_path), "PYTHON": sys.executable, "DEVICE": "cpu",
           "HIDDEN": "32", "QUICK": "1"}
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "gpu_checks: 0 step(s) failed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    lstm = json.loads((tmp_path / "lstm_sampler_overhead_cpu_h32.json").read_text())
    assert lstm["sgld_group_lasso_vs_sgd"] > 0 and set(lstm["median_ms_per_step"]) >= {"sgd", "sgld", "sgld_group_lasso", "sgld_group_lasso_compiled"}
    scaling = json.loads((tmp_path / "scaling.json").read_text())
    assert {r["chains"] for r in scaling["rows"]} == {4, 18}
    step_kernels = json.loads((tmp_path / "step_kernels_cpu.json").read_text())
    kernels = step_kernels["models"]["mlp_784_300_100_10"]
    # host time at tiny widths: the group Lasso's extra dispatches cost more than SGLD's (2.25x vs 1.35x)
    host = step_kernels["host_us_per_step"]["mlp_8_6_4_2"]
    assert host["sgd"]["us"] > 0 and host["sgld_group_lasso"]["us"] > host["sgld"]["us"]
    assert kernels["sgld"]["dispatched"] < kernels["sgld_group_lasso"]["dispatched"] <= kernels["sgld"]["dispatched"] + 16
    # the prior adds out of place with multi-tensor calls: no copy per gradient, no repeated scales
    assert not [op for op in kernels["sgld_group_lasso"]["dispatched_by_optimiser"] if "clone" in op or "repeat" in op]


def test_regression_sa_quick_authors_protocol_reaches_the_chains_and_the_noise_study_gives_each_chain_its_stream(
        tmp_path):
    run_quick("regression_sa.py", tmp_path, "--protocol", "authors")
    r = json.loads((tmp_path / "regression_sa_authors_quick.json").read_text())
    assert r["protocol_settings"] == {"start_sd": 0.1, "kappa": 1.0, "sa_on": "sigma2", "grad_noise_sd": 0.01,
                                      "burn_in": 0.2}
    sa, em = r["methods"]["sgld_sa"][0], r["methods"]["sgld_em"][0]
    assert sa["draws"] == 400  # 5,000 steps thinned by 10, the first 20% dropped (the notebook's burn-in)
    assert sa["beta_mean"] != em["beta_mean"]  # omega reaches the latents: SA and EM are different chains
    out = run_quick("regression_sa.py", tmp_path, "--protocol", "authors", "--noise-seeds", "2")
    study = json.loads((tmp_path / "regression_sa_noise2_authors_quick.json").read_text())
    assert sorted(row["noise_seed"] for row in study["rows"]) == [1, 2, 3, 4]  # every chain its own stream
    assert {m: v["chains"] for m, v in study["summary"].items()} == {"sgld_sa": 2, "sgld_em": 2}
    assert "noise study" in out.strip().splitlines()[-1]
