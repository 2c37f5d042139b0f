import gzip
import hashlib
from pathlib import Path

import pytest
import torch

from sparse_ensembles.data import (CORPORA, DataError, batchify, bptt_segments, load_corpus,
                                   read_text_corpus)

PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"
needs_ptb = pytest.mark.skipif(not PTB.is_dir(), reason=f"real PTB files not found at {PTB}")


@pytest.fixture(scope="module")
def ptb():
    return load_corpus("ptb", str(PTB))


def _gunzip_text(split: str) -> bytes:
    return gzip.decompress((PTB / f"ptb.{split}.txt.gz").read_bytes())


def _write(path: Path, text: str, gz: bool = False) -> Path:
    data = text.encode("utf-8")
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _corpus_files(d: Path, train: str, valid: str = "a b\n", test: str = "b a\n", gz: bool = False):
    return [_write(d / f"{s}.txt", t, gz) for s, t in (("train", train), ("valid", valid), ("test", test))]


# --- real PTB ---------------------------------------------------------------------------------

@needs_ptb
def test_real_ptb_has_10000_words_and_the_published_token_counts(ptb):
    assert ptb.vocab_size == 10000
    assert (len(ptb.train), len(ptb.valid), len(ptb.test)) == (929589, 73760, 82430)
    assert ptb.unknown_mapped == {"train": 0, "valid": 0, "test": 0}
    assert all(ptb.split(s).dtype == torch.int64 and ptb.split(s).dim() == 1 for s in ("train", "valid", "test"))


@needs_ptb
def test_real_ptb_has_one_eos_per_line(ptb):
    eos = ptb.vocab.index("<eos>")
    for split in ("train", "valid", "test"):
        n_lines = _gunzip_text(split).decode("utf-8").count("\n")
        assert int((ptb.split(split) == eos).sum()) == n_lines


@needs_ptb
def test_real_ptb_md5_constants_match_the_shipped_md5sums_and_the_files():
    shipped = dict(line.split()[::-1] for line in (PTB / "MD5SUMS").read_text().splitlines() if line.strip())
    for split, (fname, md5) in CORPORA["ptb"].files.items():
        assert shipped[fname] == md5
        assert hashlib.md5(_gunzip_text(split)).hexdigest() == md5


# --- batching ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_tokens,batch_size,bptt", [(103, 4, 7), (100, 5, 35), (50, 1, 49), (64, 8, 1)])
def test_batchify_and_bptt_segments_keep_token_order(n_tokens, batch_size, bptt):
    torch.manual_seed(0)
    tokens = torch.randint(0, 1000, (n_tokens,))
    batched = batchify(tokens, batch_size)
    n = n_tokens // batch_size
    assert batched.shape == (batch_size, n)
    assert torch.equal(batched.reshape(-1), tokens[: n * batch_size])  # row by row = the stream
    segments = list(bptt_segments(batched, bptt))
    xs = torch.cat([x for x, _ in segments], dim=1)
    ys = torch.cat([y for _, y in segments], dim=1)
    assert torch.equal(xs, batched[:, :-1]) and torch.equal(ys, batched[:, 1:])  # y is x shifted by one
    assert all(x.shape == y.shape and x.shape[1] <= bptt for x, y in segments)


def test_bptt_segments_predict_every_token_but_the_first_of_each_row_exactly_once():
    batched = torch.arange(2 * 10).reshape(2, 10)
    targets = torch.cat([y for _, y in bptt_segments(batched, 4)], dim=1)
    assert [y.shape[1] for _, y in bptt_segments(batched, 4)] == [4, 4, 1]
    assert torch.equal(targets, batched[:, 1:])


@pytest.mark.parametrize("batch_size", [0, -1, 11])
def test_bad_batch_size_is_a_value_error_with_the_numbers(batch_size):
    with pytest.raises(ValueError, match=rf"batch_size {batch_size} .*\(10\)"):
        batchify(torch.arange(10), batch_size)


def test_bad_bptt_is_a_value_error():
    with pytest.raises(ValueError, match="bptt 0"):
        bptt_segments(torch.zeros(2, 5, dtype=torch.int64), 0)


# --- small corpora ----------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_small_corpus_vocab_is_ordered_by_train_frequency_then_word(tmp_path, gz):
    files = _corpus_files(tmp_path, "b a c\na b\n<unk> b\n", gz=gz)
    corpus = read_text_corpus(*files)
    # counts: b 3, <eos> 3, a 2, <unk> 1, c 1
    assert corpus.vocab == ["<eos>", "b", "a", "<unk>", "c"]
    assert corpus.vocab_size == 5


@pytest.mark.parametrize("gz", [False, True])
def test_small_corpus_appends_eos_per_line_and_ids_round_trip_to_words(tmp_path, gz):
    train = " the cat sat \nthe dog\n\nthe end"  # leading/trailing spaces, an empty line, no final newline
    files = _corpus_files(tmp_path, train, valid="the cat\n", test="dog end\nsat\n", gz=gz)
    corpus = read_text_corpus(*files, name="tiny")
    words = lambda s: [corpus.vocab[i] for i in corpus.split(s).tolist()]
    assert words("train") == ["the", "cat", "sat", "<eos>", "the", "dog", "<eos>", "<eos>", "the", "end", "<eos>"]
    assert words("valid") == ["the", "cat", "<eos>"]
    assert words("test") == ["dog", "end", "<eos>", "sat", "<eos>"]
    assert corpus.name == "tiny" and corpus.unknown_mapped == {"train": 0, "valid": 0, "test": 0}


