"""Model kinds (see :mod:`.registry` for what each kind owns)."""
from .registry import MODELS, from_spec, model_class, register
from .mlp import MLP, CompactMLP, mlp
from .lstm_lm import LSTMLM
from .cnn import CNN
from .resnet20 import ResNet20
from .sequential import CompactSequential, compact_sequential

__all__ = ["MODELS", "from_spec", "model_class", "register", "MLP", "CompactMLP", "mlp", "LSTMLM", "CNN", "ResNet20", "CompactSequential",
           "compact_sequential"]
