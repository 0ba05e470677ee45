"""Type aliases for the public signatures of jaxprune, defined once here.

They document intent; at run time they are ``Any``-like (a pytree can be any registered
container), as ``chex.ArrayTree`` and ``optax.Params`` are.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

PyTree = Any
"""A pytree of arrays: nested dicts, lists, tuples, NamedTuples, ``nnx.State``, ``eqx.Module``."""

Params = PyTree
"""A pytree of parameter arrays."""

Scores = PyTree
"""A pytree like the params: larger scores are kept."""

Masks = PyTree
"""A pytree like the params: a bool keep-mask of each pruned leaf's shape, scalar ``True`` for
leaves that are not pruned."""

Where = Callable[[str, Any], bool]
"""``(path, leaf) -> bool``: whether a leaf is prunable. ``path`` is a string such as
``"layers/0/kernel"`` (see :mod:`jaxprune.tree`)."""

Sparsity = float | jax.Array | Mapping[str, float] | Callable[[str, Any], float] | PyTree
"""The fraction to remove: one number (or 0-d array, maybe traced), a dict
``{path_regex: sparsity}``, a callable ``(path, leaf) -> sparsity``, or a tree of numbers like
the params (see :mod:`jaxprune.allocation`)."""

KeyLike = jax.Array | int | None
"""A PRNG key (typed or raw uint32), an int seed, or None (seed 0)."""

ArrayLike = jax.typing.ArrayLike
"""An array, a NumPy array or a Python scalar (``jax.typing.ArrayLike``)."""

PathLike = str | os.PathLike
"""A file path."""
