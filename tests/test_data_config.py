import gzip
import os

import numpy as np
import pytest
import torch

from sparse_ensembles.data import DataError, load_idx_dataset, parse_idx, read_idx
from sparse_ensembles.data.registry import candidate_dirs
from sparse_ensembles.experiments import config


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_idx_round_trip_plain_and_gzipped(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(arr))
    (tmp_path / "b.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    assert np.array_equal(read_idx(tmp_path / "b.gz"), arr)


def test_truncated_idx_file_is_reported_as_corrupt():
    data = _idx_bytes(np.zeros((10, 4), dtype=np.uint8))[:-5]
    with pytest.raises(DataError, match="truncated or corrupt"):
        parse_idx(data, "x")


def test_bad_magic_number_is_reported():
    with pytest.raises(DataError, match="magic"):
        parse_idx(b"\x01\x02\x03\x04rest", "x")


def test_checksum_mismatch_names_both_digests(tmp_path):
    (tmp_path / "a").write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DataError, match="expected 00ff"):
        read_idx(tmp_path / "a", sha256="00ff")


def test_missing_dataset_error_lists_places_searched_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_ENSEMBLES_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:
        load_idx_dataset("mnist", path=str(tmp_path / "given"))
    msg = str(e.value)
    assert str(tmp_path / "given") in msg and str(tmp_path / "nowhere" / "mnist") in msg
    assert "download" in msg


def test_lookup_order_is_config_path_then_env_then_debian_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_ENSEMBLES_DATA", "/env")
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache")
    dirs = [str(d) for d in candidate_dirs("fashion-mnist", "/cfg")]
    assert dirs == ["/cfg", "/env/fashion-mnist", "/usr/share/datasets/fashion-mnist", "/cache/sparse_ensembles/fashion-mnist"]


def test_corrupted_copy_of_real_mnist_is_rejected_by_checksum(tmp_path, mnist_data):
    src = os.path.join(os.environ["SPARSE_ENSEMBLES_DATA"], "mnist")
    for f in os.listdir(src):
        data = open(os.path.join(src, f), "rb").read()
        if f.startswith("t10k-labels"):
            raw = bytearray(gzip.decompress(data))
            raw[100] = (raw[100] + 1) % 10  # one flipped label
            data = gzip.compress(bytes(raw))
        (tmp_path / f).write_bytes(data)
    with pytest.raises(DataError, match="sha256"):
        load_idx_dataset("mnist", path=str(tmp_path))


def test_real_mnist_loads_with_expected_shapes_and_range(mnist_small):
    xtr, ytr, xte, yte = mnist_small
    assert xtr.shape == (2000, 28, 28) and xtr.dtype == torch.float32
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) <= 1.0
    assert set(ytr.tolist()) == set(range(10))


def test_unknown_config_key_is_rejected_with_its_name():
    with pytest.raises(config.ConfigError, match="sampler.learning_rate"):
        config.from_dict({"sampler": {"learning_rate": 0.1}})
    with pytest.raises(config.ConfigError, match=r"\[sgdl\]"):
        config.from_dict({"sgdl": {}})
    with pytest.raises(config.ConfigError, match=r"\[sgld\] is now \[sampler\]"):  # the first release's schema
        config.from_dict({"sgld": {"lr": 0.1}})
    with pytest.raises(config.ConfigError, match="model.sizes"):  # a key of another kind
        config.from_dict({"model": {"kind": "lstm_lm", "sizes": [3, 4]}})


def test_wrong_type_and_invalid_value_are_rejected_with_the_key():
    with pytest.raises(config.ConfigError, match="sgd.epochs must be int"):
        config.from_dict({"sgd": {"epochs": "ten"}})
    with pytest.raises(config.ConfigError, match="prune.sparsities"):
        config.from_dict({"prune": {"sparsities": [1.5]}})
    with pytest.raises(config.ConfigError, match="sampler.prefetch_noise must be bool"):
        config.from_dict({"sampler": {"prefetch_noise": 1}})
    with pytest.raises(config.ConfigError, match="sampler.kind: unknown kind 'langevin'; known: \\['sghmc', 'sgld'\\]"):
        config.from_dict({"sampler": {"kind": "langevin"}})
    with pytest.raises(config.ConfigError, match="task.dataset"):
        config.from_dict({"task": {"dataset": "cifar-100"}})
    with pytest.raises(config.ConfigError, match="sampler.noise.*'gaussian_parallel'"):
        config.from_dict({"sampler": {"noise": "normal"}})
    assert config.from_dict({"sampler": {"noise": "gaussian_parallel"}}).sampler.noise == "gaussian_parallel"


def test_overrides_parse_toml_literals_and_resolved_config_round_trips(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[sampler]\nlr = 0.5\n')
    cfg = config.load(path, ["sampler.lr=0.25", "prune.sparsities=[0.8, 0.9]", "task.dataset=fashion-mnist",
                             "sampler.kind=sghmc", "sampler.friction=0.2"])
    assert cfg.sampler.lr == 0.25 and cfg.prune.sparsities == [0.8, 0.9] and cfg.task.dataset == "fashion-mnist"
    assert cfg.kinds["sampler"] == "sghmc" and cfg.sampler.friction == 0.2
    path.write_text(config.to_toml(cfg))
    assert config.load(path) == cfg


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert len(configs) >= 3
    for c in configs:
        config.load(c)
