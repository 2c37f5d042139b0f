from .mlp import mlp

__all__ = ["mlp"]
