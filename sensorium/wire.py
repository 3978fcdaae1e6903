"""Conversion between the ``sensorium.v1`` messages and the library's types.

One place for it: the services decode requests and encode results with these functions, and
the client does the reverse with the same ones, so the two ends cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any, TypeVar

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel

from sensorium.errors import InvalidArgument, validated
from sensorium.representations import Representations
from sensorium.rsa.analysis import DimensionSet, RsaOptions
from sensorium.tables import RatingsTable
from sensorium.v1 import analyzer_pb2 as apb
from sensorium.v1 import common_pb2 as cpb

M = TypeVar("M", bound=Message)
B = TypeVar("B", bound=BaseModel)

_DTYPES = {cpb.DTYPE_UNSPECIFIED: "<f8", cpb.DTYPE_FLOAT64: "<f8", cpb.DTYPE_FLOAT32: "<f4"}
DISTANCE = {apb.DISTANCE_UNSPECIFIED: "cosine", apb.DISTANCE_COSINE: "cosine",
            apb.DISTANCE_CORRELATION: "correlation", apb.DISTANCE_EUCLIDEAN: "euclidean"}
COMPARISON = {apb.COMPARISON_UNSPECIFIED: "spearman", apb.COMPARISON_SPEARMAN: "spearman",
              apb.COMPARISON_PEARSON: "pearson", apb.COMPARISON_KENDALL_TAU_A: "kendall-tau-a"}
BOOTSTRAP = {apb.BOOTSTRAP_MODE_UNSPECIFIED: "index", apb.BOOTSTRAP_MODE_INDEX: "index",
             apb.BOOTSTRAP_MODE_RENORMALIZE: "renormalize"}


def _enum(table: dict[int, str], value: int, what: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"unknown {what} value {value}") from None


def _code(table: dict[int, str], name: str) -> int:
    return max(k for k, v in table.items() if v == name)


def matrix_to_proto(x: np.ndarray, dtype: str = "float64") -> cpb.Matrix:
    x = np.ascontiguousarray(x, dtype="<f4" if dtype == "float32" else "<f8")
    if x.ndim != 2:
        raise InvalidArgument(f"expected a 2-D matrix, got shape {x.shape}")
    return cpb.Matrix(rows=x.shape[0], cols=x.shape[1], data=x.tobytes(),
                      dtype=cpb.DTYPE_FLOAT32 if dtype == "float32" else cpb.DTYPE_FLOAT64)


def matrix_from_proto(m: cpb.Matrix, what: str, as_dtype: np.dtype | type = np.float64) -> np.ndarray:
    """The matrix as ``as_dtype`` (float64 for statistics); a read-only view when no cast is needed."""
    dt = np.dtype(_enum(_DTYPES, m.dtype, f"{what} dtype"))
    expected = m.rows * m.cols * dt.itemsize
    if len(m.data) != expected:
        raise InvalidArgument(f"{what}: {len(m.data)} bytes for a {m.rows} x {m.cols} {dt.name} matrix "
                              f"(expected {expected})")
    out = np.frombuffer(m.data, dtype=dt).reshape(m.rows, m.cols)
    return out if out.dtype == np.dtype(as_dtype) else out.astype(as_dtype)


def representations_from_proto(msg: apb.Representations,
                               table: Callable[[str], RatingsTable]) -> Representations:
    which = msg.WhichOneof("source")
    if which == "inline":
        r = msg.inline
        human = matrix_from_proto(r.human, "human")
        names = list(r.feature_names) or [f"f{i}" for i in range(human.shape[1])]
        models: dict[str, np.ndarray] = {}
        for nm in r.models:
            if nm.name in models:
                raise InvalidArgument(f"model {nm.name!r} is given twice")
            models[nm.name] = matrix_from_proto(nm.matrix, f"model {nm.name!r}")
        return Representations(
            words=tuple(r.words), feature_names=tuple(names), human=human, models=models,
            human_sd=matrix_from_proto(r.human_sd, "human_sd") if r.HasField("human_sd") else None,
            human_n=matrix_from_proto(r.human_n, "human_n") if r.HasField("human_n") else None,
        )
    if which == "table":
        t = msg.table
        models_cols: dict[str, list[str]] = {}
        for mc in t.models:
            if mc.name in models_cols:
                raise InvalidArgument(f"model {mc.name!r} is given twice")
            models_cols[mc.name] = list(mc.columns)
        return Representations.from_table(table(t.table), list(t.human_columns), models_cols,
                                          list(t.human_sd_columns) or None, list(t.human_n_columns) or None)
    raise InvalidArgument("no data: set either inline representations or a table reference")


def representations_to_proto(reps: Representations) -> apb.Representations:
    inline = apb.InlineRepresentations(
        words=list(reps.words), feature_names=list(reps.feature_names), human=matrix_to_proto(reps.human),
        models=[cpb.NamedMatrix(name=k, matrix=matrix_to_proto(v)) for k, v in reps.models.items()],
    )
    if reps.human_sd is not None:
        inline.human_sd.CopyFrom(matrix_to_proto(reps.human_sd))
    if reps.human_n is not None:
        inline.human_n.CopyFrom(matrix_to_proto(reps.human_n))
    return apb.Representations(inline=inline)


def rsa_options_from_proto(o: apb.RsaOptions) -> RsaOptions:
    return validated(
        RsaOptions,
        distance=_enum(DISTANCE, o.distance, "distance"), comparison=_enum(COMPARISON, o.comparison, "comparison"),
        zscore=not o.no_zscore, n_bootstrap=o.n_bootstrap, seed=o.seed,
        bootstrap_mode=_enum(BOOTSTRAP, o.bootstrap_mode, "bootstrap mode"), n_permutations=o.n_permutations,
        noise_ceiling=o.noise_ceiling, confidence=o.confidence or 0.95,
    )


def rsa_options_to_proto(o: RsaOptions) -> apb.RsaOptions:
    return apb.RsaOptions(
        distance=_code(DISTANCE, o.distance), comparison=_code(COMPARISON, o.comparison), no_zscore=not o.zscore,
        n_bootstrap=o.n_bootstrap, seed=o.seed, bootstrap_mode=_code(BOOTSTRAP, o.bootstrap_mode),
        n_permutations=o.n_permutations, noise_ceiling=o.noise_ceiling, confidence=o.confidence,
    )


def dimension_sets_from_proto(sets) -> list[DimensionSet]:
    return [DimensionSet(name=s.name or "all", features=list(s.features)) for s in sets]


def pairs_from_proto(pairs) -> list[tuple[str, str]]:
    return [(p.model_a, p.model_b) for p in pairs]


def _json_floats(obj: Any) -> Any:
    """Non-finite floats in the spelling protobuf's JSON mapping expects ("NaN", "Infinity")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _json_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_floats(v) for v in obj]
    return obj


def to_proto(model: BaseModel, message: type[M]) -> M:
    """A result model as its message: the two share field names by design.

    An undefined statistic (NaN) is a value to report, not a reason to fail the call.
    """
    return json_format.ParseDict(_json_floats(model.model_dump(exclude_none=True)), message())


def from_proto(message: Message, model: type[B]) -> B:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return model.model_validate(data)
