"""Shared test fixtures: the ../shared data folder, service processes, per-file timings."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from sensorium.experiment.launcher import ServiceProcess as RunningService
from sensorium.experiment.launcher import start_service

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PAPER = SHARED / "paper-wu2026"


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not present: {path} (../shared beside the checkout)")
    return path


def ServiceProcess(name: str, tmp: Path, env: dict[str, str] | None = None,  # noqa: N802
                   timeout: float = 60.0) -> RunningService:
    """``python -m services.<name>`` as a real process on a loopback port, as a container runs it."""
    return start_service(name, tmp, env, timeout)


@pytest.fixture(scope="session")
def analyzer_process(tmp_path_factory: pytest.TempPathFactory):
    svc = ServiceProcess("analyzer", tmp_path_factory.mktemp("svc"))
    yield svc
    svc.stop()


# ---- time per test file, printed at the end of every run ------------------------------------
_durations: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _durations[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    import json

    import reliability

    for section, figures in reliability.recorded().items():
        terminalreporter.section(f"reliability: {section}")
        for key, value in figures.items():
            terminalreporter.write_line(f"{key}: {json.dumps(value, sort_keys=True)}")
    if not _durations:
        return
    terminalreporter.section("time per test file")
    for path, seconds in sorted(_durations.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.2f} s  {path}")


# ---- the extractor over a tiny offline model ------------------------------------------------
def extractor_env(model_path: Path, **extra: str) -> dict[str, str]:
    """Environment that offers the tiny model as "tiny", loads it before readiness, and reads the
    adapter store beside it (see ``tiny_adapters``)."""
    import json

    spec = {"name": "tiny", "source": {"path": str(model_path)}, "kind": "causal-lm", "device": "cpu"}
    return {"SENSORIUM_EXTRACTOR_MODELS": json.dumps({"tiny": spec}),
            "SENSORIUM_EXTRACTOR_PRELOAD": json.dumps(["tiny"]),
            "SENSORIUM_EXTRACTOR_ADAPTERS_DIR": str(model_path.parent / "adapters"), **extra}


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sensorium.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def publish_lora(model_path: Path, store: Path, adapter_id: str, seed: int, *, base_model: str = "tiny",
                 base_digest: str | None = None, layers: list[int] | None = None) -> None:
    """A random (non-zero) LoRA adapter for a model directory, published as the trainer does."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sensorium.models.adapters import AdapterStore
    from sensorium.models.store import model_digest

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        layers_to_transform=layers, init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), config)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        AdapterStore(store).publish(adapter_id, Path(tmp), base_model=base_model,
                                    base_digest=base_digest or model_digest(model_path), training={"seed": seed})


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_path: Path) -> list[str]:
    """Two adapters of the tiny model and one that claims another base, in the store ``extractor_env`` names."""
    store = tiny_model_path.parent / "adapters"
    publish_lora(tiny_model_path, store, "tiny-a", seed=1)
    publish_lora(tiny_model_path, store, "tiny-b", seed=2, layers=[1])
    publish_lora(tiny_model_path, store, "foreign", seed=3, base_model="other", base_digest="0" * 64)
    return ["tiny-a", "tiny-b"]


# ---- the embedded default model (SmolLM2-135M-Instruct), converted once per run -------------
from typing import TYPE_CHECKING, Any  # noqa: E402

if TYPE_CHECKING:
    from sensorium.models import ModelStore


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """One model store for the whole run: converting the GGUF takes tens of seconds, so the first
    test that needs SmolLM2 pays for it and every later one reuses the entry, whether it loads the
    model in this process or points a served extractor at ``store.root`` (MODELS_DIR)."""
    from sensorium.models import ModelStore

    return ModelStore(tmp_path_factory.mktemp("smollm2") / "store")


def unbatched_rating(model: Any, tokenizer: Any, prompt: str) -> tuple[float, float]:
    """The expected rating and the digit mass of one prompt from its own forward pass.

    The definition the batched, prefix-reusing computation must reproduce: no padding, no shared
    key/value cache, the answer tokens looked up here rather than through ``sensorium.ratings``.
    Returns (sum(p_d * d) / sum(p_d), sum(p_d)) over the digits d = 0..5 under the full softmax.
    """
    import torch

    digits = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(6)]
    assert all(len(ids) == 1 for ids in digits), digits
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        p = torch.softmax(model(input_ids).logits[0, -1].double(), -1)[[ids[0] for ids in digits]]
    return float((p / p.sum()) @ torch.arange(6.0, dtype=torch.float64)), float(p.sum())


# ---- figures of the reliability suites, written once at the end of the run -------------------
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import reliability

    reliability.write()
