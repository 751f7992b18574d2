"""The values every chat message builds have a hand-made ``__init__`` (``_frozen``):
they must still behave as the frozen, slotted, keyword-only dataclasses they are.

Invariant: for any field values, each such class builds the value that the same
dataclass with its generated ``__init__`` builds (the plain model: a copy of its
fields made with ``make_dataclass``), with the same signature and the same
errors; and the value stays immutable, comparable, replaceable and picklable.
"""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatcore import Ack, Append, Appended, Deliver, Drained, Message, Pong, Receive, Send, Written
from chatcore._frozen import quick_init

HOT = [Receive, Drained, Written, Pong, Send, Appended, Append, Deliver, Message, Ack]

values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.tuples())


def model(cls: type) -> type:
    """The same dataclass with the ``__init__`` that dataclasses writes."""
    fields = [
        (f.name, f.type, dataclasses.field(default=f.default))
        if f.default is not dataclasses.MISSING
        else (f.name, f.type)
        for f in dataclasses.fields(cls)
    ]
    return dataclasses.make_dataclass(cls.__name__, fields, frozen=True, slots=True, kw_only=True)


def as_fields(value: object) -> dict[str, Any]:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", HOT, ids=lambda c: c.__name__)
def test_the_signature_is_the_dataclass_one(cls: type) -> None:
    assert "__create_fn__" not in cls.__init__.__qualname__  # (the hand-made one is in place)
    assert inspect.signature(cls) == inspect.signature(model(cls))


@pytest.mark.parametrize("cls", HOT, ids=lambda c: c.__name__)
@given(data=st.data())
def test_any_values_build_what_the_dataclass_builds(cls: type, data: st.DataObject) -> None:
    fields = dataclasses.fields(cls)
    required = {f.name: data.draw(values) for f in fields if f.default is dataclasses.MISSING}
    optional = {
        f.name: data.draw(values)
        for f in fields
        if f.default is not dataclasses.MISSING and data.draw(st.booleans())
    }
    kwargs = {**required, **optional}
    built, expected = cls(**kwargs), model(cls)(**kwargs)
    assert as_fields(built) == as_fields(expected)
    assert repr(built) == repr(expected).replace(expected.__class__.__qualname__, cls.__qualname__)
    assert built == cls(**kwargs)
    assert hash(built) == hash(cls(**kwargs))
    assert pickle.loads(pickle.dumps(built)) == built
    name = fields[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(built, name, None)
    assert getattr(dataclasses.replace(built, **{name: "changed"}), name) == "changed"


@pytest.mark.parametrize("cls", HOT, ids=lambda c: c.__name__)
def test_wrong_arguments_raise_as_the_dataclass_does(cls: type) -> None:
    fields = dataclasses.fields(cls)
    required = {f.name: 1 for f in fields if f.default is dataclasses.MISSING}
    for call in (
        lambda c: c(),  # (every hot value has a required field)
        lambda c: c(*required.values()),  # positional
        lambda c: c(**required, nonsense=1),
    ):
        with pytest.raises(TypeError) as ours:
            call(cls)
        with pytest.raises(TypeError) as theirs:
            call(model(cls))
        assert str(ours.value) == str(theirs.value)


def test_a_class_it_cannot_serve_is_refused_at_once() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class Factory:
        a: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(slots=True, kw_only=True)
    class Mutable:
        a: int

    for cls in (NoSlots, Factory, Mutable):
        with pytest.raises(TypeError):
            quick_init(cls)
