"""The ``sensorium analyze`` command: exact flags and JSON keys other tools script against."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import PAPER, ROOT, ServiceProcess, need_shared
from sensorium.cli import main


def write_table(path: Path, seed: int = 0, n: int = 50) -> Path:
    rng = np.random.default_rng(seed)
    human = rng.uniform(0, 5, size=(n, 3))
    good = np.round(human + rng.normal(scale=0.5, size=human.shape))
    bad = np.round(rng.uniform(0, 5, size=human.shape))
    rows = ["word,Visual.mean,Haptic.mean,Auditory.mean,vis_ft,hap_ft,aud_ft,vis_b,hap_b,aud_b"]
    for i in range(n):
        cells = [*human[i], *good[i], *bad[i]]
        rows.append(",".join([f"w{i}", *(f"{c:.3f}" for c in cells)]))
    rows[5] = rows[5].rsplit(",", 1)[0] + ","  # one missing value for model b
    path.write_text("\n".join(rows) + "\n")
    return path


def run_cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_rsa_json(tmp_path: Path, capsys) -> None:
    table = write_table(tmp_path / "t.csv")
    code, out, _ = run_cli(capsys, "analyze", "rsa", str(table), "--human", "visual.mean,HAPTIC.MEAN,auditory.mean",
                           "--model", "vis_ft,hap_ft,aud_ft", "--bootstrap", "50", "--seed", "1", "--json")
    assert code == 0
    assert {"rsa", "n_words", "ci_low", "ci_high"} <= out.keys()
    assert out["ci_low"] < out["rsa"] < out["ci_high"] and out["n_words"] == 50
    code, plain, _ = run_cli(capsys, "analyze", "rsa", str(table), "--human", "Visual.mean,Haptic.mean,Auditory.mean",
                             "--model", "vis_ft,hap_ft,aud_ft", "--json", "--distance", "euclidean", "--no-zscore",
                             "--compare", "kendall-tau-a")
    assert code == 0 and "ci_low" not in plain and plain["rsa"] != out["rsa"]


def test_dims_and_words_json(tmp_path: Path, capsys) -> None:
    table = write_table(tmp_path / "t.csv")
    args = ["--human", "Visual.mean,Haptic.mean,Auditory.mean", "--model", "vis_ft,hap_ft,aud_ft",
            "--model-b", "vis_b,hap_b,aud_b", "--json"]
    code, dims, _ = run_cli(capsys, "analyze", "dims", str(table), *args)
    assert code == 0
    assert set(dims["spearman"]) == {"Visual.mean", "Haptic.mean", "Auditory.mean"}
    assert set(dims["pearson"]) == set(dims["z"]) == set(dims["p"]) == set(dims["spearman"])
    assert all(z > 0 for z in dims["z"].values())
    code, words, _ = run_cli(capsys, "analyze", "words", str(table), *args)
    assert code == 0
    assert words["mean_similarity"] > words["mean_similarity_b"] and words["t"] > 0
    assert {"p", "df", "ranking_spearman", "n_words"} <= words.keys()
    assert words["n_words_paired"] == 49


@pytest.mark.parametrize("argv, message", [
    (["--human", "nope", "--model", "vis_ft"], "no column 'nope'"),
    (["--human", "Visual.mean,Haptic.mean", "--model", "vis_ft"], "same order"),
    (["--human", "Visual.mean", "--model", "vis_ft", "--bootstrap", "99999999"], "max_bootstrap"),
    (["--human", "Visual.mean", "--model", "vis_ft", "--bootstrap", "-3"], "n_bootstrap"),
])
def test_errors_are_one_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    table = write_table(tmp_path / "t.csv")
    code, _, err = run_cli(capsys, "analyze", "rsa", str(table), *argv, "--json")
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_file_and_bad_flags_exit_nonzero(tmp_path: Path) -> None:
    for argv in (["analyze", "rsa", str(tmp_path / "none.csv"), "--human", "a", "--model", "b", "--json"],
                 ["analyze", "rsa", "x.csv", "--human", "a", "--model", "b", "--distance", "manhattan"]):
        proc = subprocess.run([sys.executable, "-m", "sensorium.cli", *argv], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.strip()


def test_server_option_gives_the_same_numbers(tmp_path: Path, capsys, analyzer_process: ServiceProcess) -> None:
    table = write_table(tmp_path / "t.csv")
    args = ["analyze", "rsa", str(table), "--human", "Visual.mean,Haptic.mean,Auditory.mean",
            "--model", "vis_ft,hap_ft,aud_ft", "--bootstrap", "30", "--json"]
    _, local, _ = run_cli(capsys, *args)
    _, remote, _ = run_cli(capsys, *args, "--server", analyzer_process.address)
    assert local == remote


def test_paper_table_through_the_cli(capsys) -> None:
    table = need_shared(PAPER / "model-ratings" / "En_all_models_results.csv")
    dims = ["Auditory", "Gustatory", "Haptic", "Interoceptive", "Olfactory", "Visual", "Foot", "Hand", "Head",
            "Mouth", "Torso"]
    code, out, _ = run_cli(capsys, "analyze", "rsa", str(table), "--human", ",".join(f"{d}.mean" for d in dims),
                           "--model", ",".join(f"{d}_en_ft" for d in dims), "--json")
    assert code == 0 and round(out["rsa"], 3) == 0.724
