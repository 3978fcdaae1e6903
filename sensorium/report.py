"""An experiment's results as tables and one self-contained HTML report.

The report is read away from the machine that produced it (mailed, attached to a paper's
supplement), so every figure is embedded as a base64 PNG and every number shown is also written
to CSV: a reader can check a bar against its value without rerunning anything. Figures are drawn
on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through pyplot, so a report
can be built inside a service thread without touching global backend state.

Sections appear only when their data exists, and a missing value is shown as ``n/a``, never
filled in: a transfer matrix with a hole says that the run was not done, not that it was zero.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field, model_validator

from sensorium.errors import InvalidArgument
from sensorium.rsa.rdm import calc_rdm, square, zscore
from sensorium.storage import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Figures are rendered at this resolution: sharp on a screen, small enough to embed a dozen.
DPI = 100
#: RDM heatmaps show at most this many words; more are unreadable and Ward clustering is quadratic.
MAX_RDM_WORDS = 200
#: Seed of the random subset of words drawn when a test set has more than ``MAX_RDM_WORDS``.
RDM_SUBSET_SEED = 0
#: Significance level marked in the Steiger table.
ALPHA = 0.05

SECTION_TITLES: dict[str, str] = {
    "rsa": "RSA per model",
    "differences": "Model differences",
    "dimensions": "Per-dimension correlations",
    "transfer": "Transfer",
    "rdms": "Representational dissimilarity matrices",
    "layers": "Layer-wise RSA",
    "words": "Word-wise similarity",
    "methods": "Methods",
}


class _Row(BaseModel):
    """A table row whose required floats survive JSON, which has no NaN.

    Pydantic writes NaN as ``null``; reading it back into a plain ``float`` field would fail, so
    ``null`` there means NaN again. Optional floats keep ``None`` (no interval was computed).
    """

    @model_validator(mode="before")
    @classmethod
    def _null_is_nan(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fixed = dict(data)
            for name, field in cls.model_fields.items():
                if field.annotation is float and name in fixed and fixed[name] is None:
                    fixed[name] = math.nan
            return fixed
        return data


class RsaRow(_Row):
    model: str
    test_set: str
    dimension_set: str
    rsa: float
    ci_low: float | None = None
    ci_high: float | None = None
    n_words: int


class RsaDifferenceRow(_Row):
    model_a: str
    model_b: str
    test_set: str
    dimension_set: str
    difference: float
    ci_low: float
    ci_high: float
    n_words: int


class DimensionRow(_Row):
    model: str
    test_set: str
    dimension: str
    spearman: float
    pearson: float
    n_words: int


class SteigerRow(_Row):
    model_a: str
    model_b: str
    test_set: str
    dimension: str
    method: str
    r_a: float
    r_b: float
    z: float
    p_value: float
    n_words: int


class TransferRow(_Row):
    """RSA(model) - RSA(base) on ``tested_on`` for a model fine-tuned on condition ``trained_on``."""

    trained_on: str
    tested_on: str
    model: str
    base: str
    difference: float
    ci_low: float
    ci_high: float


class LayerRow(_Row):
    model: str
    test_set: str
    dimension_set: str
    layer: int
    rsa: float
    ci_low: float | None = None
    ci_high: float | None = None


class ProbeRow(_Row):
    model: str
    test_set: str
    layer: int
    dimension: str
    spearman: float
    r2: float
    shuffled_spearman: float | None = None


class WordRow(_Row):
    """Word-wise similarity 1/(1+euclidean) of a model's ratings to the human ratings of one word."""

    test_set: str
    word: str
    model: str
    similarity: float


class RatingsMatrix(BaseModel):
    """Words x dimensions ratings of one test set; ``None`` is a missing value (JSON has no NaN)."""

    test_set: str
    words: list[str]
    dimensions: list[str]
    human: list[list[float | None]]
    models: dict[str, list[list[float | None]]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _shapes(self) -> RatingsMatrix:
        for label, rows in [("human", self.human), *self.models.items()]:
            if len(rows) != len(self.words) or any(len(r) != len(self.dimensions) for r in rows):
                raise InvalidArgument(f"ratings of {label!r} in test set {self.test_set!r} are not "
                                      f"{len(self.words)} words x {len(self.dimensions)} dimensions")
        return self

    def array(self, model: str | None = None) -> np.ndarray:
        """The human ratings (``model=None``) or a model's, as float64 with NaN for missing values."""
        rows = self.human if model is None else self.models[model]
        return np.array([[math.nan if v is None else v for v in r] for r in rows], dtype=np.float64).reshape(
            len(self.words), len(self.dimensions))


class ExperimentResults(BaseModel):
    name: str
    created: str
    description: str = ""
    models: list[str]
    rsa: list[RsaRow] = Field(default_factory=list)
    rsa_differences: list[RsaDifferenceRow] = Field(default_factory=list)
    dimensions: list[DimensionRow] = Field(default_factory=list)
    steiger: list[SteigerRow] = Field(default_factory=list)
    transfer: list[TransferRow] = Field(default_factory=list)
    layers: list[LayerRow] = Field(default_factory=list)
    probes: list[ProbeRow] = Field(default_factory=list)
    words: list[WordRow] = Field(default_factory=list)
    ratings: list[RatingsMatrix] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)


