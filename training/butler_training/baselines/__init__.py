"""Baseline token-selection methods for the decode-simulated evaluation (see ``..probe``).

``METHODS`` maps a method's name to its class; ``build(name, **options)`` makes one. Every class is a
small dataclass whose fields are its options and whose ``allowed(probe, plan)`` returns the
allowed-mask. A new method plugs in with ``register(cls)``; nothing here needs editing.

Each module's docstring cites the paper and says what is faithful and what the teacher-forced
simulation adapts.
"""

from __future__ import annotations

from ..probe import SelectionMethod
from .dense import Dense
from .h2o import H2O
from .oracle import Oracle, OracleTopK
from .quest import Quest
from .random_selection import RandomSelection
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM

__all__ = [
    "METHODS",
    "Dense",
    "H2O",
    "Oracle",
    "OracleTopK",
    "Quest",
    "RandomSelection",
    "SnapKV",
    "StreamingLLM",
    "build",
    "register",
]

METHODS: dict[str, type[SelectionMethod]] = {}


def register(cls: type) -> type:
    """Add a method class (it needs a ``name`` class attribute and an ``allowed`` method)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not callable(getattr(cls, "allowed", None)):
        raise TypeError(f"{cls!r} needs a str class attribute `name` and an `allowed(probe, plan)` method")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"a different method is already registered as {name!r}: {METHODS[name]!r}")
    METHODS[name] = cls
    return cls


def build(name: str, **options) -> SelectionMethod:
    """Instantiate the method registered as ``name`` with its options."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise KeyError(f"unknown selection method {name!r}; known: {sorted(METHODS)}") from None
    return cls(**options)


for _cls in (Dense, Oracle, OracleTopK, H2O, SnapKV, Quest, StreamingLLM, RandomSelection):
    register(_cls)
