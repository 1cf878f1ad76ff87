"""Reversible changes to one model instance: instance-level method overrides and module hooks.

A family installs FlowCut only through an :class:`InstancePatch`, and :meth:`InstancePatch.restore`
undoes it from what was there before: an attribute the instance did not have is removed again, an
instance-level override that was already there (a user's, or another library's) comes back as it
was, and every hook is removed. The class is never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ABSENT = object()
"""Marks an attribute the instance did not hold itself (it came from the class)."""


class InstancePatch:
    """The overrides and hooks one family installed on one model instance, undone by :meth:`restore`."""

    def __init__(self) -> None:
        self._overrides: list[tuple[Any, str, Any]] = []
        self._hooks: list[Any] = []

    def override(
        self, owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
    ) -> Callable[..., Any]:
        """Give ``owner`` its own ``name``: ``make(current)``, where ``current`` is what ``owner.name`` was.

        ``current`` is the bound method of the class, or the instance's own override where it had one,
        so the replacement wraps whatever the instance did before (its stock path); it is returned.
        """
        current = getattr(owner, name)
        self._overrides.append((owner, name, owner.__dict__.get(name, _ABSENT)))
        setattr(owner, name, make(current))
        return current

    def hook(self, handle: Any) -> None:
        """Keep a hook's removable handle (``register_forward_pre_hook`` / ``register_forward_hook``)."""
        self._hooks.append(handle)

    def restore(self) -> None:
        """Undo every override and hook, newest first. Idempotent."""
        for handle in reversed(self._hooks):
            handle.remove()
        for owner, name, previous in reversed(self._overrides):
            if previous is _ABSENT:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, previous)
        self._hooks, self._overrides = [], []