# --------------------------------------------------------------------------------------------- tables

#: CSV file name, the field of ``ExperimentResults`` it holds and its row model (ratings are written long).
TABLES: dict[str, tuple[str, type[_Row]]] = {
    "rsa.csv": ("rsa", RsaRow),
    "rsa_differences.csv": ("rsa_differences", RsaDifferenceRow),
    "dimensions.csv": ("dimensions", DimensionRow),
    "steiger.csv": ("steiger", SteigerRow),
    "transfer.csv": ("transfer", TransferRow),
    "layers.csv": ("layers", LayerRow),
    "probes.csv": ("probes", ProbeRow),
    "words.csv": ("words", WordRow),
}
RATINGS_CSV = "ratings.csv"
RATINGS_COLUMNS = ["test_set", "word", "source", "dimension", "value"]


def _cell(value: Any) -> str:
    """CSV text of a value: ``repr`` of a float round-trips exactly; a missing value is empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _csv_bytes(header: list[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return buf.getvalue().encode("utf-8")


def _ratings_rows(matrices: list[RatingsMatrix]) -> Iterable[list[Any]]:
    for m in matrices:
        for source, rows in [("human", m.human), *m.models.items()]:
            for word, values in zip(m.words, rows):
                for dim, v in zip(m.dimensions, values):
                    yield [m.test_set, word, source, dim, None if v is None or math.isnan(v) else v]


def write_tables(results: ExperimentResults, folder: Path) -> list[Path]:
    """Every number the report shows, readable without the report: one CSV per table plus results.json.

    Every table is written, header only when empty, so a folder reused for a smaller run holds no
    stale table from the larger one. Ratings are long (test_set, word, source, dimension, value)
    because test sets differ in words and dimensions.
    """
    folder = Path(folder)
    written: list[Path] = []
    for filename, (attr, row_model) in TABLES.items():
        rows: list[_Row] = getattr(results, attr)
        header = list(row_model.model_fields)
        data = _csv_bytes(header, ([getattr(r, h) for h in header] for r in rows))
        atomic_write_bytes(folder / filename, data)
        written.append(folder / filename)
    atomic_write_bytes(folder / RATINGS_CSV, _csv_bytes(RATINGS_COLUMNS, _ratings_rows(results.ratings)))
    written.append(folder / RATINGS_CSV)
    atomic_write_bytes(folder / "results.json", (results.model_dump_json(indent=2) + "\n").encode("utf-8"))
    written.append(folder / "results.json")
    return written


# --------------------------------------------------------------------------------------------- summary

def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def significant(ci_low: float | None, ci_high: float | None) -> bool:
    """An interval that excludes 0; a missing or NaN bound is never evidence of a difference."""
    if not (_finite(ci_low) and _finite(ci_high)):
        return False
    return bool(ci_low > 0 or ci_high < 0)  # type: ignore[operator]


def _fmt(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if not _finite(x):
        return "n/a"
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return text.replace("-", "+" if sign else "", 1) if float(text) == 0 else text  # no "-0.00"


def _ordered(names: Iterable[str], first: Sequence[str] = ()) -> list[str]:
    """Names in ``first``'s order, then the rest in order of appearance (display order is stable)."""
    seen = list(dict.fromkeys(names))
    return [n for n in first if n in seen] + [n for n in seen if n not in first]


def _rsa_lookup(results: ExperimentResults) -> dict[tuple[str, str, str], RsaRow]:
    return {(r.model, r.test_set, r.dimension_set): r for r in results.rsa}


