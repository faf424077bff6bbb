"""Named things that users pick by name: one registry type for every kind.

Triggers, architectures, data-set sources, filters, poisoning engines, synthesisers and
defenses each keep a ``Registry``. An item registers once, under one name; lookups of an
unknown name raise the same error everywhere: ``unknown <kind> 'name'; available: ...``.

>>> COLOURS = Registry("colour")
>>> @COLOURS.register("red")
... class Red: ...
>>> COLOURS["red"] is Red
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from kdbackdoor.errors import KDBackdoorError

T = TypeVar("T")
Item = TypeVar("Item")


class UnknownNameError(KDBackdoorError, KeyError):
    """A name no item is registered under (a ``KeyError`` too, so ``in`` and ``.get`` work)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Mapping[str, T], Generic[T]):
    """Items of one kind by name, in registration order.

    ``kind`` names the kind in errors ("trigger", "architecture", ...). ``usage`` turns a name
    and its item into how users write it in the "available" list (``npz:PATH``, say); ``hint``
    is appended to that list (" (or all)", say). With ``names_items`` registering also sets the
    item's ``name`` attribute, so a registered class knows the name it goes by.
    """

    def __init__(self, kind: str, *, usage: Callable[[str, T], str] | None = None, hint: str = "",
                 names_items: bool = False) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._usage = usage
        self._hint = hint
        self._names_items = names_items

    def add(self, name: str, item: T) -> T:
        """Register ``item`` as ``name``; a name registered twice is a programming error."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        if self._names_items:
            item.name = name  # type: ignore[attr-defined]
        return item

    def register(self, name: str) -> Callable[[Item], Item]:
        """Decorator form of ``add``: ``@REGISTRY.register("name")`` above a class or function."""

        def decorate(item: Item) -> Item:
            self.add(name, item)  # type: ignore[arg-type]
            return item

        return decorate

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise self.unknown(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def available(self) -> str:
        """The names as users write them, comma-separated, in registration order."""
        shown = (self._usage(name, item) for name, item in self._items.items()) if self._usage else self._items
        return ", ".join(shown) + self._hint

    def unknown(self, written: str) -> UnknownNameError:
        """The error for a name nothing is registered under; ``written`` is the name as the user
        wrote it (a whole spec such as ``mnist:train`` may stand for it)."""
        return UnknownNameError(f"unknown {self.kind} {written!r}; available: {self.available()}")
