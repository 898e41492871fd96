"""The pass registry (pipeline layer): maps pass names to pass classes.

The shipped passes are data, :data:`onnxcc.passes.PASSES` (``"module:Class"``
entries), loaded on first use; :func:`register` adds a pass of the user's own
(a plugin, a test) under its ``name`` and :func:`unregister` removes it again.
The pass base class and option parsing live one layer down, in
:mod:`onnxcc.compiler.passbase`, so passes never import this module.
"""

from __future__ import annotations

import importlib

from onnxcc.compiler.errors import BadInputError
from onnxcc.compiler.passbase import OnnxccPass

_extra: dict[str, type[OnnxccPass]] = {}
_shipped: dict[str, type[OnnxccPass]] = {}


def _load_shipped() -> dict[str, type[OnnxccPass]]:
    if not _shipped:
        from onnxcc.passes import PASSES

        for entry in PASSES:
            module, _, attr = entry.partition(":")
            cls = getattr(importlib.import_module(module), attr)
            if cls.name in _shipped:
                raise ValueError(f"pass name '{cls.name}' listed twice in onnxcc.passes.PASSES")
            _shipped[cls.name] = cls
    return _shipped


def register(cls: type[OnnxccPass]) -> type[OnnxccPass]:
    """Add a pass that is not shipped with onnxcc (usable as a decorator)."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} has no name")
    known = _load_shipped().get(cls.name) or _extra.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"pass name '{cls.name}' registered twice")
    _extra[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a pass added with :func:`register` (shipped passes stay)."""
    _extra.pop(name, None)


def registered_passes() -> dict[str, type[OnnxccPass]]:
    return dict(sorted({**_load_shipped(), **_extra}.items()))


def get_pass(name: str) -> type[OnnxccPass]:
    known = registered_passes()
    key = name.replace("_", "-")
    if key not in known:
        raise BadInputError(f"unknown pass '{name}' (known: {', '.join(known)})")
    return known[key]
