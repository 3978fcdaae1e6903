"""A model's ratings of words: the behavioural representation the study analysed.

Two scorings per (word, dimension), both kept:
- the expected rating from one forward pass: the next-token probabilities of the answers
  "0".."5", renormalised, weighted by their value; with the share of probability those six
  tokens hold (a base model may put most of its mass elsewhere);
- the greedy answer parsed as a number, as the study did; an answer with no number in range is
  reported as unparseable, never dropped.

All words of one template share the prompt up to the word. That prefix is run once and its
key/value cache reused for every batch; only the word and the short fixed suffix are computed
per word. Where a tokenizer merges across the prefix boundary for some word, that word is
computed in full instead, so the result never depends on the shortcut.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sensorium.errors import FailedPrecondition, InvalidArgument

ANSWERS = ("0", "1", "2", "3", "4", "5")
_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)")


def answer_token_ids(tokenizer: Any) -> list[int]:
    """The single token each answer "0".."5" is written with."""
    ids = []
    for answer in ANSWERS:
        tokens = tokenizer.encode(answer, add_special_tokens=False)
        if len(tokens) != 1:
            raise FailedPrecondition(f"the tokenizer writes the answer {answer!r} as {len(tokens)} tokens; "
                                     "expected ratings need one token per answer")
        ids.append(tokens[0])
    return ids


def parse_rating(text: str, low: float = 0.0, high: float = 5.0) -> float | None:
    """The first number in a generated answer, if it is a rating on the scale; else None."""
    match = _NUMBER.search(text)
    if not match:
        return None
    value = float(match.group(1))
    return value if low <= value <= high else None


@dataclass(frozen=True)
class Ratings:
    expected: np.ndarray  # per word, on 0..5
    mass: np.ndarray  # probability the six answer tokens hold together
    answers: list[str]  # greedy answers ("" when not generated)
    parsed: list[float | None]  # the greedy answer as a rating; None: unparseable
    prefix_reused: np.ndarray  # bool per word: computed through the shared prefix


def split_prompt(prompt: Callable[[str], str]) -> tuple[str, str]:
    sentinel = "\x00"
    text = prompt(sentinel)
    if text.count(sentinel) != 1:
        raise InvalidArgument("a rating prompt must contain the word exactly once")
    prefix, suffix = text.split(sentinel)
    return prefix, suffix


def _answer_distribution(logits: Any, answer_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    probs = torch.softmax(logits.float(), dim=-1)[:, answer_ids].cpu().numpy().astype(np.float64)
    mass = probs.sum(axis=1)
    expected = probs @ np.arange(len(answer_ids), dtype=np.float64) / mass
    return expected, mass


def _shared_head(tokenizer: Any, prefix: str, full: list[list[int]]) -> tuple[list[int], np.ndarray]:
    """The longest token prefix that the prompts of (nearly) all words start with.

    Byte-level tokenizers fold the space before the word into the word's first token
    ("Concept: apple" -> "Concept", ":", " apple"), so the text before the word may not be a
    token prefix; cutting it back to before the trailing whitespace, or to the last line
    break, usually is.
    """
    candidates = [prefix, prefix.rstrip(), prefix[: prefix.rfind("\n") + 1]]
    best: tuple[list[int], np.ndarray] = ([], np.zeros(len(full), bool))
    for text in dict.fromkeys(c for c in candidates if c):
        head = tokenizer(text, add_special_tokens=True)["input_ids"]
        ok = np.array([f[:len(head)] == head and len(f) > len(head) for f in full])
        if ok.mean() >= 0.9 and len(head) > len(best[0]):
            best = (head, ok)
    return best


def rate(model: Any, tokenizer: Any, words: Sequence[str], prompt: Callable[[str], str], batch_size: int = 32,
         max_new_tokens: int = 0, reuse_prefix: bool = True) -> Ratings:
    """Both scorings of ``words`` under one prompt (already chat-formatted if wanted).

    With ``max_new_tokens`` > 0 the greedy answer is decoded too, continuing from the same
    forward pass that gave the expected rating; 0 skips decoding (the expected rating alone).
    """
    import torch

    answer_ids = answer_token_ids(tokenizer)
    device = next(model.parameters()).device
    prefix, _ = split_prompt(prompt)
    full = [tokenizer(prompt(w), add_special_tokens=True)["input_ids"] for w in words]
    head, reusable = _shared_head(tokenizer, prefix, full) if reuse_prefix else ([], np.zeros(len(full), bool))
    expected = np.empty(len(words))
    mass = np.empty(len(words))
    answers = [""] * len(words)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    body, lm_head = model.base_model, model.get_output_embeddings()

    cache = None
    if reusable.any():
        with torch.inference_mode():
            cache = model(input_ids=torch.tensor([head], device=device), use_cache=True).past_key_values

    def run(rows: list[int], start: int) -> None:
        """Right-padded rows continuing after ``start`` cached tokens (0: no cache)."""
        seqs = [full[r][start:] for r in rows]
        n, length = len(rows), max(map(len, seqs))
        ids = torch.full((n, length), pad, dtype=torch.long)
        mask = torch.zeros((n, start + length), dtype=torch.long)
        mask[:, :start] = 1
        for i, seq in enumerate(seqs):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, start:start + len(seq)] = 1
        past = None
        if start:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(n)
        positions = torch.arange(start, start + length).expand(n, -1)
        lengths = torch.tensor([start + len(seq) for seq in seqs])  # real tokens so far, per row
        with torch.inference_mode():
            # the vocabulary projection only where an answer is read: the last real token of a row
            out = body(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       past_key_values=past, use_cache=max_new_tokens > 0 or bool(start))
            logits = lm_head(out.last_hidden_state[torch.arange(n), (lengths - start - 1).to(device)])
            e, m = _answer_distribution(logits, answer_ids)
            expected[rows], mass[rows] = e, m
            generated: list[list[int]] = [[] for _ in rows]
            done = torch.zeros(n, dtype=torch.bool)
            past = out.past_key_values
            for step in range(max_new_tokens):
                token = logits.argmax(-1).cpu()
                for i in range(n):
                    if not done[i]:
                        generated[i].append(int(token[i]))
                done |= token == eos if eos is not None else torch.zeros(n, dtype=torch.bool)
                if step == max_new_tokens - 1 or done.all():
                    break
                # the new token goes after each row's padding: masks keep the padding out of
                # attention, positions continue each row's own count
                mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
                out = body(input_ids=token[:, None].to(device), attention_mask=mask.to(device),
                           position_ids=lengths[:, None].to(device), past_key_values=past, use_cache=True)
                lengths += 1
                past, logits = out.past_key_values, lm_head(out.last_hidden_state[:, -1])
        for i, r in enumerate(rows):
            answers[r] = tokenizer.decode([t for t in generated[i] if t != eos], skip_special_tokens=True)

    order = np.argsort([len(f) for f in full], kind="stable")  # similar lengths batch together
    for flag, start in ((True, len(head)), (False, 0)):
        rows = [int(r) for r in order if reusable[r] == flag]
        for b in range(0, len(rows), batch_size):
            run(rows[b:b + batch_size], start)
    parsed = [parse_rating(a) if max_new_tokens else None for a in answers]
    return Ratings(expected, mass, answers, parsed, reusable)
