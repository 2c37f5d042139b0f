"""Priors as math objects over *named* parameters (see :mod:`.base` for the convention)."""
from .adaptive import AdaptiveGaussian
from .base import Gaussian, Laplace, Prior, Sum
from .compiled import Compiled
from .group import BlockLasso, GroupLasso
from .spike_slab import SpikeSlabGL

__all__ = ["Prior", "Gaussian", "Laplace", "Sum", "GroupLasso", "BlockLasso", "AdaptiveGaussian", "SpikeSlabGL", "Compiled"]
