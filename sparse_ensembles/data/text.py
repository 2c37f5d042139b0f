"""Word-level text corpora (Penn Treebank in Mikolov's LM format) and Zaremba's BPTT batching.

Format: UTF-8 text, one sentence per line, words separated by spaces, rare words already replaced
by ``<unk>``. Every line becomes its words followed by ``<eos>`` (a final newline does not start
another line). The vocabulary comes from the train split only, always holds ``<eos>`` and
``<unk>``, and is ordered by descending train frequency, ties broken by the word.

Corpora:

* ``"ptb"``: ``ptb.{train,valid,test}.txt`` (plain or ``.gz``), found like the IDX data
  (:func:`sparse_ensembles.data.registry.candidate_dirs`) and checked against the md5 of the
  uncompressed text.
* ``"wikitext2"``: WikiText-2 (Merity et al. 2016, the tokenised ``wikitext-2-v1`` release):
  ``wiki.{train,valid,test}.tokens``, checked against their published SHA-1. Lines are paragraphs
  and `` = Heading = `` lines; blank lines are kept as a lone ``<eos>`` (as in the AWD-LSTM
  reader), giving 2,088,628 / 217,646 / 245,569 tokens and a 33,278-word vocabulary.
* ``"text"``: your own corpus in the same format: the directory given as ``path`` (``task.path``)
  must hold ``train.txt``, ``valid.txt`` and ``test.txt`` (plain or ``.gz``); no checksums.
"""
from __future__ import annotations

import gzip
import hashlib
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from .errors import DataError
from .registry import _find_file, candidate_dirs, first_dir_with

EOS, UNK = "<eos>", "<unk>"
SPLITS = ("train", "valid", "test")
UNKNOWN_MODES = ("error", "unk")


@dataclass(frozen=True)
class TextCorpusSpec:
    name: str
    files: dict  # split -> (file name, hex md5 / sha1 / sha256 of the uncompressed text, or None)
    how_to_get: str


CORPORA = {
    # md5 of the uncompressed files of Mikolov's simple-examples/data (as in shared/data/ptb/MD5SUMS)
    "ptb": TextCorpusSpec(
        "ptb",
        {"train": ("ptb.train.txt", "f26c4b92c5fdc7b3f8c7cdcb991d8420"),
         "valid": ("ptb.valid.txt", "aa0affc06ff7c36e977d7cd49e3839bf"),
         "test": ("ptb.test.txt", "8b80168b89c18661a38ef683c0dc3721")},
        "take ptb.{train,valid,test}.txt from data/ in Mikolov's "
        "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz and put them (plain or gzipped) "
        "in $SPARSE_ENSEMBLES_DATA/ptb, or set task.path to their directory",
    ),
    # SHA-1 of the files in wikitext-2-v1.zip, as published with the GluonNLP / MXNet loaders
    "wikitext2": TextCorpusSpec(
        "wikitext2",
        {"train": ("wiki.train.tokens", "863f29c46ef9d167fff4940ec821195882fe29d1"),
         "valid": ("wiki.valid.tokens", "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422"),
         "test": ("wiki.test.tokens", "c7b8ce0aa086fb34dab808c5c49224211eb2b172")},
        "unzip wikitext-2-v1.zip (https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip, "
        "the tokenised release, not -raw) and put wiki.{train,valid,test}.tokens (plain or gzipped) in "
        "$SPARSE_ENSEMBLES_DATA/wikitext2, or set task.path to their directory",
    ),
    "text": TextCorpusSpec(
        "text", {s: (f"{s}.txt", None) for s in SPLITS},
        "set task.path to a directory holding train.txt, valid.txt and test.txt (plain or gzipped; "
        "one sentence per line, words separated by spaces)",
    ),
}


@dataclass
class Corpus:
    name: str
    vocab: list  # id -> word
    train: torch.Tensor  # int64 token ids, 1-D
    valid: torch.Tensor
    test: torch.Tensor
    unknown_mapped: dict  # split -> number of out-of-vocabulary words mapped to <unk>

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {list(SPLITS)}")
        return getattr(self, name)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


DIGESTS = {32: "md5", 40: "sha1", 64: "sha256"}  # hex length -> hash


