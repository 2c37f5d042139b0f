"""``python -m sparse_ensembles`` = the ``sparse-ensembles`` command (also what ``torchrun -m`` runs)."""
import sys

from .experiments.cli import main

sys.exit(main())