def summary_lines(results: ExperimentResults, limit: int = 5) -> list[str]:
    """The headline numbers for a terminal, so a run's outcome is visible before opening the report.

    Model differences on each test set's first dimension set come first (they answer the
    question a fine-tuning run asks), then the mean per-dimension Spearman per model beside them,
    then the differences on the other dimension sets; without differences, the RSA of each model.
    When there are more lines than ``limit`` the last one says how many were left out.
    """
    rsa = _rsa_lookup(results)
    first_set = {}
    for r in results.rsa:
        first_set.setdefault(r.test_set, r.dimension_set)
    head: list[str] = []
    tail: list[str] = []
    for d in results.rsa_differences:
        a, b = rsa.get((d.model_a, d.test_set, d.dimension_set)), rsa.get((d.model_b, d.test_set, d.dimension_set))
        values = f"RSA {_fmt(a.rsa)} vs {_fmt(b.rsa)}, " if a and b else ""
        verdict = "significant" if significant(d.ci_low, d.ci_high) else "not significant"
        line = (f"{d.model_a} vs {d.model_b}, {d.test_set}, {d.dimension_set}: {values}"
                f"difference {_fmt(d.difference, sign=True)} [{_fmt(d.ci_low)}, {_fmt(d.ci_high)}], {verdict}")
        (head if first_set.get(d.test_set, d.dimension_set) == d.dimension_set else tail).append(line)
    if not results.rsa_differences:
        groups: dict[tuple[str, str], list[RsaRow]] = {}
        for r in results.rsa:
            groups.setdefault((r.test_set, r.dimension_set), []).append(r)
        for (test_set, dim_set), rows in groups.items():
            by_model = {r.model: r for r in rows}
            parts = []
            for m in _ordered(by_model, results.models):
                r = by_model[m]
                ci = f" [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]" if r.ci_low is not None and r.ci_high is not None else ""
                parts.append(f"{m} {_fmt(r.rsa)}{ci}")
            head.append(f"{test_set}, {dim_set}: RSA " + ", ".join(parts))
    for test_set in _ordered(r.test_set for r in results.dimensions):
        rows = [r for r in results.dimensions if r.test_set == test_set]
        parts = []
        for m in _ordered((r.model for r in rows), results.models):
            values = np.array([r.spearman for r in rows if r.model == m], dtype=np.float64)
            mean = float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else math.nan
            parts.append(f"{m} {_fmt(mean)}")
        head.append(f"{test_set}: mean per-dimension Spearman " + ", ".join(parts))
    lines = head + tail
    if len(lines) > limit:
        if limit <= 1:
            return lines[:max(limit, 0)]
        rest = len(lines) - (limit - 1)
        lines = lines[:limit - 1] + [f"... {rest} more line{'s' if rest > 1 else ''} in the report"]
    return lines


# --------------------------------------------------------------------------------------------- figures

def _new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot, no global backend, safe off the main thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    fig.clear()  # the figure is garbage once encoded; drop its artists now rather than at collection
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plain(text: str) -> str:
    """Text drawn verbatim: an unescaped ``$`` pair would be parsed (and may fail) as mathtext."""
    return text.replace("$", r"\$")


def _text_color(value: float, vmax: float) -> str:
    return "white" if abs(value) > 0.6 * vmax else "black"


def _rsa_figure(results: ExperimentResults) -> Figure:
    test_sets = _ordered(r.test_set for r in results.rsa)
    models = _ordered((r.model for r in results.rsa), results.models)
    fig = _new_figure(max(4.5, 3.0 * len(test_sets) + 1.5), 3.6)
    axes = fig.subplots(1, len(test_sets), squeeze=False)[0]
    width = 0.8 / len(models)
    colors = [f"C{i % 10}" for i in range(len(models))]
    for ax, test_set in zip(axes, test_sets):
        rows = [r for r in results.rsa if r.test_set == test_set]
        sets = _ordered(r.dimension_set for r in rows)
        lookup = {(r.model, r.dimension_set): r for r in rows}
        for k, model in enumerate(models):
            xs, ys, lows, highs, cis = [], [], [], [], []
            for g, s in enumerate(sets):
                r = lookup.get((model, s))
                if r is None:
                    continue
                x = g - 0.4 + width * (k + 0.5)
                xs.append(x)
                ys.append(r.rsa)
                if _finite(r.ci_low) and _finite(r.ci_high):
                    cis.append(x)
                    lows.append(r.ci_low)
                    highs.append(r.ci_high)
            ax.bar(xs, ys, width * 0.9, color=colors[k], label=_plain(model))
            if cis:
                # an interval drawn from its bounds: a percentile interval need not contain the estimate
                ax.vlines(cis, lows, highs, color="black", linewidth=1)
                ax.hlines(lows + highs, [x - width * 0.2 for x in cis * 2], [x + width * 0.2 for x in cis * 2],
                          color="black", linewidth=1)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(sets)), [_plain(s) for s in sets])
        ax.set_title(_plain(test_set))
        ax.set_ylabel("RSA")
    axes[-1].legend(fontsize="small", loc="best")
    return fig