def test_train_file_without_unk_still_gets_unk_in_the_vocabulary(tmp_path):
    corpus = read_text_corpus(*_corpus_files(tmp_path, "a b\n"))
    assert "<unk>" in corpus.vocab and "<eos>" in corpus.vocab


def test_load_corpus_text_reads_train_valid_test_from_the_given_directory(tmp_path):
    _write(tmp_path / "train.txt", "a b a\n", gz=True)
    _write(tmp_path / "valid.txt", "b\n")
    _write(tmp_path / "test.txt", "a\n")
    corpus = load_corpus("text", str(tmp_path))
    assert corpus.name == "text" and corpus.vocab == ["a", "<eos>", "b", "<unk>"]
    assert corpus.valid.tolist() == [2, 1]


# --- errors -----------------------------------------------------------------------------------

def test_missing_file_error_names_the_file_and_the_fix(tmp_path):
    train, valid, test = _corpus_files(tmp_path, "a b\n")
    valid.unlink()
    with pytest.raises(DataError, match=r"valid\.txt: no such file; put the valid split there"):
        read_text_corpus(train, valid, test)


def test_missing_corpus_directory_lists_the_directories_searched_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_ENSEMBLES_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:
        load_corpus("ptb", str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and str(tmp_path / "data" / "ptb") in msg
    assert "ptb.train.txt" in msg and "To get it:" in msg and "simple-examples" in msg
    with pytest.raises(DataError, match="needs a directory"):
        load_corpus("text")
    with pytest.raises(DataError, match="unknown corpus 'wiki'"):
        load_corpus("wiki")


def test_corrupt_gzip_is_reported_as_truncated_or_corrupt(tmp_path):
    train, valid, test = _corpus_files(tmp_path, "a b\n" * 100, gz=True)
    train.write_bytes(train.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"train\.txt\.gz: cannot read .*truncated or corrupt"):
        read_text_corpus(train, valid, test)
    damaged = bytearray(gzip.compress(b"a b\n" * 1000))
    damaged[30:40] = b"\xff" * 10  # a broken deflate stream (zlib.error), not just a short file
    train.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"train\.txt\.gz: cannot read .*truncated or corrupt"):
        read_text_corpus(train, valid, test)
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"bad\.gz: cannot read"):
        read_text_corpus(bad, valid, test)


@pytest.mark.parametrize("content", ["", "\n\n", "  \n"])
def test_empty_file_without_words_is_an_error(tmp_path, content):
    train, valid, test = _corpus_files(tmp_path, "a b\n", test=content)
    with pytest.raises(DataError, match=r"test\.txt: empty \(no words\)"):
        read_text_corpus(train, valid, test)


def test_md5_mismatch_says_expected_and_got(tmp_path):
    files = _corpus_files(tmp_path, "a b\n")
    good = hashlib.md5(b"a b\n").hexdigest()
    read_text_corpus(*files, checksums={"train": good})
    with pytest.raises(DataError, match=rf"train\.txt: md5 .* is {good}, expected 0+; .*fetch it again"):
        read_text_corpus(*files, checksums={"train": "0" * 32})


def test_invalid_utf8_is_an_error_naming_the_file(tmp_path):
    train, valid, test = _corpus_files(tmp_path, "a b\n")
    valid.write_bytes(b"a \xff b\n")
    with pytest.raises(DataError, match=r"valid\.txt: not valid UTF-8.*re-save the file as UTF-8"):
        read_text_corpus(train, valid, test)


def test_unknown_valid_word_is_an_error_naming_the_split_file_the_count_and_the_word(tmp_path):
    files = _corpus_files(tmp_path, "a b\n", valid="a zebra\nzebra yak\n")
    with pytest.raises(DataError) as e:
        read_text_corpus(*files)
    msg = str(e.value)
    assert "valid.txt" in msg and "3 words (2 distinct)" in msg and "'zebra'" in msg and "'yak'" in msg
    assert 'unknown = "unk"' in msg


def test_unknown_valid_words_with_unknown_unk_are_mapped_to_unk_and_counted(tmp_path):
    files = _corpus_files(tmp_path, "a b\n", valid="a zebra\nzebra yak\n")
    corpus = read_text_corpus(*files, unknown="unk")
    assert corpus.unknown_mapped == {"train": 0, "valid": 3, "test": 0}
    assert [corpus.vocab[i] for i in corpus.valid.tolist()] == ["a", "<unk>", "<eos>", "<unk>", "<unk>", "<eos>"]


def test_bad_unknown_mode_is_a_value_error_naming_the_allowed_values(tmp_path):
    files = _corpus_files(tmp_path, "a b\n")
    with pytest.raises(ValueError, match=r"'error', 'unk'"):
        read_text_corpus(*files, unknown="skip")
    with pytest.raises(ValueError, match=r"'error', 'unk'"):
        load_corpus("text", str(tmp_path), unknown="skip")
