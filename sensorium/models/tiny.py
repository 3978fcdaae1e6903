"""A tiny random causal LM, built in code, for tests and offline demos.

Service tests need a model that loads through exactly the same path as a real one (a local
Hugging Face directory of safetensors weights, a fast tokenizer with a chat template) but that
exists without a network, builds in well under a second and is byte-identical for a seed, so a
digest or a cached result can be asserted on. Its outputs are meaningless; its shapes are real.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sensorium.errors import InvalidArgument

BOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, IM_START, IM_END, PAD)
DIGITS = tuple(str(d) for d in range(6))

# ChatML, as SmolLM2 uses, so prompt code written against the tiny model fits the default one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Words a rating prompt uses and words a norms table holds, so that common prompt words are one
# token and rarer ones are split: the multi-token path matters as much as the single-token one.
WORDS: tuple[str, ...] = tuple(
    """
    the a an of and or to in on is are was it this that you your i we they how much what which
    do does did not no yes very some any all one word words rate rating scale from with by as
    for at be have has experience experienced sense senses perceive feel feeling
    see seeing sight hear hearing sound taste tasting smell smelling touch touching
    body inside action actions perform performing using hand hands arm arms foot feet leg legs
    head mouth throat face torso user assistant system answer number only please
    apple banana bread butter cheese coffee honey lemon milk salt sugar tea water wine
    music bell drum song voice noise loud quiet silent bright dark red blue green yellow
    soft hard rough smooth sharp cold hot warm wet dry sweet sour bitter salty fresh
    run walk jump kick throw catch grab hold write read speak shout sing eat drink chew
    dog cat bird horse fish tree flower grass stone fire rain snow wind sun moon
    pain hunger thirst tired happy sad angry calm fear love idea truth justice
    """.split()
)


def _tokenizer(words: Sequence[str]):
    """Byte-level BPE trained on the word list: every string encodes, digits stay single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Digits one at a time before the byte-level split, as in SmolLM2: a rating is one token.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Each word at the start of a line and after a space, so both spellings get merged.
    corpus = [" ".join(words), *words, *(f"{w} {DIGITS[i % len(DIGITS)]}" for i, w in enumerate(words))]
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    vocab_words: Sequence[str] | None = None,
    n_layers: int = 2,
    hidden: int = 32,
) -> Path:
    """Write a random Llama causal LM and its tokenizer to ``path``; same seed, same bytes."""
    if n_layers < 1:
        raise InvalidArgument(f"n_layers must be at least 1, got {n_layers}")
    if hidden < 8 or hidden % 4:
        raise InvalidArgument(f"hidden must be a multiple of 4 and at least 8, got {hidden}")
    words = list(WORDS if vocab_words is None else vocab_words)
    if not words or any(not w or w.isspace() for w in words):
        raise InvalidArgument("vocab_words must be a non-empty list of non-blank words")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer(words),
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="left",
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    # A private generator state: building a test model must not shift anyone else's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
