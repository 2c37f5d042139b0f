"""Real-data loaders with checks; see :mod:`sparse_ensembles.data.registry` for the lookup order."""
from .errors import DataError
from .idx import parse_idx, read_idx
from .registry import DATASETS, download, load_idx_dataset, locate
from .cifar import download_cifar10, image_datasets, load_cifar10, load_image_dataset, locate_cifar10, read_cifar_batch
from .text import CORPORA, Corpus, TextCorpusSpec, batchify, bptt_segments, load_corpus, read_text_corpus

__all__ = ["DataError", "parse_idx", "read_idx", "DATASETS", "download", "load_idx_dataset", "locate",
           "CORPORA", "Corpus", "TextCorpusSpec", "batchify", "bptt_segments", "load_corpus",
           "read_text_corpus", "download_cifar10", "image_datasets", "load_cifar10", "load_image_dataset",
           "locate_cifar10", "read_cifar_batch"]
