"""Record which config fields a piece of code reads, so cache keys provably cover them.

A stage's cache key hashes its config *view* (the registry's ``reads`` paths). If a stage read a
field outside its view, changing that field would reuse a stale output. ``recorded_reads``
watches attribute access on the config's dataclass instances while a stage runs and collects the
dotted paths of every leaf field read (``model.patch_merge``); the runner compares them with the
view, and a test does the same for every stage of a tiny run.

Reading a nested section object (``config.model``) is not a read by itself; reading its leaves
is. Serialising a section (``to_dict``, ``==``, ``replace``) reads every leaf in it, as it should.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterable, Iterator
from typing import Any

# One recording at a time: the hooks are installed on the config classes themselves.
_LOCK = threading.Lock()


def _index(config: Any) -> tuple[dict[int, str], set[type]]:
    """id(instance) -> dotted prefix ("" for the root, "model." ...), and the dataclass types seen."""
    prefixes: dict[int, str] = {}
    classes: set[type] = set()

    def walk(node: Any, prefix: str) -> None:
        prefixes[id(node)] = prefix
        classes.add(type(node))
        for field in dataclasses.fields(node):
            value = object.__getattribute__(node, field.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                walk(value, f"{prefix}{field.name}.")

    walk(config, "")
    return prefixes, classes


@contextlib.contextmanager
def recorded_reads(config: Any) -> Iterator[set[str]]:
    """Yield a set that fills with the dotted paths of the leaf fields of ``config`` read inside."""
    reads: set[str] = set()
    with _LOCK:
        prefixes, classes = _index(config)
        installed: list[tuple[type, Any]] = []

        def hook(cls: type) -> Any:
            names = {field.name for field in dataclasses.fields(cls)}
            inherited = cls.__getattribute__

            def __getattribute__(self: Any, name: str) -> Any:  # noqa: N807 - the hook's own name
                value = inherited(self, name)
                if name in names:
                    prefix = prefixes.get(id(self))
                    if prefix is not None and not (dataclasses.is_dataclass(value) and not isinstance(value, type)):
                        reads.add(prefix + name)
                return value

            return __getattribute__

        try:
            for cls in classes:
                installed.append((cls, cls.__dict__.get("__getattribute__")))
                cls.__getattribute__ = hook(cls)  # type: ignore[method-assign]
            yield reads
        finally:
            for cls, own in reversed(installed):
                if own is None:
                    del cls.__getattribute__
                else:
                    cls.__getattribute__ = own  # type: ignore[method-assign]


def covered(path: str, view: Iterable[str]) -> bool:
    """Whether ``path`` (a leaf) lies inside one of the view's paths (leaves or whole sections)."""
    return any(path == entry or path.startswith(entry + ".") for entry in view)


def outside(reads: Iterable[str], view: Iterable[str]) -> list[str]:
    """The reads a view does not cover, sorted."""
    view = tuple(view)
    return sorted(path for path in reads if not covered(path, view))