def _wrap(label: str, width: int = 16) -> str:
    """A long axis label over several short lines (after ": ", at hyphens and spaces), never rotated."""
    import textwrap

    return "\n".join(textwrap.fill(part, width, break_on_hyphens=True) for part in label.split(": "))


def _heatmap(ax: Axes, values: np.ndarray, rows: list[str], cols: list[str], vmax: float,
             labels: list[list[str]] | None = None, cmap: str = "RdBu_r", wrap: bool = False) -> Any:
    """An annotated diverging heatmap; NaN cells are grey and read ``n/a``."""
    import matplotlib as mpl

    colormap = mpl.colormaps[cmap].with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colormap, vmin=-vmax, vmax=vmax, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = labels[i][j] if labels else ("n/a" if not np.isfinite(v) else f"{v:.2f}")
            color = _text_color(v, vmax) if np.isfinite(v) else "black"
            ax.text(j, i, _plain(text), ha="center", va="center", fontsize="small", color=color)
    if wrap:
        ax.set_xticks(range(len(cols)), [_plain(_wrap(c)) for c in cols], fontsize="small")
        ax.set_yticks(range(len(rows)), [_plain(_wrap(r, 24)) for r in rows], fontsize="small")
    else:
        ax.set_xticks(range(len(cols)), [_plain(c) for c in cols], rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), [_plain(r) for r in rows])
    return image


def _dimension_figure(results: ExperimentResults, test_set: str) -> Figure:
    rows = [r for r in results.dimensions if r.test_set == test_set]
    models = _ordered((r.model for r in rows), results.models)
    dims = _ordered(r.dimension for r in rows)
    values = np.full((len(models), len(dims)), np.nan)
    for r in rows:
        values[models.index(r.model), dims.index(r.dimension)] = r.spearman
    fig = _new_figure(max(4.0, 0.8 * len(dims) + 2.5), max(2.2, 0.5 * len(models) + 1.6))
    ax = fig.subplots()
    image = _heatmap(ax, values, models, dims, 1.0)
    ax.set_title(f"{_plain(test_set)}: Spearman of model and human ratings per dimension")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


@dataclass(frozen=True)
class TransferMatrix:
    """One transfer heatmap: differences vs one base, NaN where no run exists (never imputed)."""

    title: str
    trained_on: list[str]
    tested_on: list[str]
    difference: np.ndarray
    significant: np.ndarray
    cells: dict[tuple[str, str], TransferRow]

    def label(self, i: int, j: int) -> str:
        v = self.difference[i, j]
        return "n/a" if not np.isfinite(v) else f"{v:+.2f}{'*' if self.significant[i, j] else ''}"


def transfer_matrices(rows: list[TransferRow]) -> list[TransferMatrix]:
    """One matrix per base model; split further by model only where two models share a cell."""
    groups: list[tuple[str, list[TransferRow]]] = []
    for base in _ordered(r.base for r in rows):
        mine = [r for r in rows if r.base == base]
        cells = [(r.trained_on, r.tested_on) for r in mine]
        models = _ordered(r.model for r in mine)
        if len(set(cells)) == len(cells):
            who = models[0] if len(models) == 1 else "fine-tuned"
            groups.append((f"{who} vs {base}", mine))
        else:
            groups.extend((f"{m} vs {base}", [r for r in mine if r.model == m]) for m in models)
    out = []
    for title, mine in groups:
        trained, tested = _ordered(r.trained_on for r in mine), _ordered(r.tested_on for r in mine)
        diff = np.full((len(trained), len(tested)), np.nan)
        sig = np.zeros_like(diff, dtype=bool)
        cells: dict[tuple[str, str], TransferRow] = {}
        for r in mine:
            i, j = trained.index(r.trained_on), tested.index(r.tested_on)
            if (r.trained_on, r.tested_on) in cells:
                raise InvalidArgument(f"transfer: two rows for {r.model} vs {r.base}, trained on "
                                      f"{r.trained_on!r}, tested on {r.tested_on!r}")
            cells[(r.trained_on, r.tested_on)] = r
            diff[i, j] = r.difference
            sig[i, j] = significant(r.ci_low, r.ci_high)
        out.append(TransferMatrix(title=title, trained_on=trained, tested_on=tested, difference=diff,
                                  significant=sig, cells=cells))
    return out


