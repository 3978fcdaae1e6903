"""The ``sensorium.v1`` contract may grow but never break; the stubs are generated, never edited."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

from conftest import ROOT
from sensorium.contract import SNAPSHOT, breaking_changes, describe


def test_contract_matches_snapshot_without_breaking_changes() -> None:
    assert SNAPSHOT.exists(), "run `make snapshot` to record the contract"
    assert breaking_changes(json.loads(SNAPSHOT.read_text()), describe()) == []


def test_breaking_changes_are_detected_and_additions_pass() -> None:
    old = describe()
    new = copy.deepcopy(old)
    rsa = new["messages"]["sensorium.v1.RsaResult"]
    rsa["brand_new"] = {"number": 99, "type": 1, "type_name": "", "repeated": False, "oneof": ""}
    new["services"]["sensorium.v1.Analyzer"]["NewRpc"] = {"input": "a", "output": "b",
                                                          "client_streaming": False, "server_streaming": False}
    assert breaking_changes(old, new) == []
    del rsa["n_words"]
    rsa["rsa"]["number"] = 42
    rsa["model"]["type"] = 5
    del new["services"]["sensorium.v1.Analyzer"]["ComputeRsa"]
    new["enums"]["sensorium.v1.Distance"]["DISTANCE_COSINE"] = 7
    problems = "\n".join(breaking_changes(old, new))
    for text in ("RsaResult.n_words", "RsaResult.rsa renumbered", "RsaResult.model changed type",
                 "Analyzer.ComputeRsa removed", "Distance.DISTANCE_COSINE"):
        assert text in problems


def test_generated_stubs_are_current(tmp_path) -> None:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", *protos], cwd=ROOT, check=True)
    for fresh in tmp_path.rglob("*.py"):
        in_tree = ROOT / fresh.relative_to(tmp_path)
        assert in_tree.read_text() == fresh.read_text(), f"{in_tree} is stale: run `make proto`"
