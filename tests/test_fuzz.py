"""Fuzzing (hypothesis): random values for every config key, random damage to every file format we
read. The contract: a config error naming the key, a data error, or a run-file error naming the
file, and never a traceback from deep inside, never a silently different result. Examples are
derandomised (the same cases on every run); the counts are printed with ``pytest -s``."""
import copy
import gzip
import hashlib
import math
import pickle
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_ensembles import checkpoint
from sparse_ensembles.data import DataError
from sparse_ensembles.data.cifar import read_cifar_batch
from sparse_ensembles.data.idx import read_idx
from sparse_ensembles.data.text import read_text_corpus
from sparse_ensembles.experiments.config import ConfigError, from_dict
from sparse_ensembles.models import MLP, CNN, LSTMLM

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["tiny.toml", "tiny_lm.toml", "tiny_cnn_sa.toml", "tiny_lm_block.toml", "fmnist_resnet20_sa.toml",
           "mnist_distill.toml", "ptb_lstm_sse_small.toml"]
FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COUNTS: dict[str, int] = {}


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nfuzz cases run: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))


RAW = {name: tomllib.loads((ROOT / "configs" / name).read_text()) for name in CONFIGS}
TARGETS = [(name, section, key) for name, raw in RAW.items()  # every key, defaults included
           for section, values in from_dict(copy.deepcopy(raw)).to_dict().items() if section != "variants"
           for key in values]
SCALARS = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.booleans())
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))


@settings(FUZZ, max_examples=600)
@given(target=st.sampled_from(TARGETS), value=VALUES)
def test_any_value_for_any_config_key_is_accepted_or_a_config_error_naming_the_key(target, value):
    name, section, key = target
    raw = copy.deepcopy(RAW[name])
    raw.setdefault(section, {})[key] = value
    _count("config values")
    try:
        from_dict(raw)
    except ConfigError as e:
        assert key in str(e), (name, section, key, value, str(e))


@settings(FUZZ, max_examples=200)
@given(target=st.sampled_from(TARGETS), junk=st.text(min_size=1, max_size=8).filter(str.isidentifier))
def test_an_unknown_key_in_any_section_is_a_config_error_naming_it(target, junk):
    name, section, _ = target
    raw = copy.deepcopy(RAW[name])
    if junk in from_dict(copy.deepcopy(raw)).to_dict().get(section, {}):
        return
    raw.setdefault(section, {})["zz_" + junk] = 1
    _count("config unknown keys")
    with pytest.raises(ConfigError, match="zz_" + junk):
        from_dict(raw)


# ----- damaged files ------------------------------------------------------------------------------

DAMAGE = st.one_of(st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
                   st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)))


def _damage(data: bytes, how) -> bytes:
    if how[0] == "truncate":
        return data[: int(how[1] * len(data))]
    i = int(how[1] * len(data))
    return data[:i] + bytes([data[i] ^ how[2]]) + data[i + 1:]


def _idx_bytes() -> bytes:
    images = np.random.default_rng(0).integers(0, 256, size=(6, 4, 4), dtype=np.uint8)
    return bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape) + images.tobytes()


@settings(FUZZ, max_examples=150)
@given(how=DAMAGE, gz=st.booleans())
def test_a_damaged_idx_file_is_a_data_error_with_or_without_its_checksum(tmp_path_factory, how, gz):
    good = _idx_bytes()
    bad = _damage(gzip.compress(good, mtime=0) if gz else good, how)
    path = tmp_path_factory.mktemp("idx") / "images.idx"
    path.write_bytes(bad)
    _count("idx")
    try:  # with the checksum: an error, or the very same images (a flip in the gzip header's time stamp)
        same = read_idx(path, sha256=hashlib.sha256(good).hexdigest())
        assert gz and same.tobytes() == good[16:]
    except DataError:
        pass
    try:  # without it: an error, or an array of the right kind (a flipped pixel is a valid file)
        arr = read_idx(path)
    except DataError:
        return
    assert arr.ndim >= 1 and math.prod(arr.shape) * arr.dtype.itemsize <= len(good)


