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
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import cattrs
import msgpack
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


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for kind in (int, str, bytes, bool):
        converter.register_structure_hook(kind, _exact(kind))
    converter.register_structure_hook(float, _number)
    return converter


CONVERTER = _make_converter()


def structure(data: Any, cls: type[T]) -> T:
    """`data` (from msgpack or JSON) as a `cls`, or SchemaError."""
    try:
        return CONVERTER.structure(data, cls)
    except BaseValidationError as exc:
        problems = "; ".join(cattrs.transform_error(exc))
        raise SchemaError(f"not a valid {cls.__name__}: {problems}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise SchemaError(f"not a valid {cls.__name__}: {exc}") from None


def unstructure(obj: Any) -> Any:
    """`obj` as plain msgpack/JSON-friendly data (the inverse of `structure`)."""
    return CONVERTER.unstructure(obj)


def encode(obj: Any) -> bytes:
    """msgpack of `unstructure(obj)`."""
    data: bytes = msgpack.packb(unstructure(obj), use_bin_type=True)
    return data


def decode(data: bytes, cls: type[T], max_bytes: int = MAX_DOCUMENT_BYTES) -> T:
    """Bytes from `encode` back into a `cls`; SchemaError for anything else."""
    if len(data) > max_bytes:
        raise SchemaError(f"{len(data)} bytes exceed the {max_bytes} allowed for a {cls.__name__}")
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
