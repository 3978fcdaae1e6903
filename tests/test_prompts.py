"""Rating prompt templates: built-ins, user files, and chat formatting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sensorium.errors import InvalidArgument, NotFound
from sensorium.norms.dimensions import DIMENSIONS, SENSORY, canonical_dimension
from sensorium.prompts import (
    PromptTemplate,
    available,
    chat_prompt,
    default_template,
    load_template,
    load_template_set,
    split_for_prefix,
)

RELEASED = Path(__file__).resolve().parents[1].parent / "shared/data/paper-wu2026/prompts"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DUTCH_STEMS = {"horen", "proeven", "ruiken", "sensaties", "voelen", "zien"}


class FakeChatTokenizer:
    chat_template = "fake"

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool,
                            tokenize: bool) -> str:
        assert add_generation_prompt and not tokenize
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return "<s>" + body + "<assistant>"


class PlainTokenizer:
    chat_template = None


# --- built-ins -------------------------------------------------------------------------------

def test_available_languages_and_dimensions() -> None:
    own_files = {"en": DIMENSIONS, "nl": SENSORY}
    english_instructions = {lang: DIMENSIONS for lang in ("de", "es", "fr", "hr", "it", "ru", "zh")}
    assert available() == own_files | english_instructions
    for language, dims in available().items():
        for dim in dims:
            t = default_template(language, dim)
            assert (t.language, t.dimension, t.source) == (language, dim, "builtin")


def test_default_lookup_is_case_insensitive_and_missing_names_are_listed() -> None:
    assert default_template("EN", "Visual") == default_template("en", "visual")
    with pytest.raises(NotFound, match="available: de, en, es, fr, hr, it, nl, ru, zh"):
        default_template("xx", "visual")
    with pytest.raises(NotFound, match="auditory.*visual"):
        default_template("nl", "torso")


@pytest.mark.parametrize("language", ["en", "nl"])
def test_word_comes_after_everything_dimension_specific(language: str) -> None:
    templates = [default_template(language, d) for d in available()[language]]
    assert len({t.prefix for t in templates}) == len(templates)
    assert len({t.suffix for t in templates}) == 1
    assert len(templates[0].suffix) <= 20 and "{" not in templates[0].suffix
    for t in templates:
        assert t.text.endswith("{word}" + t.suffix)
        assert "0" in t.prefix and "5" in t.prefix


def test_dutch_prompts_ask_for_a_native_speaker_of_dutch() -> None:
    for dim in SENSORY:
        assert "native speaker of Dutch" in default_template("nl", dim).prefix
        assert "native speaker of English" in default_template("en", dim).prefix


# --- the template model ----------------------------------------------------------------------

def test_render_prefix_suffix() -> None:
    t = PromptTemplate(language="en", dimension="visual", text="Rate {{braces}} for: {word}?")
    assert t.prefix == "Rate {braces} for: "
    assert t.suffix == "?"
    assert t.render("apple") == "Rate {braces} for: apple?"
    assert t.render("{x}") == "Rate {braces} for: {x}?"


def test_digest_is_stable_and_ignores_source() -> None:
    a = PromptTemplate(language="en", dimension="visual", text="Rate: {word}")
    b = PromptTemplate(language="EN", dimension="Visual", text="Rate: {word}", source="/tmp/x.txt")
    assert a.digest == b.digest
    assert len(a.digest) == 64 and int(a.digest, 16) >= 0
    assert a.digest == PromptTemplate(language="en", dimension="visual", text="Rate: {word}").digest
    assert a.digest != PromptTemplate(language="en", dimension="haptic", text="Rate: {word}").digest
    assert a.digest != PromptTemplate(language="nl", dimension="visual", text="Rate: {word}").digest
    assert a.digest != PromptTemplate(language="en", dimension="visual", text="Rate:  {word}").digest


def test_template_is_frozen() -> None:
    t = default_template("en", "visual")
    with pytest.raises(ValidationError):
        t.text = "x {word}"  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    ["no placeholder", "{word} and {word}", "{word} and {x}", "{}: {word}", "{0} {word}",
     "{word!r}", "{word:>10}", "unbalanced } {word}", "unbalanced { {word}"],
)
def test_bad_templates_are_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        PromptTemplate(language="en", dimension="visual", text=text)


def test_bad_language_or_dimension_refused() -> None:
    with pytest.raises(ValidationError):
        PromptTemplate(language="en", dimension="smell", text="{word}")
    with pytest.raises(ValidationError):
        PromptTemplate(language=" ", dimension="visual", text="{word}")


# --- user files ------------------------------------------------------------------------------

@pytest.mark.parametrize("placeholder", ["{word}", "{Word}", "{Woord}"])
def test_load_template_detects_placeholder(tmp_path: Path, placeholder: str) -> None:
    f = tmp_path / "p.txt"
    f.write_text(f'Rate {{{{this}}}} "{placeholder}". Only a number. \n', encoding="utf-8")
    t = load_template(f, "nl", "Visual")
    assert t.text == 'Rate {{this}} "{word}". Only a number.'
    assert t.render("appel") == 'Rate {this} "appel". Only a number.'
    assert (t.language, t.dimension, t.source) == ("nl", "visual", str(f))


def test_load_template_named_placeholder(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("Term: {term}", encoding="utf-8")
    assert load_template(f, "en", "head", placeholder="{term}").text == "Term: {word}"
    assert load_template(f, "en", "head", placeholder="term").render("nod") == "Term: nod"


@pytest.mark.parametrize(
    ("content", "match"),
    [("nothing to fill", "no placeholder"), ("{Word} {Woord}", "ambiguous"),
     ("{Word} {Word}", "exactly once"), ("{Word} {other}", "other"), ("{Word} }", "braces")],
)
def test_load_template_errors_name_the_file(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "bad_prompt.txt"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidArgument, match=match) as info:
        load_template(f, "en", "visual")
    assert str(f) in str(info.value)


def test_load_template_missing_file_and_bad_dimension(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="missing.txt"):
        load_template(tmp_path / "missing.txt", "en", "visual")
    f = tmp_path / "p.txt"
    f.write_text("{word}", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="p.txt.*unknown dimension"):
        load_template(f, "en", "smell")


def test_load_template_set_matches_builtin_schema(tmp_path: Path) -> None:
    f = tmp_path / "set.yaml"
    f.write_text("language: en\nVisual: 'Look at: {word}'\nhaptic: |-\n  Touch:\n  {Word}\n", encoding="utf-8")
    templates = load_template_set(f)
    assert list(templates) == ["visual", "haptic"]
    assert templates["haptic"].render("silk") == "Touch:\nsilk"
    assert all(t.source == str(f) and t.language == "en" for t in templates.values())
    builtin = Path(__file__).resolve().parents[1] / "sensorium/prompts/templates/en.yaml"
    assert load_template_set(builtin)["torso"].digest == default_template("en", "torso").digest


@pytest.mark.parametrize(
    ("content", "match"),
    [("visual: '{word}'", "language"), ("- a\n- b", "mapping"), ("language: en", "no prompt"),
     ("language: en\nsmell: '{word}'", "unknown dimension"), ("language: en\nvisual: 3", "prompt text"),
     ("language: en\nvisual: '{x}'", "placeholder"), ("language: en\nvisual: '{word}'\nVisual: '{word}'", "twice"),
     ("language: [", "YAML")],
)
def test_load_template_set_errors_name_the_file(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "set.yaml"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidArgument, match=match) as info:
        load_template_set(f)
    assert str(f) in str(info.value)


def test_released_prompt_files_load() -> None:
    if not RELEASED.is_dir():
        pytest.skip(f"released prompts not present: {RELEASED} (../shared beside the checkout)")
    loaded = []
    for f in sorted(RELEASED.glob("*_prompt.txt")):
        dim = canonical_dimension(f.stem)
        assert dim is not None, f
        language = "nl" if f.stem.split("_")[0].casefold() in DUTCH_STEMS else "en"
        t = load_template(f, language, dim)
        assert t.render("XYZ").count('"XYZ"') == 1
        loaded.append((language, dim))
    assert len(loaded) == 17
    assert sorted(d for lang, d in loaded if lang == "en") == sorted(DIMENSIONS)
    assert sorted(d for lang, d in loaded if lang == "nl") == sorted(SENSORY)


# --- chat formatting -------------------------------------------------------------------------

def test_chat_prompt_with_and_without_chat_template() -> None:
    assert chat_prompt("hi", FakeChatTokenizer()) == "<s><user>hi</user><assistant>"
    assert chat_prompt("hi", PlainTokenizer()) == "hi"
    assert chat_prompt("hi", object()) == "hi"
    assert chat_prompt("hi", None) == "hi"


@pytest.mark.parametrize("tokenizer", [FakeChatTokenizer(), PlainTokenizer(), None])
def test_split_for_prefix_round_trips(tokenizer: Any) -> None:
    for language, dims in available().items():
        for dim in dims:
            t = default_template(language, dim)
            prefix, suffix = split_for_prefix(t, tokenizer)
            for word in ("apple", "ice cream", "{x}"):
                assert prefix + word + suffix == chat_prompt(t.render(word), tokenizer)
            assert prefix.endswith(t.prefix)


def test_split_for_prefix_refuses_a_template_that_repeats_the_message() -> None:
    class Echo(FakeChatTokenizer):
        def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
            return messages[0]["content"] * 2

    with pytest.raises(InvalidArgument, match="2 copies"):
        split_for_prefix(default_template("en", "visual"), Echo())


def _real_tokenizer(chat_template: str | None) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "concept": 1, "apple": 2, ":": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=chat_template)


def test_chat_prompt_with_a_real_transformers_tokenizer() -> None:
    pytest.importorskip("transformers")
    t = default_template("en", "visual")
    chat = _real_tokenizer(CHAT_TEMPLATE)
    assert chat_prompt(t.render("apple"), chat) == f"<|user|>{t.render('apple')}\n<|assistant|>"
    prefix, suffix = split_for_prefix(t, chat)
    assert prefix == "<|user|>" + t.prefix and suffix == t.suffix + "\n<|assistant|>"
    plain = _real_tokenizer(None)
    assert chat_prompt(t.render("apple"), plain) == t.render("apple")
    assert split_for_prefix(t, plain) == (t.prefix, t.suffix)


def test_import_does_not_pull_in_torch_or_transformers() -> None:
    code = "import sys, sensorium.prompts; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- named prompt sets: a study's own prompt files, read by path on the server ---------------
def test_prompt_folder_reads_study_files_and_yaml_sets(tmp_path) -> None:
    from sensorium.prompts.sets import PromptSets, load_prompt_folder

    (tmp_path / "visual_prompt.txt").write_text('Rate seeing "{Word}" from 0 to 5.\n', encoding="utf-8")
    (tmp_path / "foot_prompt.txt").write_text("Rate the foot for {Word}.", encoding="utf-8")
    (tmp_path / "Zien_prompt.txt").write_text('Hoe sterk zie je "{Woord}"?', encoding="utf-8")
    (tmp_path / "it.yaml").write_text("language: it\nvisual: 'Quanto vedi {word}?'\n", encoding="utf-8")
    (tmp_path / "README.txt").write_text("not a template", encoding="utf-8")
    templates = load_prompt_folder(tmp_path)
    assert sorted(templates) == [("en", "foot_leg"), ("en", "visual"), ("it", "visual"), ("nl", "visual")]
    assert templates["en", "visual"].render("apple") == 'Rate seeing "apple" from 0 to 5.'
    assert templates["nl", "visual"].render("appel") == 'Hoe sterk zie je "appel"?'
    sets = PromptSets({"mine": tmp_path})
    assert sets.template("mine", "EN", "Foot_Leg").render("x") == "Rate the foot for x."
    assert sets.dimensions("mine", "en") == ["foot_leg", "visual"]
    assert sets.template("", "en", "visual") == default_template("en", "visual")
    with pytest.raises(NotFound, match="unknown prompt set 'other'; this service offers: mine"):
        sets.template("other", "en", "visual")
    with pytest.raises(NotFound, match="no nl template for 'auditory'"):
        sets.template("mine", "nl", "auditory")


def test_prompt_folder_refuses_what_it_cannot_place(tmp_path) -> None:
    from sensorium.prompts.sets import load_prompt_folder

    with pytest.raises(NotFound, match="does not exist"):
        load_prompt_folder(tmp_path / "none")
    with pytest.raises(InvalidArgument, match="holds no"):
        load_prompt_folder(tmp_path)
    (tmp_path / "smell_prompt.txt").write_text("{Word}", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="'smell' names no sensorimotor dimension"):
        load_prompt_folder(tmp_path)
    (tmp_path / "smell_prompt.txt").unlink()
    (tmp_path / "visual_prompt.txt").write_text("no placeholder", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="placeholder"):
        load_prompt_folder(tmp_path)
    (tmp_path / "visual_prompt.txt").write_text("{Word}", encoding="utf-8")
    (tmp_path / "en.yaml").write_text("language: en\nvisual: '{word}?'\n", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="a second en template for 'visual'"):
        load_prompt_folder(tmp_path)


def test_the_studys_prompt_files_load_as_one_set() -> None:
    from conftest import PAPER, need_shared
    from sensorium.prompts.sets import load_prompt_folder

    templates = load_prompt_folder(need_shared(PAPER / "prompts"))
    assert sum(lang == "en" for lang, _ in templates) == 11 and sum(lang == "nl" for lang, _ in templates) == 6
    text = templates["nl", "olfactory"].render("kaas")
    assert "native speaker of Dutch" in text and '"kaas"' in text and "{" not in text