def _transfer_figure(matrix: TransferMatrix) -> Figure:
    finite = np.abs(matrix.difference[np.isfinite(matrix.difference)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    label_lines = max(_wrap(t).count("\n") + 1 for t in matrix.tested_on)
    fig = _new_figure(max(5.0, 1.5 * len(matrix.tested_on) + 3.5),
                      max(2.8, 0.55 * len(matrix.trained_on) + 0.2 * label_lines + 1.8))
    ax = fig.subplots()
    labels = [[matrix.label(i, j) for j in range(len(matrix.tested_on))] for i in range(len(matrix.trained_on))]
    image = _heatmap(ax, matrix.difference, matrix.trained_on, matrix.tested_on, vmax, labels, wrap=True)
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    ax.set_title(f"{_plain(matrix.title)}: RSA difference\n(* the interval excludes 0)", fontsize="medium")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def ward_order(human: np.ndarray) -> np.ndarray:
    """Leaf order of Ward clustering of the human RDM, so clusters of similar words form blocks.

    The RDM is the one RSA uses (z-scored ratings, cosine distance, the project's own functions),
    so the blocks shown are the structure the models are scored against. A constant column gets
    z-scores of 0 instead of an error: a figure should not fail where an analysis would refuse.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage

    human = np.asarray(human, dtype=np.float64)
    if human.shape[0] < 3:
        return np.arange(human.shape[0])
    rdm = calc_rdm(zscore(human, strict=False), "cosine")
    return leaves_list(linkage(rdm, method="ward"))


@dataclass(frozen=True)
class RdmFigureData:
    """What an RDM figure shows: words in Ward order and each source's square RDM in that order."""

    test_set: str
    order: np.ndarray  # indices into the RatingsMatrix's words, in display order
    words: list[str]
    panels: list[tuple[str, np.ndarray]]  # ("human", square RDM), then one per model
    n_valid: int  # words with every rating present for every source
    n_dropped: int
    subset: bool  # a seeded random subset of ``max_words`` was drawn

    @property
    def note(self) -> str:
        parts = [f"{len(self.words)} words"]
        if self.n_dropped:
            parts.append(f"{self.n_dropped} word{'s' if self.n_dropped > 1 else ''} with a missing rating dropped")
        if self.subset:
            parts.append(f"a random subset (seed {RDM_SUBSET_SEED}) of the {self.n_valid} complete words, "
                         f"as at most {MAX_RDM_WORDS} are shown")
        return "; ".join(parts)


def rdm_figure_data(matrix: RatingsMatrix, max_words: int = MAX_RDM_WORDS,
                    seed: int = RDM_SUBSET_SEED) -> RdmFigureData | None:
    """The words and RDMs of one test set's figure; None when fewer than 3 words are complete.

    Words missing any rating of any source are dropped so every panel shows the same words. Above
    ``max_words`` a seeded random subset is drawn first and then ordered by Ward clustering, so the
    figure is reproducible and not biased towards one cluster.
    """
    sources = [("human", matrix.array())] + [(m, matrix.array(m)) for m in matrix.models]
    valid = np.ones(len(matrix.words), dtype=bool)
    for _, x in sources:
        valid &= ~np.isnan(x).any(axis=1)
    idx = np.flatnonzero(valid)
    if len(idx) < 3:
        return None
    subset = len(idx) > max_words
    if subset:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_words, replace=False))
    order = idx[ward_order(sources[0][1][idx])]
    panels = [(label, square(calc_rdm(zscore(x[order], strict=False), "cosine"))) for label, x in sources]
    return RdmFigureData(test_set=matrix.test_set, order=order, words=[matrix.words[i] for i in order],
                         panels=panels, n_valid=int(valid.sum()), n_dropped=int((~valid).sum()), subset=subset)


