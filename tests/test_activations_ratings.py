"""Activations and ratings on a tiny random model: batching, padding and prefix reuse change nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sensorium.activations import iter_activations, resolve_layers
from sensorium.errors import InvalidArgument
from sensorium.prompts import chat_prompt, default_template
from sensorium.ratings import answer_token_ids, parse_rating, rate

WORDS = ["apple", "thunder", "soft", "run", "music", "lemon", "stone", "kick"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sensorium.models.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tokenizer


def collect(model, tokenizer, words, layers, pooling, render=None, batch_size=64):
    out = {k: [] for k in layers}
    for _, batch in iter_activations(model, tokenizer, words, layers, pooling, render, batch_size):
        for k, v in batch.items():
            out[k].append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def test_resolve_layers() -> None:
    assert resolve_layers(None, 4) == [0, 1, 2, 3, 4]
    assert resolve_layers([0, -1, 0.5, 1.0], 4) == [0, 4, 2]
    for bad in ([5], [-6], [1.5]):
        with pytest.raises(InvalidArgument):
            resolve_layers(bad, 4)


@pytest.mark.parametrize("pooling", ["last", "word-mean", "mean"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_words_vector_does_not_depend_on_its_batch(tiny, pooling: str, side: str) -> None:
    model, tokenizer = tiny
    tokenizer.padding_side = side
    template = default_template("en", "visual")
    try:
        together = collect(model, tokenizer, WORDS, [0, 1, 2], pooling, template.render, batch_size=8)
        alone = collect(model, tokenizer, WORDS, [0, 1, 2], pooling, template.render, batch_size=1)
    finally:
        tokenizer.padding_side = "left"
    for k in together:
        np.testing.assert_allclose(together[k], alone[k], atol=2e-5, rtol=1e-4)


def test_pooling_matches_a_hand_computation(tiny) -> None:
    import torch

    model, tokenizer = tiny
    got = collect(model, tokenizer, ["thunder"], [2], "mean")[2][0]
    ids = tokenizer("thunder", return_tensors="pt")
    with torch.inference_mode():
        hidden = model.base_model(**ids, output_hidden_states=True).hidden_states[2][0]
    np.testing.assert_allclose(got, hidden.mean(0).numpy(), atol=1e-6)
    last = collect(model, tokenizer, ["thunder"], [2], "last")[2][0]
    np.testing.assert_allclose(last, hidden[-1].numpy(), atol=1e-6)


def test_parse_rating() -> None:
    assert parse_rating("3") == 3.0 and parse_rating("I'd say 4.5 out of 5") == 4.5
    assert parse_rating("I can experience the") is None and parse_rating("7") is None


def test_expected_rating_equals_an_unbatched_softmax_and_prefix_reuse_changes_nothing(tiny) -> None:
    import torch

    model, tokenizer = tiny
    template = default_template("en", "auditory")
    prompt = lambda w: chat_prompt(template.render(w), tokenizer)  # noqa: E731
    fast = rate(model, tokenizer, WORDS, prompt, batch_size=3)
    plain = rate(model, tokenizer, WORDS, prompt, batch_size=5, reuse_prefix=False)
    assert fast.prefix_reused.all() and not plain.prefix_reused.any()
    np.testing.assert_allclose(fast.expected, plain.expected, atol=1e-5)
    np.testing.assert_allclose(fast.mass, plain.mass, atol=1e-6)
    ids = answer_token_ids(tokenizer)
    for i, word in enumerate(WORDS):
        enc = tokenizer(prompt(word), return_tensors="pt")
        with torch.inference_mode():
            p = torch.softmax(model(**enc).logits[0, -1].float(), -1)[ids].numpy().astype(float)
        assert fast.expected[i] == pytest.approx((p / p.sum()) @ np.arange(6), abs=1e-5)
        assert fast.mass[i] == pytest.approx(p.sum(), abs=1e-6)
    assert np.all((fast.expected >= 0) & (fast.expected <= 5))


@pytest.mark.parametrize("reuse", [True, False])
def test_greedy_answers_equal_generate_one_prompt_at_a_time(tiny, reuse: bool) -> None:
    import torch

    model, tokenizer = tiny
    template = default_template("en", "haptic")
    prompt = lambda w: chat_prompt(template.render(w), tokenizer)  # noqa: E731
    got = rate(model, tokenizer, WORDS, prompt, batch_size=3, max_new_tokens=4, reuse_prefix=reuse)
    for i, word in enumerate(WORDS):
        enc = tokenizer(prompt(word), return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert got.answers[i] == expected, word
        assert got.parsed[i] == parse_rating(expected)


def test_ratings_never_read_uninitialised_memory(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fresh buffer holds NaN here; a result that touched one unwritten slot would be NaN."""
    import torch

    model, tokenizer = tiny
    template = default_template("en", "visual")
    prompt = lambda w: chat_prompt(template.render(w), tokenizer)  # noqa: E731
    want = rate(model, tokenizer, WORDS, prompt, batch_size=4, max_new_tokens=3)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    got = rate(model, tokenizer, WORDS, prompt, batch_size=4, max_new_tokens=3)
    assert np.isfinite(got.expected).all() and np.isfinite(got.mass).all()
    np.testing.assert_allclose(got.expected, want.expected, atol=1e-6)
    assert got.answers == want.answers


