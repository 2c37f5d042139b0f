"""The CIFAR-10 loader on small batch files written here in the python-version format: lookup,
shapes, scaling, normalisation, and DataErrors that name the file for every kind of damage. No
network: the download path is exercised on a local tarball."""
import gzip
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from sparse_ensembles.data import DataError, load_cifar10, load_image_dataset, read_cifar_batch
from sparse_ensembles.data import cifar


def _batch(n, seed, labels=None):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = list(rng.integers(0, 10, size=n)) if labels is None else labels
    return {b"batch_label": b"test", b"labels": [int(v) for v in labels], b"data": data,
            b"filenames": [b"x.png"] * n}


def _write(folder, name, obj, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(pickle.dumps(obj, protocol=protocol))


def _subset(root, n_train=2, n=10):
    """``root/cifar-10-batches-py`` with ``n_train`` training batches and a test batch of ``n`` images."""
    folder = root / cifar.FOLDER
    batches = {f"data_batch_{i + 1}": _batch(n, i) for i in range(n_train)}
    batches["test_batch"] = _batch(n, 99)
    for name, b in batches.items():
        _write(folder, name, b)
    return folder, batches


@pytest.fixture(autouse=True)
def _no_real_data(tmp_path, monkeypatch):
    """Look only where each test says: no $SPARSE_ENSEMBLES_DATA, an empty cache, no system copy."""
    monkeypatch.delenv("SPARSE_ENSEMBLES_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = cifar.candidate_dirs
    monkeypatch.setattr(cifar, "candidate_dirs",
                        lambda name, path=None: [d for d in real(name, path) if "/usr/share/datasets" not in str(d)])


def test_loader_reads_a_subset_in_the_unpacked_folder_as_flat_unit_range_floats(tmp_path):
    _, batches = _subset(tmp_path / "data")
    xtr, ytr, xte, yte = load_cifar10(str(tmp_path / "data"), verify=False)
    assert xtr.shape == (20, 3072) and xte.shape == (10, 3072)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64 and yte.dtype == torch.int64
    want = np.concatenate([batches["data_batch_1"][b"data"], batches["data_batch_2"][b"data"]]) / 255.0
    torch.testing.assert_close(xtr, torch.from_numpy(want).float())
    assert ytr.tolist() == batches["data_batch_1"][b"labels"] + batches["data_batch_2"][b"labels"]
    assert 0 <= float(xtr.min()) and float(xtr.max()) <= 1 and 0 <= int(ytr.min()) and int(ytr.max()) <= 9
    # the same through the classification entry point, with the files directly in the folder
    xtr2, *_ = load_image_dataset("cifar10", str(tmp_path / "data" / cifar.FOLDER), verify=False)
    assert torch.equal(xtr2, xtr)


def test_normalisation_uses_the_training_mean_and_std_per_channel(tmp_path):
    _subset(tmp_path)
    xtr, _, xte, _ = load_cifar10(str(tmp_path), verify=False, normalize=True)
    planes = xtr.view(len(xtr), 3, -1)
    torch.testing.assert_close(planes.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(planes.std(dim=(0, 2)), torch.ones(3), atol=1e-5, rtol=0)
    raw = load_cifar10(str(tmp_path), verify=False)[2].view(len(xte), 3, -1)
    assert not torch.allclose(xte.view(len(xte), 3, -1), raw)


def test_gzipped_files_and_python3_pickles_load_too(tmp_path):
    folder, batches = _subset(tmp_path, n_train=1)
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").unlink()
    (folder / "test_batch.gz").write_bytes(gzip.compress(data))
    _write(folder, "data_batch_1", {"data": batches["data_batch_1"][b"data"], "labels": batches["data_batch_1"][b"labels"]}, 5)
    xtr, ytr, xte, yte = load_cifar10(str(tmp_path), verify=False)
    assert xtr.shape == (10, 3072) and yte.tolist() == batches["test_batch"][b"labels"]


def test_missing_directory_error_lists_the_places_searched_and_where_to_get_cifar10(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path / "nowhere"), verify=False)
    msg = str(e.value)
    assert "not found" in msg and str(tmp_path / "nowhere") in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg and cifar.TARBALL_MD5 in msg


def test_a_folder_missing_one_canonical_batch_is_named(tmp_path):
    _subset(tmp_path, n_train=4)
    with pytest.raises(DataError, match="lacks data_batch_5"):
        load_cifar10(str(tmp_path))


def test_corrupt_file_is_a_data_error_naming_the_file(tmp_path):
    folder, _ = _subset(tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(U\x04data")  # a truncated pickle
    with pytest.raises(DataError, match=r"test_batch: cannot unpickle.*corrupt"):
        load_cifar10(str(tmp_path), verify=False)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    folder, _ = _subset(tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps(os.getcwd))
    with pytest.raises(DataError, match=r"data_batch_2: cannot unpickle.*refusing"):
        load_cifar10(str(tmp_path), verify=False)


@pytest.mark.parametrize("damage, message", [
    ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, "shape"),
    ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "uint8"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "labels"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, "0..9"),
    ({b"fine_labels": [0]}, "b'data'"),
])
def test_wrong_shapes_types_and_labels_are_data_errors_naming_the_file(tmp_path, damage, message):
    _write(tmp_path, "test_batch", damage)
    with pytest.raises(DataError, match=message) as e:
        read_cifar_batch(tmp_path / "test_batch")
    assert str(tmp_path / "test_batch") in str(e.value)


def test_md5_of_canonical_files_is_checked_unless_verify_is_off(tmp_path):
    _subset(tmp_path, n_train=5, n=3)
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path))
    msg = str(e.value)
    assert "data_batch_1: md5" in msg and cifar.MD5["data_batch_1"] in msg and "verify=False" in msg
    xtr, *_ = load_cifar10(str(tmp_path), verify=False)
    assert xtr.shape == (15, 3072)


def test_download_checks_the_tarball_md5_and_unpacks_only_the_batches(tmp_path, monkeypatch):
    _, batches = _subset(tmp_path / "src", n_train=5, n=2)
    _write(tmp_path / "src" / cifar.FOLDER, "batches.meta", {b"label_names": [b"a"] * 10})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / cifar.FOLDER, arcname=cifar.FOLDER)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())  # as if already fetched: no network
    with pytest.raises(DataError, match="md5"):
        cifar.download_cifar10(dest)
    assert not (dest / cifar.FOLDER / "test_batch").exists()
    md5 = lambda p: hashlib.md5(p.read_bytes()).hexdigest()
    monkeypatch.setattr(cifar, "TARBALL_MD5", hashlib.md5(buf.getvalue()).hexdigest())
    monkeypatch.setattr(cifar, "MD5", {n: md5(tmp_path / "src" / cifar.FOLDER / n) for n in cifar.MD5})
    monkeypatch.setattr(cifar, "BATCH", 2)
    assert cifar.download_cifar10(dest) == dest / cifar.FOLDER
    xtr, ytr, xte, yte = load_cifar10(str(dest))  # verified against the (patched) checksums
    assert xtr.shape == (10, 3072) and yte.tolist() == batches["test_batch"][b"labels"]
