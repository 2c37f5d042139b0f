"""Teachers read from finished run directories (the experiment layer reads run directories; the
library's distillation code in :mod:`sparse_ensembles.distill` does not)."""
from __future__ import annotations

from typing import Optional

from .. import checkpoint
from ..distill import EnsembleTeacher
from .stages import member_files


def teacher_from_run(run_dir, row: Optional[str] = None, device="cpu") -> EnsembleTeacher:
    """The members of a finished run's row as an :class:`EnsembleTeacher` (all loaded onto
    ``device``, in eval mode). ``row`` is the method as in ``results.json`` ("SGLD+GSP+PR 90%",
    "SGD x1" = the first SGD member alone, "SGD x5"); default the last row. To stream members one
    at a time instead, use :func:`member_files` with :meth:`TeacherCache.from_members`."""
    _, files = member_files(run_dir, row)
    return EnsembleTeacher([checkpoint.load_member(f, device)[0] for f in files])
