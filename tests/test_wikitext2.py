"""The WikiText-2 loader on small files the tests write (the real corpus cannot be had here)."""
import dataclasses
import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch

from sparse_ensembles import checkpoint
from sparse_ensembles.compact.block_lstm import block_keep_from_weight
from sparse_ensembles.experiments.cli import main
from sparse_ensembles.data import text
from sparse_ensembles.data.errors import DataError
from sparse_ensembles.data.text import EOS, load_corpus

TRAIN = " \n = Valkyria Chronicles = \n \n Senjō no Valkyria 3 : <unk> Chronicles\n \n = = Gameplay = = \n"
VALID = " \n = Tower = \n \n The tower is <unk> .\n"
TEST = " \n = = Chronicles = = \n"


def _write(tmp_path, gz=False):
    files = {"wiki.train.tokens": TRAIN, "wiki.valid.tokens": VALID, "wiki.test.tokens": TEST}
    for name, content in files.items():
        data = content.encode()
        (tmp_path / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    return {s: hashlib.sha1(c.encode()).hexdigest() for s, c in zip(("train", "valid", "test"), files.values())}


def _with_checksums(monkeypatch, sums):
    spec = text.CORPORA["wikitext2"]
    files = {s: (spec.files[s][0], sums[s]) for s in spec.files}
    monkeypatch.setitem(text.CORPORA, "wikitext2", dataclasses.replace(spec, files=files))


def test_files_that_are_not_the_published_wikitext2_are_refused_by_sha1_with_the_expected_digest(tmp_path):
    _write(tmp_path)
    with pytest.raises(DataError, match=r"wiki\.train\.tokens: sha1 .* expected 863f29c46ef9d167fff4940ec821195882fe29d1"):
        load_corpus("wikitext2", str(tmp_path))


@pytest.mark.parametrize("gz", [False, True])
def test_wikitext2_lines_headings_and_blank_lines_become_tokens_with_eos(tmp_path, monkeypatch, gz):
    _with_checksums(monkeypatch, _write(tmp_path, gz=gz))
    corpus = load_corpus("wikitext2", str(tmp_path), unknown="unk")
    words = [corpus.vocab[i] for i in corpus.train.tolist()]
    # each line's words then <eos>; a blank line is a lone <eos> (the AWD-LSTM convention)
    assert words[:6] == [EOS, "=", "Valkyria", "Chronicles", "=", EOS]
    assert words.count(EOS) == TRAIN.count("\n")
    assert "Senjō" in corpus.vocab  # UTF-8 kept
    assert corpus.unknown_mapped["valid"] == 5  # Tower, The, tower, is, "." are not in train: <unk>
    assert corpus.test.numel() == len(TEST.split()) + TEST.count("\n")


def test_a_missing_wikitext2_file_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    _write(tmp_path)
    (tmp_path / "wiki.valid.tokens").unlink()
    monkeypatch.setenv("SPARSE_ENSEMBLES_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"(?s)wikitext2.*not found.*wikitext-2-v1\.zip"):
        load_corpus("wikitext2", str(tmp_path))


def test_a_truncated_gzipped_wikitext2_file_is_a_clear_error(tmp_path, monkeypatch):
    _with_checksums(monkeypatch, _write(tmp_path, gz=True))
    blob = (tmp_path / "wiki.test.tokens.gz").read_bytes()
    (tmp_path / "wiki.test.tokens.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"wiki\.test\.tokens\.gz: cannot read .*truncated or corrupt"):
        load_corpus("wikitext2", str(tmp_path))


def test_the_shipped_wikitext2_config_runs_gradual_block_pruning_end_to_end_on_written_files(tmp_path, monkeypatch):
    torch.manual_seed(0)
    data = tmp_path / "wt2"
    data.mkdir()
    # enough text for 2 x 3-token segments per batch row; valid / test words seen in train
    words = "the tower of the chronicles is a game = = gameplay = = <unk> .".split()
    lines = [" ".join(words[(i * 3) % len(words):] + words[: (i * 3) % len(words)]) for i in range(12)]
    train, heldout = "\n".join(lines) + "\n", "\n".join(lines[:3]) + "\n"
    sums = {}
    for split, content in (("train", train), ("valid", heldout), ("test", heldout)):
        (data / f"wiki.{split}.tokens").write_text(content)
        sums[split] = hashlib.sha1(content.encode()).hexdigest()
    _with_checksums(monkeypatch, sums)
    config = Path(__file__).resolve().parents[1] / "configs" / "wt2_lstm_block_gradual.toml"
    out = tmp_path / "run"
    tiny = ["task.path=" + str(data), "task.batch_size=2", "task.bptt=3", "model.hidden=40", "model.block=[8, 8]",
            "sgd.epochs=3", "sgd.decay_start=1", "sgd.prune_start=0", "sgd.prune_ramp=2"]
    assert main(["run", str(config), "--out", str(out), "--no-progress", *[a for t in tiny for a in ("--set", t)]]) == 0
    model, _ = checkpoint.load_member(out / "sgd" / "member_000.pt")
    kept = block_keep_from_weight(model.lstms[0].weight_hh_l0.detach(), (8, 8))
    assert 1 - kept.float().mean().item() == pytest.approx(0.8, abs=0.02)  # 80% of its 8x8 blocks
    row = json.loads((out / "results.json").read_text())[0]
    assert row["method"] == "SGD x1" and all(1 < row[k] < 1e3 for k in ("ppl_valid", "ppl_test"))  # scored, finite
