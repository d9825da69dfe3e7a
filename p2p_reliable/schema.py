"""Typed decoding of untrusted input: every message from the network becomes a frozen attrs
object or a `SchemaError`, through one strict cattrs converter.

Strict means what the wire says is what the type says: no `"1"` becomes 1, no `True` becomes
1.0, no unknown field is ignored, every nested list and map is checked element by element,
and the attrs validators of each class (lengths, ranges, choices) run. A handler therefore
never sees an unvalidated dict. Sizes are bounded before any of that: the msgpack reader is
given limits, so a hostile document cannot make it allocate much either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableSequence, MutableSet, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar, get_args, get_origin, overload

import attrs
import cattrs
import msgpack
from cattrs.cols import (
    homogenous_tuple_structure_factory,
    is_any_set,
    is_mapping,
    is_sequence,
    list_structure_factory,
    mapping_structure_factory,
)
from cattrs.errors import BaseValidationError

T = TypeVar("T")

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


class SchemaError(ValueError):
    """Input that is not a valid instance of the expected type; says where and why."""


def _exact(kind: type[Any]) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _: Any) -> Any:
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return structure


def _number(value: Any, _: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise TypeError(f"expected a finite number, got {type(value).__name__}")
    return float(value)


def _only(
    accepted: tuple[type[Any], ...], hook: Callable[[Any, Any], Any]
) -> Callable[[Any, Any], Any]:
    def structure(value: Any, kind: Any) -> Any:
        if type(value) not in accepted:
            names = " or ".join(t.__name__ for t in accepted)
            raise TypeError(f"expected {names}, got {type(value).__name__}")
        return hook(value, kind)

    return structure


def _sequence_hook(cls: Any, converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    # cattrs' own element-wise hooks, built on this (strict) converter, behind a check of
    # the container itself: a string is iterable, and must not become a tuple of characters.
    origin = get_origin(cls) or cls
    if origin in (list, Sequence, MutableSequence):
        return _only((list, tuple), list_structure_factory(cls, converter))
    if origin in (set, frozenset, AbstractSet, MutableSet):
        (member,) = get_args(cls) or (Any,)
        as_tuple = homogenous_tuple_structure_factory(tuple[member, ...], converter)  # type: ignore[valid-type]
        return _only((list, tuple), lambda v, _: origin(as_tuple(v, None)))
    return _only((list, tuple), homogenous_tuple_structure_factory(cls, converter))


def _mapping_hook(cls: Any, converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    return _only((dict,), mapping_structure_factory(cls, converter))


def _is_homogenous_container(cls: Any) -> bool:
    if is_mapping(cls):
        return False
    if (get_origin(cls) or cls) is tuple:
        args = get_args(cls)
        return len(args) == 2 and args[1] is Ellipsis
    return bool(is_sequence(cls) or is_any_set(cls))


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for kind in (int, str, bytes, bool):
        converter.register_structure_hook(kind, _exact(kind))
    converter.register_structure_hook(float, _number)
    converter.register_structure_hook_factory(_is_homogenous_container, _sequence_hook)
    converter.register_structure_hook_factory(is_mapping, _mapping_hook)
    return converter


CONVERTER = _make_converter()


@overload
def structure(data: Any, cls: type[T]) -> T: ...
@overload
def structure(data: Any, cls: Any) -> Any: ...
def structure(data: Any, cls: Any) -> Any:
    """`data` (from msgpack or JSON) as a `cls` (a class or a typing form such as
    `tuple[int, str]`), or SchemaError."""
    try:
        return CONVERTER.structure(data, cls)
    except BaseValidationError as exc:
        problems = "; ".join(cattrs.transform_error(exc))
        raise SchemaError(f"not a valid {_name(cls)}: {problems}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise SchemaError(f"not a valid {_name(cls)}: {exc}") from None


def _name(cls: Any) -> str:
    return str(getattr(cls, "__name__", cls))


def unstructure(obj: Any) -> Any:
    """`obj` as plain msgpack/JSON-friendly data (the inverse of `structure`)."""
    return CONVERTER.unstructure(obj)


def encode(obj: Any) -> bytes:
    """msgpack of `unstructure(obj)`."""
    data: bytes = msgpack.packb(unstructure(obj), use_bin_type=True)
    return data


@overload
def decode(data: bytes, cls: type[T], max_bytes: int = ...) -> T: ...
@overload
def decode(data: bytes, cls: Any, max_bytes: int = ...) -> Any: ...
def decode(data: bytes, cls: Any, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """Bytes from `encode` back into a `cls`; SchemaError for anything else."""
    if len(data) > max_bytes:
        raise SchemaError(f"{len(data)} bytes exceed the {max_bytes} allowed for a {_name(cls)}")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_ext_len=0,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=max_bytes // 2,
            max_map_len=max_bytes // 4,
        )
    except Exception as exc:
        raise SchemaError(f"not msgpack: {type(exc).__name__}") from None
    return structure(raw, cls)


def bounded_tuple(max_items: int, member: Callable[..., Any] | None = None) -> Any:
    """An attrs validator: a tuple of at most `max_items` (each checked by `member`)."""
    return attrs.validators.deep_iterable(
        member_validator=member or (lambda *_: None),
        iterable_validator=attrs.validators.max_len(max_items),
    )


def bounded_str(max_len: int) -> Any:
    """An attrs validator: a string of at most `max_len` characters."""
    return attrs.validators.max_len(max_len)
