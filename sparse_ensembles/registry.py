"""Named kinds (model kinds, tasks): a dict from name to class with a registering decorator and
errors that list what is known, so configs and checkpoints can name classes."""
from __future__ import annotations


class Registry(dict):
    def __init__(self, what: str):
        super().__init__()
        self.what = what  # "model kind", "task kind": used in messages

    def register(self, kind: str):
        """Class decorator: make ``cls`` findable as ``kind`` (and set ``cls.kind``)."""
        def deco(cls):
            if kind in self and self[kind] is not cls:
                raise ValueError(f"{self.what} {kind!r} is registered twice")
            cls.kind = kind
            self[kind] = cls
            return cls
        return deco

    def get_class(self, kind: str) -> type:
        if kind not in self:
            raise ValueError(f"unknown {self.what} {kind!r}; known: {sorted(self)}")
        return self[kind]
