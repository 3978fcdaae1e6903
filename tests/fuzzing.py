"""Hostile requests for any gRPC method, generated from its message descriptor (hypothesis).

Three kinds besides a method's own valid requests: messages whose every field is drawn from
adversarial values (empty, huge, NaN/inf, extreme integers, unknown enum values, unicode and
control characters, path-like names, duplicated list items), valid requests with one field
replaced by such a value, and raw bytes that may not be a message at all. A refusal must be a
clear status with a message; what counts as clear is ``REFUSALS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

# Statuses a refusal may carry: each names what was wrong. INTERNAL and UNKNOWN never may.
REFUSALS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE,
})

NASTY_TEXT: list[str] = [
    "", " ", "\t\n", "\x00", "a\x00b", "\x1b[2J", "\u202eevil", "\ufeff", "\u200b", "e\u0301", "ǅ", "İ", "ß",
    "ｔｉｎｙ", "𝔱𝔦𝔫𝔶", "😀", "中文", "../../etc/passwd", "/etc/passwd", "..", ".", "a/../../b", "..\\..\\x",
    "%2e%2e%2f", "tiny/../tiny", "~", "/", "C:\\Windows", "$(id)", "`id`", "'; DROP TABLE jobs; --", "{}", "[]",
    "null", '{"a": 1, "a": 2}', "NaN", "inf", "-1", "1e309", "0x10", "tiny", "tiny-a", "foreign", "visual",
    "auditory", "en", "nl", "last", "mean", "word-mean", "x" * 65, "x" * 100_000, "é" * 64, "\ud7ff" * 3,
]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1.0, -1.0, 0.5, 1e-12]
HUGE_REPEATS = 10_001  # one past the services' default max_words

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.CPPTYPE_ENUM: (-(2**31), 2**31 - 1),
}


def nasty_text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=24),
                     st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Mn"]), min_size=1, max_size=8))


def nasty_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00" * 8, b"\xff" * 9, b"\x7f\xf8" * 16]))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    cpp = field.cpp_type
    if cpp in _INT_RANGES:
        lo, hi = _INT_RANGES[cpp]
        edges = [v for v in (0, 1, -1, 2, 3, 10, lo, hi, 2**31 - 1, 2**32 - 1, 10**6) if lo <= v <= hi]
        return st.one_of(st.sampled_from(edges), st.integers(lo, hi))
    if cpp == FieldDescriptor.CPPTYPE_DOUBLE:
        return st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats())
    if cpp == FieldDescriptor.CPPTYPE_FLOAT:
        return st.one_of(st.sampled_from([v for v in SPECIAL_FLOATS if abs(v) < 3e38 or not math.isfinite(v)]),
                         st.floats(width=32))
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_BYTES:
        return nasty_bytes()
    return nasty_text()


def field_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """Adversarial values for one field: scalars, lists (empty, duplicated, huge) or sub-messages."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key), field_values(value, depth + 1), max_size=3)
    one = messages(field.message_type, depth + 1) if field.message_type is not None else _scalar(field)
    if not field.is_repeated:
        return one
    lists = [st.lists(one, max_size=4), st.lists(one, min_size=1, max_size=2).map(lambda xs: xs * 3)]
    if field.message_type is None:
        lists.append(one.map(lambda x: [x] * HUGE_REPEATS))
    return st.one_of(lists)


def _assign(msg: Message, field: FieldDescriptor, value: Any) -> None:
    """Set one field, skipping a value protobuf itself refuses (it could never be sent)."""
    target = getattr(msg, field.name)
    try:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if field.message_type.fields_by_name["value"].message_type is not None:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            del target[:]
            target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(msg, field.name, value)
    except (ValueError, TypeError, OverflowError):
        pass


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with any subset of fields set to adversarial values (nesting <= 3)."""
    cls = GetMessageClass(descriptor)
    if depth >= 3:
        return st.just(cls())
    fields = {f.name: st.deferred(lambda f=f: field_values(f, depth)) for f in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, value in values.items():
            _assign(msg, descriptor.fields_by_name[name], value)
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


def mutated(valid: st.SearchStrategy[Message]) -> st.SearchStrategy[Message]:
    """A valid request with one field (top level, or one level down) replaced by an adversarial value."""

    @st.composite
    def mutate(draw: st.DrawFn) -> Message:
        msg = draw(valid)
        out = type(msg)()
        out.CopyFrom(msg)
        target, descriptor = out, out.DESCRIPTOR
        nested = [f for f in descriptor.fields if f.message_type is not None and not f.is_repeated
                  and not f.message_type.GetOptions().map_entry and out.HasField(f.name)]
        if nested and draw(st.booleans()):
            field = draw(st.sampled_from(nested))
            target, descriptor = getattr(out, field.name), field.message_type
        if not descriptor.fields:
            return out
        field = draw(st.sampled_from(list(descriptor.fields)))
        _assign(target, field, draw(field_values(field, 1)))
        return out

    return mutate()


@dataclass(frozen=True)
class Request:
    """One generated request: its kind (valid, mutated, random, bytes), its bytes, and the message."""

    kind: str
    payload: bytes
    message: Message | None


KINDS = {"valid": 0.3, "mutated": 0.3, "random": 0.3, "bytes": 0.1}  # share of each kind in a run


def requests(kind: str, descriptor: Descriptor, valid: st.SearchStrategy[Message],
             mutants: st.SearchStrategy[Message] | None = None) -> st.SearchStrategy[Request]:
    """Requests of one kind: valid, mutated (``mutants`` replace the generic mutation when given),
    random messages, or raw bytes (which may or may not parse)."""
    def as_request(m: Message) -> Request:
        return Request(kind, m.SerializeToString(), m)

    if kind == "bytes":
        return nasty_bytes().map(lambda b: Request("bytes", b, None))
    return {"valid": valid, "mutated": mutants if mutants is not None else mutated(valid),
            "random": messages(descriptor)}[kind].map(as_request)


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    responses: list[Message]


def send(channel: grpc.Channel, path: str, response_type: type[Message], streaming: bool, payload: bytes,
         timeout: float, metadata: tuple[tuple[str, str], ...] = ()) -> Answer:
    """Send raw request bytes; the reply's status, details and response message(s)."""
    kwargs = {"request_serializer": None, "response_deserializer": response_type.FromString}
    try:
        if streaming:
            out = list(channel.unary_stream(path, **kwargs)(payload, timeout=timeout, metadata=metadata))
        else:
            out = [channel.unary_unary(path, **kwargs)(payload, timeout=timeout, metadata=metadata)]
    except grpc.RpcError as exc:
        return Answer(exc.code(), exc.details() or "", [])
    return Answer(grpc.StatusCode.OK, "", out)
