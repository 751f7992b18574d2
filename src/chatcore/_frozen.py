"""A cheaper ``__init__`` for the frozen dataclasses that every chat message builds.

Commands, effects and events are frozen, slotted dataclasses. A frozen
dataclass's own ``__init__`` must go round the class's ``__setattr__``, which
refuses every assignment, so it sets each field with ``object.__setattr__``:
a generic call that looks the name up on the type and repacks its arguments,
about 1,300 instructions a field (a plain slot store is about 200). One chat
message builds nine such values with 37 fields between them (``Receive``,
``Send``, ``Append``, ``Message``, ``Appended``, ``Ack``, two ``Deliver``,
``Drained``).

:func:`quick_init` replaces that ``__init__`` with one of the same signature
that sets each slot through its own descriptor's ``__set__``, bound once at
import: no lookup by name, about half the cost a field (27k instructions less
per message at 4 members, of the ~340k the whole server spent). Nothing else
changes: the class is the same frozen dataclass (``fields``, ``replace``,
equality, ``repr``, ``match``, pickling), and assigning to a field of an
instance still raises ``FrozenInstanceError``.
"""

from __future__ import annotations

import dataclasses
from types import MemberDescriptorType
from typing import Any, TypeVar, cast

__all__ = ["quick_init"]

_T = TypeVar("_T")


def quick_init(cls: type[_T]) -> type[_T]:
    """Give ``cls`` (a frozen, slotted, keyword-only dataclass) the cheaper ``__init__``.

    Fields with a ``default_factory``, fields left out of ``__init__`` and a
    ``__post_init__`` are not supported (none of the hot values has them):
    such a class raises ``TypeError`` here, at import.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} is not a frozen, slotted dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__")
    env: dict[str, Any] = {}
    args: list[str] = []
    body: list[str] = []
    for f in dataclasses.fields(cast(Any, cls)):
        slot = cls.__dict__.get(f.name)
        if not f.init or not f.kw_only or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: keyword-only, with a plain default if any")
        if not isinstance(slot, MemberDescriptorType):  # pragma: no cover (slots=True has them)
            raise TypeError(f"{cls.__name__}.{f.name} is not a slot")
        env[f"_set_{f.name}"] = slot.__set__
        if f.default is dataclasses.MISSING:
            args.append(f.name)
        else:
            env[f"_default_{f.name}"] = f.default
            args.append(f"{f.name}=_default_{f.name}")
        body.append(f"    _set_{f.name}(self, {f.name})")
    signature = f"self, *, {', '.join(args)}" if args else "self"
    source = f"def __init__({signature}):\n" + ("\n".join(body) or "    pass")
    exec(source, env)  # (as dataclasses builds its own __init__)
    init, generated = env["__init__"], cast(Any, cls).__init__
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__annotations__ = dict(generated.__annotations__)  # (for inspect.signature)
    cast(Any, cls).__init__ = init
    return cls