# ---- the shared-prefix path: the same ratings as the model's own forward and as generate() -------
MIXED = ["apple", "thunder", "soft", "run", "music", "lemon", "stone", "kick", "velvet", "cinnamon", "a", "xylophone"]


def random_causal_lm(tokenizer, family: str, seed: int = 0):
    """A 2-layer random model of a family, its weights spread wide enough that greedy answers differ."""
    import torch
    import transformers

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.5)
    config, cls = {
        "llama": (lambda: transformers.LlamaConfig(**common), transformers.LlamaForCausalLM),
        "qwen2": (lambda: transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM),
        "mistral": (lambda: transformers.MistralConfig(sliding_window=None, **common), transformers.MistralForCausalLM),
        "gpt2": (lambda: transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                                 n_positions=512, bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id, initializer_range=0.5),
                 transformers.GPT2LMHeadModel),
    }[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config()).eval()


def generate_one_at_a_time(model, tokenizer, prompt, words) -> list[str]:
    import torch

    answers = []
    for word in words:
        enc = tokenizer(prompt(word), return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("reuse", [True, False])
def test_shared_prefix_path_equals_the_models_forward_and_generate(tiny, family: str, reuse: bool) -> None:
    from sensorium.ratings import _SharedPrefixModel

    _, tokenizer = tiny
    model = random_causal_lm(tokenizer, family)
    assert _SharedPrefixModel.fits(model)
    template = default_template("en", "haptic")
    prompt = lambda w: chat_prompt(template.render(w), tokenizer)  # noqa: E731
    # words of 1 to 7 tokens: rows of different lengths share every batch, and the last is short
    lean = rate(model, tokenizer, MIXED, prompt, batch_size=5, max_new_tokens=4, reuse_prefix=reuse)
    plain = rate(model, tokenizer, MIXED, prompt, batch_size=5, max_new_tokens=4, reuse_prefix=reuse,
                 shared_prefix_path=False)
    assert lean.prefix_reused.all() == reuse
    np.testing.assert_allclose(lean.expected, plain.expected, atol=1e-5)
    np.testing.assert_allclose(lean.mass, plain.mass, atol=1e-6, rtol=1e-4)
    answers = generate_one_at_a_time(model, tokenizer, prompt, MIXED)
    assert len(set(answers)) > 3  # a test of greedy decoding needs answers that differ
    assert lean.answers == plain.answers == answers


def test_expected_only_and_greedy_agree_on_the_shared_prefix_path(tiny) -> None:
    _, tokenizer = tiny
    model = random_causal_lm(tokenizer, "llama", seed=1)
    template = default_template("en", "visual")
    prompt = lambda w: chat_prompt(template.render(w), tokenizer)  # noqa: E731
    greedy = rate(model, tokenizer, MIXED, prompt, batch_size=64, max_new_tokens=3)
    alone = rate(model, tokenizer, MIXED, prompt, batch_size=1, max_new_tokens=0)
    np.testing.assert_allclose(greedy.expected, alone.expected, atol=1e-5)
    np.testing.assert_allclose(greedy.mass, alone.mass, atol=1e-6, rtol=1e-4)
    assert alone.answers == [""] * len(MIXED) and alone.parsed == [None] * len(MIXED)
    assert all(greedy.answers)


def test_an_adapter_applies_on_the_shared_prefix_path(tiny) -> None:
    """LoRA layers injected into the projections are called, not bypassed."""
    from peft import LoraConfig, inject_adapter_in_model

    _, tokenizer = tiny
    template = default_template("en", "auditory")
    prompt = lambda w: chat_prompt(template.render(w), tokenizer)  # noqa: E731
    base = rate(random_causal_lm(tokenizer, "llama"), tokenizer, MIXED, prompt, max_new_tokens=4)
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                   target_modules=["q_proj", "v_proj", "down_proj"]),
                                        random_causal_lm(tokenizer, "llama"))
    lean = rate(model, tokenizer, MIXED, prompt, batch_size=4, max_new_tokens=4)
    plain = rate(model, tokenizer, MIXED, prompt, batch_size=4, max_new_tokens=4, shared_prefix_path=False)
    assert np.abs(lean.expected - base.expected).max() > 1e-3  # the adapter changes the ratings
    np.testing.assert_allclose(lean.expected, plain.expected, atol=1e-5)
    assert lean.answers == plain.answers == generate_one_at_a_time(model, tokenizer, prompt, MIXED)


def test_other_architectures_use_the_models_own_forward(tiny) -> None:
    from sensorium.errors import FailedPrecondition
    from sensorium.ratings import _SharedPrefixModel

    _, tokenizer = tiny
    model = random_causal_lm(tokenizer, "gpt2")
    assert not _SharedPrefixModel.fits(model)
    template = default_template("en", "haptic")
    prompt = lambda w: chat_prompt(template.render(w), tokenizer)  # noqa: E731
    got = rate(model, tokenizer, MIXED, prompt, batch_size=5, max_new_tokens=4)
    assert got.prefix_reused.all()
    assert got.answers == generate_one_at_a_time(model, tokenizer, prompt, MIXED)
    with pytest.raises(FailedPrecondition):
        rate(model, tokenizer, MIXED[:2], prompt, shared_prefix_path=True)
