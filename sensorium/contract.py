"""Stability of the ``sensorium.v1`` contract: a committed snapshot and a breaking-change check.

Clients in other pipelines are generated from these protos; a removed or renumbered field, a
changed type or a removed RPC breaks them silently on the wire. The snapshot records what the
contract promised; the check lets additions through and names every break.
``python -m sensorium.contract --write`` accepts the current contract (``make snapshot``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, FileDescriptor

SNAPSHOT = Path(__file__).resolve().parents[1] / "proto" / "sensorium" / "v1" / "contract.snapshot.json"


def _files() -> list[FileDescriptor]:
    from sensorium.v1 import analyzer_pb2, common_pb2, extractor_pb2, trainer_pb2

    return [m.DESCRIPTOR for m in (common_pb2, analyzer_pb2, extractor_pb2, trainer_pb2)]


def _field(f: FieldDescriptor) -> dict[str, Any]:
    kind = f.message_type.full_name if f.message_type else (f.enum_type.full_name if f.enum_type else "")
    return {"number": f.number, "type": f.type, "type_name": kind,
            "repeated": f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED,
            # proto3 `optional` lives in a synthetic oneof named "_<field>": not a real one
            "oneof": f.containing_oneof.name if f.containing_oneof and not f.containing_oneof.name.startswith("_")
            else ""}


def _message(d: Descriptor, out: dict[str, Any]) -> None:
    out["messages"][d.full_name] = {f.name: _field(f) for f in d.fields}
    for nested in d.nested_types:
        _message(nested, out)
    for e in d.enum_types:
        _enum(e, out)


def _enum(e: EnumDescriptor, out: dict[str, Any]) -> None:
    out["enums"][e.full_name] = {v.name: v.number for v in e.values}


def describe(files: list[FileDescriptor] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": {}, "enums": {}, "services": {}}
    for fd in files or _files():
        for d in fd.message_types_by_name.values():
            _message(d, out)
        for e in fd.enum_types_by_name.values():
            _enum(e, out)
        for s in fd.services_by_name.values():
            out["services"][s.full_name] = {
                m.name: {"input": m.input_type.full_name, "output": m.output_type.full_name,
                         "client_streaming": m.client_streaming, "server_streaming": m.server_streaming}
                for m in s.methods}
    return out


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What ``new`` breaks of ``old``; anything only added is fine."""
    problems: list[str] = []
    for name, fields in old["messages"].items():
        if name not in new["messages"]:
            problems.append(f"message {name} removed")
            continue
        now = new["messages"][name]
        by_number = {f["number"]: n for n, f in now.items()}
        for fname, f in fields.items():
            if fname not in now:
                problems.append(f"{name}.{fname} (field {f['number']}) removed or renamed")
                continue
            g = now[fname]
            if g["number"] != f["number"]:
                problems.append(f"{name}.{fname} renumbered {f['number']} -> {g['number']}")
            if (g["type"], g["type_name"]) != (f["type"], f["type_name"]) or g["repeated"] != f["repeated"]:
                problems.append(f"{name}.{fname} changed type")
            if g["oneof"] != f["oneof"]:
                problems.append(f"{name}.{fname} moved into or out of a oneof")
        for fname, f in fields.items():
            other = by_number.get(f["number"])
            if other and other != fname and fname not in now:
                problems.append(f"{name}: field number {f['number']} reused by {other}")
    for name, values in old["enums"].items():
        now = new["enums"].get(name)
        if now is None:
            problems.append(f"enum {name} removed")
            continue
        for vname, number in values.items():
            if now.get(vname) != number:
                problems.append(f"enum value {name}.{vname} removed or renumbered")
    for name, methods in old["services"].items():
        now = new["services"].get(name)
        if now is None:
            problems.append(f"service {name} removed")
            continue
        for mname, sig in methods.items():
            if mname not in now:
                problems.append(f"rpc {name}.{mname} removed")
            elif now[mname] != sig:
                problems.append(f"rpc {name}.{mname} changed signature or streaming")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="accept the current contract as the snapshot")
    args = parser.parse_args(argv)
    current = describe()
    if SNAPSHOT.exists():
        problems = breaking_changes(json.loads(SNAPSHOT.read_text()), current)
        if problems:
            print("breaking changes against the snapshot:\n  " + "\n  ".join(problems), file=sys.stderr)
            if args.write:
                print("refusing to write: a breaking change needs a new API version (sensorium.v2)", file=sys.stderr)
            return 1
    if args.write:
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        print(f"wrote {SNAPSHOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
