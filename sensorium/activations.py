"""Hidden states of words: every layer (or chosen ones) in one forward pass, pooled per word.

Pooling is where batched extraction silently goes wrong: with left padding the last token is at
the end of every row, with right padding it is not, and position ids must skip the padding or a
word's vector depends on the length of its batch-mates. Everything here is computed from the
attention mask, and the tests check that a word's vector does not depend on its batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from sensorium.errors import Cancelled, InvalidArgument

Pooling = Literal["last", "word-mean", "mean"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


def resolve_layers(requested: Sequence[int | float] | None, n_layers: int) -> list[int]:
    """Layer indices 0..n_layers, where 0 is the embedding output and n_layers the last block.

    Integers are indices (negative counts from the end); floats in [0, 1] are relative depths.
    """
    if not requested:
        return list(range(n_layers + 1))
    out: list[int] = []
    for item in requested:
        if isinstance(item, float):
            if not 0.0 <= item <= 1.0:
                raise InvalidArgument(f"relative depth {item} is outside [0, 1]")
            k = int(round(item * n_layers))
        else:
            k = int(item)
            if k < 0:
                k += n_layers + 1
        if not 0 <= k <= n_layers:
            raise InvalidArgument(f"layer {item} is out of range: the model has layers 0..{n_layers}")
        if k not in out:
            out.append(k)
    return out


@dataclass(frozen=True)
class Encoded:
    """A batch of texts, tokenised, with where each word's own tokens are."""

    input_ids: Any  # torch.LongTensor, batch x length
    attention_mask: Any
    word_spans: list[tuple[int, int]]  # token index range [start, stop) of the word in each row


def encode(tokenizer: Any, texts: list[str], char_spans: list[tuple[int, int]]) -> Encoded:
    """Tokenise with the tokenizer's padding side and find each word's tokens from char offsets."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, return_offsets_mapping=True,
                      add_special_tokens=True)
    offsets = batch.pop("offset_mapping").tolist()
    mask = batch["attention_mask"].tolist()
    spans: list[tuple[int, int]] = []
    for row, (a, b) in enumerate(char_spans):
        hits = [t for t, ((s, e), m) in enumerate(zip(offsets[row], mask[row])) if m and e > s and s < b and e > a]
        if not hits:
            raise InvalidArgument(f"could not locate the word in the tokens of {texts[row][:80]!r}")
        spans.append((hits[0], hits[-1] + 1))
    return Encoded(batch["input_ids"], batch["attention_mask"], spans)


def position_ids(attention_mask: Any) -> Any:
    """Positions that count real tokens only, so left padding does not shift them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def pool(hidden: Any, attention_mask: Any, spans: list[tuple[int, int]], pooling: Pooling) -> Any:
    """One vector per row of ``hidden`` (batch x length x width)."""
    import torch

    if pooling == "last":
        length = attention_mask.shape[1]
        # index of the last real token, whichever side the padding is on
        idx = (attention_mask * torch.arange(length, device=attention_mask.device)).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if pooling == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if pooling == "word-mean":
        return torch.stack([hidden[r, a:b].mean(0) for r, (a, b) in enumerate(spans)])
    raise InvalidArgument(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")


def texts_for(words: Sequence[str], render: Callable[[str], str] | None) -> tuple[list[str], list[tuple[int, int]]]:
    """The text fed to the model for each word and the word's character span in it."""
    texts, spans = [], []
    for word in words:
        if render is None:
            texts.append(word)
            spans.append((0, len(word)))
            continue
        sentinel = "\x00"
        shaped = render(sentinel)
        if shaped.count(sentinel) != 1:
            raise InvalidArgument("a template must place the word exactly once")
        start = shaped.index(sentinel)
        texts.append(shaped.replace(sentinel, word))
        spans.append((start, start + len(word)))
    return texts, spans


def iter_activations(model: Any, tokenizer: Any, words: Sequence[str], layers: list[int], pooling: Pooling,
                     render: Callable[[str], str] | None = None, batch_size: int = 64,
                     cancel: threading.Event | None = None) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
    """Yield ``(first word index, {layer: batch x width float32})`` batch by batch.

    One forward pass per batch serves every requested layer; the language-model head is skipped
    (``base_model``), since only hidden states are wanted. Once ``cancel`` is set, the next batch
    raises ``Cancelled`` instead of running (see ``sensorium.errors.Cancelled``).
    """
    import torch

    if pooling not in POOLINGS:
        raise InvalidArgument(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    body = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    for first in range(0, len(words), batch_size):
        Cancelled.check(cancel, first, len(words))
        chunk = list(words[first:first + batch_size])
        texts, spans = texts_for(chunk, render)
        enc = encode(tokenizer, texts, spans)
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        with torch.inference_mode():
            out = body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                       output_hidden_states=True, use_cache=False)
        yield first, {k: pool(out.hidden_states[k], mask, enc.word_spans, pooling).float().cpu().numpy()
                      for k in layers}