def _read_words(path: Path, split: str, checksum: Optional[str]) -> list:
    """The token stream of one file: each line's words, then ``<eos>``."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; put the {split} split there (one sentence per line, "
                        "words separated by spaces) or point task.path at the directory that holds it")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b" or path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or corrupt — delete it and "
                        "fetch it again") from e
    if checksum is not None:
        algo = DIGESTS[len(checksum)]
        got = hashlib.new(algo, raw).hexdigest()
        if got != checksum:
            raise DataError(f"{path}: {algo} of the uncompressed text is {got}, expected {checksum}; the file is "
                            "corrupt or a different version — fetch it again")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e}); re-save the file as UTF-8") from e
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    words = []
    for line in lines:
        words.extend(line.split())
        words.append(EOS)
    if len(words) == len(lines):
        raise DataError(f"{path}: empty (no words); the {split} split needs at least one sentence — "
                        "fetch the file again or fix it")
    return words


def build_vocab(words: list) -> list:
    """Words by descending frequency, ties broken by the word; ``<eos>`` and ``<unk>`` always in."""
    counts = Counter(words)
    for w in (EOS, UNK):
        counts.setdefault(w, 0)
    return sorted(counts, key=lambda w: (-counts[w], w))


def read_text_corpus(train, valid, test, *, name: str = "text", checksums: Optional[dict] = None,
                     unknown: str = "error") -> Corpus:
    """Read three files; ``checksums`` maps split -> hex md5, sha1 or sha256 of the uncompressed
    text (told apart by length; checked where given).
    ``unknown="unk"`` maps valid/test words missing from the train vocabulary to ``<unk>``."""
    if unknown not in UNKNOWN_MODES:
        raise ValueError(f"unknown={unknown!r}; use one of {list(UNKNOWN_MODES)}")
    checksums = checksums or {}
    bad = {s: c for s, c in checksums.items() if c is not None and len(c) not in DIGESTS}
    if bad:
        raise ValueError(f"checksums {bad}: give hex md5 (32), sha1 (40) or sha256 (64) digests")
    paths = dict(zip(SPLITS, (Path(train), Path(valid), Path(test))))
    words = {s: _read_words(p, s, checksums.get(s)) for s, p in paths.items()}
    vocab = build_vocab(words["train"])
    index = {w: i for i, w in enumerate(vocab)}
    ids, mapped = {}, {}
    for s in SPLITS:
        counts = Counter(w for w in words[s] if w not in index)
        mapped[s] = sum(counts.values())
        if counts and unknown == "error":
            examples = sorted(counts, key=lambda w: (-counts[w], w))[:5]
            raise DataError(f"{paths[s]}: {mapped[s]} words ({len(counts)} distinct) of the {s} split are "
                            f"not in the train vocabulary, e.g. {examples}; set unknown = \"unk\" in the task "
                            "config to map them to <unk>, or rebuild the files with the train vocabulary")
        unk = index[UNK]
        ids[s] = torch.tensor([index.get(w, unk) for w in words[s]], dtype=torch.int64)
    return Corpus(name, vocab, ids["train"], ids["valid"], ids["test"], mapped)


def _spec(name: str) -> TextCorpusSpec:
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; known: {sorted(CORPORA)}")
    return CORPORA[name]


def locate_corpus(name: str, path: Optional[str] = None) -> Path:
    """The first candidate directory that holds all three files of the corpus."""
    spec = _spec(name)
    if name == "text":
        if not path:
            raise DataError(f"corpus 'text' needs a directory; {spec.how_to_get}")
        searched = [Path(path).expanduser()]
    else:
        searched = candidate_dirs(name, path)
    found = first_dir_with(searched, [f for f, _ in spec.files.values()])
    if found:
        return found
    looked = "\n  ".join(str(d) for d in searched)
    wanted = ", ".join(f for f, _ in spec.files.values())
    raise DataError(f"corpus {name!r} ({wanted}) not found; looked in\n  {looked}\nTo get it: {spec.how_to_get}")


def load_corpus(name: str = "ptb", path: Optional[str] = None, *, unknown: str = "error") -> Corpus:
    """Find, verify and read a corpus (see the module docstring for ``"ptb"``, ``"wikitext2"`` and ``"text"``)."""
    if unknown not in UNKNOWN_MODES:
        raise ValueError(f"unknown={unknown!r}; use one of {list(UNKNOWN_MODES)}")
    spec = _spec(name)
    d = locate_corpus(name, path)
    files = [_find_file(d, spec.files[s][0]) for s in SPLITS]
    checksums = {s: spec.files[s][1] for s in SPLITS}
    return read_text_corpus(*files, name=name, checksums=checksums, unknown=unknown)


def batchify(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Zaremba's batching: drop the tail, then row b is the b-th contiguous slice (batch_size, n)."""
    if tokens.dim() != 1:
        raise ValueError(f"batchify needs a 1-D token stream, got shape {tuple(tokens.shape)}")
    if not 1 <= batch_size <= tokens.numel():
        raise ValueError(f"batch_size {batch_size} must be between 1 and the number of tokens "
                         f"({tokens.numel()})")
    n = tokens.numel() // batch_size
    return tokens[: n * batch_size].reshape(batch_size, n)


def bptt_segments(batched: torch.Tensor, bptt: int) -> Iterator:
    """(x, y) windows of up to ``bptt`` steps over a (batch, n) tensor; y is x shifted by one."""
    if batched.dim() != 2:
        raise ValueError(f"bptt_segments needs a (batch, n) tensor, got shape {tuple(batched.shape)}")
    if bptt < 1:
        raise ValueError(f"bptt {bptt} must be at least 1")
    return _segments(batched, bptt)


def _segments(batched: torch.Tensor, bptt: int) -> Iterator:
    n = batched.shape[1]
    for i in range(0, n - 1, bptt):
        s = min(bptt, n - 1 - i)
        yield batched[:, i:i + s], batched[:, i + 1:i + 1 + s]