@cache
def _glyphs() -> frozenset[int]:
    """Code points the default font can draw; words in other scripts are not written as tofu."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())


def _drawable(text: str) -> bool:
    return all(ord(ch) in _glyphs() for ch in text)


def _rdm_figure(data: RdmFigureData) -> Figure:
    n = len(data.panels)
    fig = _new_figure(3.2 * n + 1.0, 3.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    vmax = max(2.0, max(float(p.max()) for _, p in data.panels))
    image = None
    show_words = len(data.words) <= 40 and all(_drawable(w) for w in data.words)
    for ax, (label, rdm) in zip(axes, data.panels):
        image = ax.imshow(rdm, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(_plain(label))
        if show_words:
            ticks = range(len(data.words))
            ax.set_xticks(ticks, [_plain(w) for w in data.words], rotation=90, fontsize=5)
            ax.set_yticks(ticks, [_plain(w) for w in data.words], fontsize=5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="cosine distance")
    fig.suptitle(f"{_plain(data.test_set)}: words in Ward order of the human RDM")
    return fig


def _layer_figure(results: ExperimentResults) -> Figure:
    panels = list(dict.fromkeys((r.test_set, r.dimension_set) for r in results.layers))
    models = _ordered((r.model for r in results.layers), results.models)
    cols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / cols)
    fig = _new_figure(3.8 * cols + 0.5, 3.0 * nrows + 0.4)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (test_set, dim_set) in zip(axes, panels):
        for k, model in enumerate(models):
            rows = sorted((r for r in results.layers
                           if (r.test_set, r.dimension_set, r.model) == (test_set, dim_set, model)),
                          key=lambda r: r.layer)
            if not rows:
                continue
            x = np.array([r.layer for r in rows])
            color = f"C{k % 10}"
            ax.plot(x, [r.rsa for r in rows], marker="o", markersize=3, color=color, label=_plain(model))
            low = np.array([np.nan if r.ci_low is None else r.ci_low for r in rows])
            high = np.array([np.nan if r.ci_high is None else r.ci_high for r in rows])
            if np.isfinite(low).any():
                ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
        ax.set_title(f"{_plain(test_set)}, {_plain(dim_set)}")
        ax.set_xlabel("layer")
        ax.set_ylabel("RSA")
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def _probe_figure(results: ExperimentResults) -> Figure:
    test_sets = _ordered(r.test_set for r in results.probes)
    models = _ordered((r.model for r in results.probes), results.models)
    fig = _new_figure(3.8 * len(test_sets) + 0.5, 3.2)
    axes = fig.subplots(1, len(test_sets), squeeze=False)[0]
    for ax, test_set in zip(axes, test_sets):
        for k, model in enumerate(models):
            rows = [r for r in results.probes if r.test_set == test_set and r.model == model]
            if not rows:
                continue
            layers = sorted({r.layer for r in rows})
            color = f"C{k % 10}"
            mean = [float(np.nanmean([r.spearman for r in rows if r.layer == layer])) for layer in layers]
            ax.plot(layers, mean, marker="o", markersize=3, color=color, label=_plain(model))
            shuffled = [[r.shuffled_spearman for r in rows if r.layer == layer and r.shuffled_spearman is not None]
                        for layer in layers]
            if any(shuffled):
                ax.plot(layers, [float(np.mean(s)) if s else np.nan for s in shuffled], linestyle="--",
                        color=color, alpha=0.7, label=f"{_plain(model)} (shuffled)")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"{_plain(test_set)}: probes")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean Spearman over dimensions")
        ax.legend(fontsize="small")
    return fig


def _word_figure(results: ExperimentResults, test_set: str, base: str, others: list[str]) -> tuple[Figure, str]:
    rows = [r for r in results.words if r.test_set == test_set]
    by_model: dict[str, dict[str, float]] = {}
    for r in rows:
        by_model.setdefault(r.model, {})[r.word] = r.similarity
    fig = _new_figure(3.4 * len(others) + 0.5, 3.4)
    axes = fig.subplots(1, len(others), squeeze=False)[0]
    notes = []
    for ax, model in zip(axes, others):
        words = [w for w in by_model[base] if w in by_model[model]]
        x = np.array([by_model[base][w] for w in words])
        y = np.array([by_model[model][w] for w in words])
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        ax.scatter(x, y, s=8, alpha=0.6)
        if x.size:
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
        ax.set_xlabel(f"{_plain(base)} similarity")
        ax.set_ylabel(f"{_plain(model)} similarity")
        above = int((y > x).sum())
        ax.set_title(f"{_plain(model)}: {above} of {x.size} words above")
        notes.append(f"{model}: {above} of {x.size} words closer to the human ratings than {base}")
    fig.suptitle(_plain(test_set))
    return fig, "; ".join(notes)


# --------------------------------------------------------------------------------------------- html

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
.summary { background: #f4f4f4; padding: 0.6em 1em; font-family: monospace; }
.note { color: #555; font-size: 0.9em; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img(fig: Figure, alt: str) -> str:
    return f'<img src="data:image/png;base64,{_png_base64(fig)}" alt="{_esc(alt)}">'


def _table(header: list[str], rows: list[list[str]], numeric: Iterable[int] = ()) -> str:
    """An HTML table; every cell is escaped here, so callers pass plain text."""
    num = set(numeric)
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_esc(c)}</td>' if j in num else f"<td>{_esc(c)}</td>"
                         for j, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _p(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{_esc(text)}</p>' if cls else f"<p>{_esc(text)}</p>"


def _section(key: str, body: list[str]) -> str:
    return f'<section id="{key}"><h2>{_esc(SECTION_TITLES[key])}</h2>\n' + "\n".join(body) + "\n</section>"


def _ci_text(low: float | None, high: float | None) -> str:
    return f"[{_fmt(low, 3)}, {_fmt(high, 3)}]" if low is not None and high is not None else "n/a"


def _p_text(p: float) -> str:
    if not _finite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _rsa_section(results: ExperimentResults) -> str:
    rows = [[r.test_set, r.dimension_set, r.model, _fmt(r.rsa, 3), _ci_text(r.ci_low, r.ci_high), str(r.n_words)]
            for r in results.rsa]
    level = f"{results.confidence:.0%}"
    return _section("rsa", [
        _img(_rsa_figure(results), "RSA per model"),
        _p(f"Bars: RSA of each model's RDM with the human RDM; lines: {level} bootstrap intervals over words "
           "(where computed).", "note"),
        _table(["test set", "dimension set", "model", "RSA", f"{level} interval", "words"], rows, [3, 5]),
    ])


def _differences_section(results: ExperimentResults) -> str:
    rsa = _rsa_lookup(results)
    rows = []
    for d in results.rsa_differences:
        a, b = rsa.get((d.model_a, d.test_set, d.dimension_set)), rsa.get((d.model_b, d.test_set, d.dimension_set))
        rows.append([d.test_set, d.dimension_set, d.model_a, d.model_b, _fmt(a.rsa if a else None, 3),
                     _fmt(b.rsa if b else None, 3), _fmt(d.difference, 3, sign=True), _ci_text(d.ci_low, d.ci_high),
                     "yes" if significant(d.ci_low, d.ci_high) else "no", str(d.n_words)])
    level = f"{results.confidence:.0%}"
    return _section("differences", [
        _p(f"Difference = RSA(model A) - RSA(model B) on the same words, tested with a paired bootstrap over "
           f"words: both models' RSA is recomputed on the same resamples and the {level} percentile interval of "
           "the difference is reported; significant where that interval excludes 0."),
        _table(["test set", "dimension set", "model A", "model B", "RSA A", "RSA B", "difference",
                f"{level} interval", "significant", "words"], rows, [4, 5, 6, 9]),
    ])


def _dimensions_section(results: ExperimentResults) -> str:
    body = []
    for test_set in _ordered(r.test_set for r in results.dimensions):
        body.append(_img(_dimension_figure(results, test_set), f"per-dimension Spearman, {test_set}"))
    if results.dimensions:
        body.append(_table(["test set", "model", "dimension", "Spearman", "Pearson", "words"],
                           [[r.test_set, r.model, r.dimension, _fmt(r.spearman, 3), _fmt(r.pearson, 3),
                             str(r.n_words)] for r in results.dimensions], [3, 4, 5]))
    if results.steiger:
        body.append(_p(f"Steiger tests of two dependent correlations (each model's with the same human ratings); "
                       f"* marks p < {ALPHA:g}."))
        body.append(_table(
            ["test set", "dimension", "model A", "model B", "method", "r A", "r B", "z", "p", f"p < {ALPHA:g}",
             "words"],
            [[r.test_set, r.dimension, r.model_a, r.model_b, r.method, _fmt(r.r_a, 3), _fmt(r.r_b, 3),
              _fmt(r.z, 2), _p_text(r.p_value), "*" if _finite(r.p_value) and r.p_value < ALPHA else "",
              str(r.n_words)] for r in results.steiger], [5, 6, 7, 8, 10]))
    return _section("dimensions", body)


def _transfer_section(results: ExperimentResults) -> str:
    body = [_p("Rows: the condition a model was fine-tuned on; columns: the test set or dimension set it was "
               "evaluated on; cells: RSA(fine-tuned) - RSA(base), * where the interval excludes 0, n/a where "
               "no run exists (not imputed).")]
    for m in transfer_matrices(results.transfer):
        body.append(_img(_transfer_figure(m), f"transfer, {m.title}"))
        rows = []
        for i, trained in enumerate(m.trained_on):
            row = [trained]
            for j, tested in enumerate(m.tested_on):
                r = m.cells.get((trained, tested))
                row.append("n/a" if r is None or not np.isfinite(m.difference[i, j])
                           else f"{m.label(i, j)} {_ci_text(r.ci_low, r.ci_high)}")
            rows.append(row)
        body.append(_p(m.title))
        body.append(_table(["trained on \\ tested on", *m.tested_on], rows, range(1, len(m.tested_on) + 1)))
    return _section("transfer", body)


def _rdm_section(results: ExperimentResults) -> str:
    body = [_p("Z-scored ratings (each dimension, population SD), cosine distance; words ordered by Ward "
               "clustering of the human RDM, the same order in every panel.")]
    for matrix in results.ratings:
        data = rdm_figure_data(matrix)
        if data is None:
            body.append(_p(f"{matrix.test_set}: fewer than 3 words have every rating; no RDM shown.", "note"))
            continue
        body.append(_img(_rdm_figure(data), f"RDMs, {matrix.test_set}"))
        body.append(_p(f"{matrix.test_set}: {data.note}.", "note"))
    return _section("rdms", body)


def _layers_section(results: ExperimentResults) -> str:
    body = []
    if results.layers:
        body.append(_img(_layer_figure(results), "layer-wise RSA"))
        body.append(_p(f"RSA of each layer's RDM with the human RDM; shaded: {results.confidence:.0%} bootstrap "
                       "interval where computed. Values in layers.csv.", "note"))
    if results.probes:
        body.append(_img(_probe_figure(results), "probe Spearman per layer"))
        body.append(_p("Mean over dimensions of the Spearman correlation between probe predictions and human "
                       "ratings; dashed: the same probe trained on shuffled ratings. Values in probes.csv.", "note"))
    return _section("layers", body)


def _words_section(results: ExperimentResults) -> str | None:
    base = results.models[0] if results.models else None
    body = [_p(f"Similarity 1/(1+Euclidean distance) of each word's model ratings to its human ratings; x: "
               f"{base}, y: the other model; points above the diagonal are words the model rates closer to "
               "people than the base does.")]
    shown = False
    for test_set in _ordered(r.test_set for r in results.words):
        present = {r.model for r in results.words if r.test_set == test_set}
        others = [m for m in _ordered(present, results.models) if m != base]
        if base not in present or not others:
            continue
        fig, note = _word_figure(results, test_set, base, others)  # type: ignore[arg-type]
        body.append(_img(fig, f"word-wise similarity, {test_set}"))
        body.append(_p(f"{test_set}: {note}.", "note"))
        shown = True
    return _section("words", body) if shown else None


def build_report(results: ExperimentResults, folder: Path) -> Path:
    """Write folder/report.html, one self-contained file (figures inline), atomically; return its path.

    Sections: header with the summary lines; RSA per model; model differences; per-dimension
    correlations and Steiger tests; transfer matrix; human and model RDMs in Ward order; layer-wise
    RSA and probes; word-wise similarity against the first model in ``results.models``; methods.
    Each appears only when its data exists.
    """
    folder = Path(folder)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(results.name)}</title><style>{_STYLE}</style></head><body>",
        f"<header><h1>{_esc(results.name)}</h1>",
        _p(f"Created {results.created}", "note"),
    ]
    if results.description:
        parts.append(_p(results.description))
    lines = summary_lines(results)
    if lines:
        parts.append('<div class="summary">' + "<br>\n".join(_esc(line) for line in lines) + "</div>")
    parts.append("</header>")
    if results.rsa:
        parts.append(_rsa_section(results))
    if results.rsa_differences:
        parts.append(_differences_section(results))
    if results.dimensions or results.steiger:
        parts.append(_dimensions_section(results))
    if results.transfer:
        parts.append(_transfer_section(results))
    if results.ratings:
        parts.append(_rdm_section(results))
    if results.layers or results.probes:
        parts.append(_layers_section(results))
    if results.words:
        section = _words_section(results)
        if section:
            parts.append(section)
    if results.methods:
        parts.append(_section("methods", ["<ul>" + "".join(f"<li>{_esc(m)}</li>" for m in results.methods)
                                          + "</ul>"]))
    parts.append("</body></html>\n")
    path = folder / "report.html"
    atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path
