"""Write README's reliability figures from the last test run (``var/reliability/figures.json``).

The reliability suites (tests/test_fuzz.py, test_faults.py, test_load.py, test_security.py)
record what they measured; this script renders those records between the README's
``<!-- reliability:begin -->`` and ``<!-- reliability:end -->`` markers, so the numbers there are
always a run's own. ``make reliability-readme`` runs it; ``--check`` only reports whether README
is current.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "var" / "reliability" / "figures.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"


def _value(v: Any, nested: bool = False) -> str:
    if isinstance(v, dict):
        text = ", ".join(f"{str(k).replace('_', ' ')} {_value(x, True)}" for k, x in v.items())
        return f"({text})" if nested else text
    if isinstance(v, list):
        return ("; " if any(isinstance(x, dict) for x in v) else ", ").join(_value(x, True) for x in v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _stamp(section: dict[str, Any]) -> str:
    run = section.get("_run", {})
    heavy = " (heavy variant)" if run.get("heavy") else ""
    return f"measured {run.get('measured_at', '?')} on {run.get('cpus', '?')} CPUs{heavy}"


def fuzz_table(section: dict[str, Any]) -> list[str]:
    rows = {k: v for k, v in section.items() if not k.startswith("_")}
    lines = [f"Fuzzing ({_stamp(section)}):", "",
             "| RPC | requests | valid (checked against the library) | answered OK | refused | INTERNAL/UNKNOWN |",
             "|---|---:|---:|---:|---|---:|"]
    total = valid = 0
    for rpc, f in sorted(rows.items()):
        codes = dict(f["codes"])
        ok = codes.pop("OK", 0)
        bad = codes.pop("INTERNAL", 0) + codes.pop("UNKNOWN", 0)
        refused = ", ".join(f"{k} {v}" for k, v in sorted(codes.items())) or "none"
        lines.append(f"| {rpc} | {f['requests']:,} | {f.get('kind_valid', 0):,} | {ok:,} | {refused} | {bad} |")
        total += f["requests"]
        valid += f.get("kind_valid", 0)
    lines += ["", f"{total:,} requests over {len(rows)} RPCs, {valid:,} of them valid; every refusal carried a "
              "message and every service answered a valid request afterwards."]
    return lines


def load_table(section: dict[str, Any]) -> list[str]:
    lines = [f"Load on loopback ({_stamp(section)}):", "",
             "| service | clients x requests | failed | p50 | p99 | throughput | peak memory (bound) | requests |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name in ("extractor", "analyzer"):
        if (f := section.get(name)) is None:
            continue
        lines.append(f"| {name} | {f['clients']} x {f['requests_per_client']} | {f['failed']} | {f['p50_ms']:g} ms "
                     f"| {f['p99_ms']:g} ms | {f['throughput_per_s']:g}/s | {f['peak_rss_mib']:g} MiB "
                     f"({f['peak_bound_mib']} MiB) | {f['requests']} |")
    for name in ("analyzer", "extractor"):
        if (q := section.get(f"queue_depth_{name}")) is None:
            continue
        lines += ["", f"Queue depth, {name}: with {q['workers']} worker and max_queued={q['max_queued']}, a burst of "
                  f"{q['burst']} slow requests: {q['served']} served, {q['refused_resource_exhausted']} refused "
                  f"RESOURCE_EXHAUSTED, the slowest refusal after {q['slowest_refusal_ms']:g} ms (the fastest "
                  f"served request took {q['fastest_served_ms']:g} ms)."]
    return lines


def bullets(title: str, section: dict[str, Any]) -> list[str]:
    lines = [f"{title} ({_stamp(section)}):", ""]
    lines += [f"- {key.replace('_', ' ')}: {_value(v)}" for key, v in section.items() if not key.startswith("_")]
    return lines


def render(figures: dict[str, Any]) -> str:
    sections = figures["sections"]
    parts: list[list[str]] = []
    if "fuzz" in sections:
        parts.append(fuzz_table(sections["fuzz"]))
    if "faults" in sections:
        parts.append(bullets("Faults survived", sections["faults"]))
    if "load" in sections:
        parts.append(load_table(sections["load"]))
    if "security" in sections:
        parts.append(bullets("Security", sections["security"]))
    return "\n\n".join("\n".join(p) for p in parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README is not current")
    args = parser.parse_args(argv)
    if not FIGURES.exists():
        print(f"{FIGURES} does not exist: run the reliability suites first (make test)", file=sys.stderr)
        return 2
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render(json.loads(FIGURES.read_text()))}\n{END}{tail}"
    if args.check:
        return 0 if new == text else 1
    README.write_text(new)
    print(f"README reliability figures written from {FIGURES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
