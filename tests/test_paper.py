"""The paper's released numbers, reproduced from its released ratings with the library's code.

Wu, Conde, Reviriego & Brysbaert (2026), ../shared/data/paper-wu2026/model-ratings. The recipe
(SOURCE.md there): z-score each dimension, cosine RDMs (NaN -> 2.0), Spearman, words with a
missing value dropped. Reported: English RSA over all 11 dimensions, base 0.192, En_FT 0.724;
Steiger's z for auditory, base vs En_FT, -30.96.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from conftest import PAPER, need_shared
from sensorium.representations import Representations
from sensorium.rsa import DimensionSet, RsaOptions, run_rsa
from sensorium.stats import compare_dimensions, steiger_z
from sensorium.tables import read_table

EN_DIMS = ["auditory", "gustatory", "haptic", "interoceptive", "olfactory", "visual",
           "foot", "hand", "head", "mouth", "torso"]
NL_DIMS = ["Horen", "Proeven", "Voelen", "Sensaties", "Ruiken", "Zien"]
MODELS = {"base": "base", "En_FT": "en_ft", "Nl_FT": "nl_ft", "QA_FT": "QA_ft"}


@pytest.fixture(scope="module")
def english() -> Representations:
    table = read_table(need_shared(PAPER / "model-ratings" / "En_all_models_results.csv"))
    return Representations.from_table(table, [f"{d}.mean" for d in EN_DIMS],
                                      {m: [f"{d}_{s}" for d in EN_DIMS] for m, s in MODELS.items()})


def scipy_rsa(human: np.ndarray, model: np.ndarray) -> float:
    """An independent implementation of the released recipe."""
    keep = np.isfinite(human).all(1) & np.isfinite(model).all(1)
    z = lambda x: (x - x.mean(0)) / x.std(0)  # noqa: E731

    def rdm(x: np.ndarray) -> np.ndarray:
        d = pdist(z(x[keep]), "cosine")
        d[np.isnan(d)] = 2.0
        d[np.abs(d) < 1e-12] = 0.0  # identical rows: scipy leaves ~1e-16 of rounding noise
        return d

    return spearmanr(rdm(human), rdm(model)).statistic


def test_english_rsa_reproduces_the_paper(english: Representations) -> None:
    report = run_rsa(english, [DimensionSet(name="all"), DimensionSet(name="sensory"), DimensionSet(name="motor")])
    got = {(r.model, r.dimension_set): r for r in report.results}
    assert round(got[("base", "all")].rsa, 3) == 0.192
    assert round(got[("En_FT", "all")].rsa, 3) == 0.724
    assert got[("base", "all")].n_words == 1570 and got[("base", "all")].n_dropped == 2
    # every other value of the grid from the same code, against the independent recipe
    cols = {"all": slice(0, 11), "sensory": slice(0, 6), "motor": slice(6, 11)}
    for (model, dset), r in got.items():
        ref = scipy_rsa(english.human[:, cols[dset]], english.models[model][:, cols[dset]])
        assert r.rsa == pytest.approx(ref, abs=1e-9), (model, dset)
    # the ordering the paper reports: En_FT > Nl_FT > QA_FT ~ base
    assert got[("En_FT", "all")].rsa > got[("Nl_FT", "all")].rsa > got[("QA_FT", "all")].rsa > got[("base", "all")].rsa


def test_dutch_rsa_on_the_dutch_prompts() -> None:
    table = read_table(need_shared(PAPER / "model-ratings" / "Nl_all_models_results.csv"))
    models = {"base": "base", "En_FT": "en_ft", "Nl_FT": "nl_ft"}
    reps = Representations.from_table(table, NL_DIMS, {m: [f"{d}_{s}" for d in NL_DIMS] for m, s in models.items()})
    report = run_rsa(reps)
    for r in report.results:
        assert r.rsa == pytest.approx(scipy_rsa(reps.human, reps.models[r.model]), abs=1e-9)
    got = {r.model: r.rsa for r in report.results}
    assert got["Nl_FT"] > got["En_FT"] > got["base"]


def test_fine_tuning_gain_interval_excludes_zero(english: Representations) -> None:
    two = Representations(words=english.words, feature_names=english.feature_names, human=english.human,
                          models={m: english.models[m] for m in ("En_FT", "base")})
    report = run_rsa(two, comparisons=[("En_FT", "base")], options=RsaOptions(n_bootstrap=200, seed=0))
    diff = report.differences[0]
    assert diff.difference == pytest.approx(0.724 - 0.192, abs=2e-3)
    assert 0 < diff.ci.low < diff.difference < diff.ci.high


def test_steiger_reproduces_the_paper(english: Representations) -> None:
    report = compare_dimensions(english, [("base", "En_FT")])
    test = next(t for t in report.steiger if t.feature == "Auditory.mean" and t.method == "spearman")
    assert round(test.z, 2) == -30.96
    assert test.n_words == 1571
    assert test.p_value < 1e-100
    assert steiger_z(test.r_a, test.r_b, test.r_ab, test.n_words)[0] == pytest.approx(test.z)