TEXT = "the cat sat on the mat\n a b c <unk>\n" * 3


@settings(FUZZ, max_examples=100)
@given(how=DAMAGE, gz=st.booleans())
def test_a_damaged_text_corpus_file_is_a_data_error_when_its_checksum_is_known(tmp_path_factory, how, gz):
    d = tmp_path_factory.mktemp("text")
    good = TEXT.encode()
    bad = _damage(gzip.compress(good, mtime=0) if gz else good, how)
    train = d / ("train.txt" + (".gz" if gz else ""))
    train.write_bytes(bad)
    for split in ("valid", "test"):
        (d / f"{split}.txt").write_text("the cat\n")
    (d / "good.txt").write_bytes(good)
    reference = read_text_corpus(d / "good.txt", d / "valid.txt", d / "test.txt")
    _count("text")
    sums = {"train": hashlib.md5(good).hexdigest()}
    try:  # with the checksum: an error, or the very same text (a flip in the gzip header's time stamp)
        same = read_text_corpus(train, d / "valid.txt", d / "test.txt", checksums=sums)
        assert gz and same.split("train").tolist() == reference.split("train").tolist()
    except DataError:
        pass
    try:
        corpus = read_text_corpus(train, d / "valid.txt", d / "test.txt")
    except DataError:
        return
    assert corpus.vocab_size > 0


def _cifar_bytes() -> bytes:
    rng = np.random.default_rng(1)
    return pickle.dumps({b"batch_label": b"x", b"labels": [int(v) for v in rng.integers(0, 10, 5)],
                         b"data": rng.integers(0, 256, size=(5, 3072), dtype=np.uint8), b"filenames": [b"a"] * 5},
                        protocol=2)


@settings(FUZZ, max_examples=150)
@given(how=DAMAGE)
def test_a_damaged_cifar_batch_is_a_data_error_and_never_runs_code(tmp_path_factory, how):
    good = _cifar_bytes()
    path = tmp_path_factory.mktemp("cifar") / "data_batch_1"
    path.write_bytes(_damage(good, how))
    _count("cifar")
    with pytest.raises(DataError):
        read_cifar_batch(path, md5=hashlib.md5(good).hexdigest())
    try:
        data, labels = read_cifar_batch(path)
    except DataError:
        return
    assert data.shape[1] == 3072 and len(labels) == len(data) and labels.min() >= 0 and labels.max() < 10


MEMBERS = {"mlp": lambda: MLP([16, 8, 3]), "cnn": lambda: CNN([1, 8, 8], classes=3, channels=[2, 3], hidden=5),
           "lstm_lm": lambda: LSTMLM(vocab=11, hidden=[4], emb=4)}


@pytest.fixture(scope="module")
def member_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("members")
    files = {}
    for kind, make in MEMBERS.items():
        torch.manual_seed(0)
        checkpoint.save_member(d / f"{kind}.pt", make(), epoch=3)
        files[kind] = (d / f"{kind}.pt").read_bytes()
    return files


@settings(FUZZ, max_examples=300)
@given(kind=st.sampled_from(sorted(MEMBERS)), how=DAMAGE)
def test_a_damaged_member_file_is_a_run_file_error_naming_it_never_a_different_model(
        member_files, tmp_path_factory, kind, how):
    good = member_files[kind]
    bad = _damage(good, how)
    path = tmp_path_factory.mktemp("m") / "member_000.pt"
    path.write_bytes(bad)
    _count("member files")
    try:
        model, meta = checkpoint.load_member(path)
    except checkpoint.RunFileError as e:
        assert e.path == path and str(path) in str(e) and "--resume" in str(e)
        return
    # loaded: then it must be the very same member (a flip in unused archive bytes changes nothing)
    (path.parent / "good.pt").write_bytes(good)
    ref, ref_meta = checkpoint.load_member(path.parent / "good.pt")
    assert meta == ref_meta
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
