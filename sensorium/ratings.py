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
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sensorium.errors import Cancelled, FailedPrecondition, InvalidArgument

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
    if not full:
        return best
    for text in dict.fromkeys(c for c in candidates if c):
        head = tokenizer(text, add_special_tokens=True)["input_ids"]
        ok = np.array([f[:len(head)] == head and len(f) > len(head) for f in full])
        if ok.mean() >= 0.9 and len(head) > len(best[0]):
            best = (head, ok)
    return best


class _Batch(Protocol):
    """One batch of right-padded prompts being answered, whichever way the model is run."""

    def first(self) -> Any:
        """The next-token logits [rows, vocab] at each row's last real prompt token."""

    def next(self, token: Any) -> Any:
        """Append one token per row ([rows] on the model's device); the logits after it."""


class _HFBatch:
    """Any causal LM through its own forward: the prefix's cache copied for every row.

    The fallback for architectures the shared-prefix path does not know. The new token of a
    decode step goes after each row's padding; masks keep the padding out of attention, and
    positions continue each row's own count.
    """

    def __init__(self, model: Any, seqs: list[list[int]], prefix_cache: Any, start: int, pad: int, device: Any) -> None:
        import torch

        n, length = len(seqs), max(map(len, seqs))
        self.body, self.lm_head, self.device = model.base_model, model.get_output_embeddings(), device
        self.ids = torch.full((n, length), pad, dtype=torch.long)
        self.mask = torch.zeros((n, start + length), dtype=torch.long)
        self.mask[:, :start] = 1
        for i, seq in enumerate(seqs):
            self.ids[i, :len(seq)] = torch.tensor(seq)
            self.mask[i, start:start + len(seq)] = 1
        self.past = None
        if start:
            self.past = copy.deepcopy(prefix_cache)
            self.past.batch_repeat_interleave(n)
        self.positions = torch.arange(start, start + length).expand(n, -1)
        self.lengths = torch.tensor([start + len(seq) for seq in seqs])  # real tokens so far, per row
        self.start = start

    def first(self) -> Any:
        import torch

        n = len(self.lengths)
        out = self.body(input_ids=self.ids.to(self.device), attention_mask=self.mask.to(self.device),
                        position_ids=self.positions.to(self.device), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        # the vocabulary projection only where an answer is read: the last real token of a row
        last = (self.lengths - self.start - 1).to(self.device)
        return self.lm_head(out.last_hidden_state[torch.arange(n, device=self.device), last])

    def next(self, token: Any) -> Any:
        import torch

        self.mask = torch.cat([self.mask, torch.ones((len(self.lengths), 1), dtype=torch.long)], dim=1)
        out = self.body(input_ids=token[:, None], attention_mask=self.mask.to(self.device),
                        position_ids=self.lengths[:, None].to(self.device), past_key_values=self.past,
                        use_cache=True)
        self.lengths += 1
        self.past = out.past_key_values
        return self.lm_head(out.last_hidden_state[:, -1])


class _SharedPrefixModel:
    """A Llama-family decoder run layer by layer from its own modules, for rating many prompts.

    Why not the model's forward: its key/value cache holds one copy of the shared prompt prefix
    per row, deep-copied for every batch and concatenated again at every decode step; a padded
    batch spends its matrix products on padding; and the last layer is computed for every token
    though only each row's last one is read. Here the prefix's keys and values are stored once,
    without a batch dimension, and attended by one matrix product per key/value head for all rows
    together; a batch's own tokens are packed without padding for the projections and MLPs
    (nearly all the work) and laid out padded only for attention; the rows' keys and values go
    into buffers allocated once per batch with room for the decode steps.

    The arithmetic is the model's own: its projections, norms, MLPs and rotary embedding are
    called as modules (so an adapter injected into them applies); only the order of floating
    point sums in attention differs, as it does between any two batchings. Used only for the
    architectures whose decoder layer is exactly: pre-norm attention with rotary embedding and
    grouped key/value heads over the full context, then a pre-norm MLP, both residual.
    """

    FAMILIES = frozenset({"llama", "mistral", "qwen2"})

    @classmethod
    def fits(cls, model: Any) -> bool:
        config = getattr(model, "config", None)
        body = getattr(model, "base_model", None)
        if getattr(config, "model_type", None) not in cls.FAMILIES or body is None:
            return False
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            return False  # a window hides part of a long context; the model's own forward handles it
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
            return False
        if not all(hasattr(body, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return False
        if model.get_output_embeddings() is None:
            return False
        attn = body.layers[0].self_attn
        return all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))

    def __init__(self, model: Any) -> None:
        body, config = model.base_model, model.config
        self.layers = list(body.layers)
        self.embed, self.norm, self.rotary = body.embed_tokens, body.norm, body.rotary_emb
        self.lm_head = model.get_output_embeddings()
        attn = self.layers[0].self_attn
        self.heads, self.kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        self.group, self.head_dim, self.scaling = self.heads // self.kv_heads, int(attn.head_dim), float(attn.scaling)
        self.device = next(model.parameters()).device
        mlp = self.layers[0].mlp
        self.silu_gated = getattr(config, "hidden_act", None) == "silu" and \
            all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))

    def mlp(self, layer: Any, h: Any) -> Any:
        """The layer's MLP; a SiLU-gated one with its activation and product in place (same arithmetic)."""
        import torch.nn.functional as F

        if not self.silu_gated:
            return layer.mlp(h)
        mlp = layer.mlp
        return mlp.down_proj(F.silu(mlp.gate_proj(h), inplace=True).mul_(mlp.up_proj(h)))

    def prefix(self, ids: list[int]) -> _Prefix:
        """Keys and values of the shared prompt prefix, one copy: [kv_heads, length, head_dim] per layer."""
        batch = _SharedPrefixBatch(self, [ids], None)
        batch.prompt(read=False)
        return _Prefix([k[:, 0] for k in batch.keys], [v[:, 0] for v in batch.values])

    def attend(self, q: Any, prefix: _Prefix | None, layer: int, keys: Any, values: Any, blocked: Any) -> Any:
        """Attention of queries q [kv_heads, rows, group*queries, head_dim], already scaled.

        Over the shared prefix, which every query sees whole, and over the rows' own keys and
        values [kv_heads, rows, columns, head_dim], of which ``blocked`` [rows, queries, columns]
        hides the padding and the future.
        """
        import torch

        kvh, n, m, d = q.shape
        own = torch.matmul(q, keys.transpose(2, 3))  # [kvh, n, m, columns]
        own.view(kvh, n, self.group, -1, own.shape[-1]).masked_fill_(blocked[None, :, None], float("-inf"))
        if prefix is None:
            return torch.matmul(torch.softmax(own, dim=-1, dtype=torch.float32).to(q.dtype), values)
        pk, pv = prefix.keys[layer], prefix.values[layer]
        p = pk.shape[1]
        shared = torch.matmul(q.reshape(kvh, n * m, d), pk.transpose(1, 2)).view(kvh, n, m, p)
        weights = torch.softmax(torch.cat([shared, own], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights[..., p:], values)
        out += torch.matmul(weights[..., :p].reshape(kvh, n * m, p), pv).view(kvh, n, m, d)
        return out


@dataclass(frozen=True)
class _Prefix:
    keys: list[Any]  # per layer [kv_heads, length, head_dim], rotary applied
    values: list[Any]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0


def _rotate_half(x: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _SharedPrefixBatch:
    """Rows continuing after a shared prefix (or from nothing), answered together.

    Column j of a row's key/value buffer holds its j-th own token: the prompt's remaining tokens
    first (a gap after the shorter ones), then one decoded token per step, written at the same
    column for all rows. A row attends to its real prompt tokens and its decoded ones, and its
    positions continue its own count, so the gap changes nothing.
    """

    def __init__(self, model: _SharedPrefixModel, seqs: list[list[int]], prefix: _Prefix | None,
                 max_new_tokens: int = 0) -> None:
        import torch

        self.model, self.prefix = model, prefix
        self.start = prefix.length if prefix is not None else 0
        device = model.device
        n, width = len(seqs), max(map(len, seqs))
        self.width = width
        self.lengths = torch.tensor([len(s) for s in seqs], device=device)  # own real tokens, per row
        # the prompt tokens packed row after row, and each one's row and column
        self.ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)
        self.row = torch.repeat_interleave(torch.arange(n, device=device), self.lengths)
        self.col = torch.arange(len(self.ids), device=device) - (torch.cumsum(self.lengths, 0) - self.lengths)[self.row]
        self.padded = bool((self.lengths < width).any())
        columns = width + max(max_new_tokens - 1, 0)
        self.visible = torch.arange(columns, device=device)[None, :] < self.lengths[:, None]  # [n, columns]
        dtype = model.embed.weight.dtype
        shape = (model.kv_heads, n, columns, model.head_dim)
        # zeros, not empty: a masked-out slot still enters the products (weight 0 x value), and
        # uninitialised memory that happens to hold NaN or inf would turn 0 x value into NaN
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.filled = 0  # columns written

    def _forward(self, ids: Any, positions: Any, width: int, packed: bool, blocked: Any, keep: Any) -> Any:
        """Run tokens through the layers, writing their keys and values at the next ``width`` columns.

        ``ids`` and ``positions`` [tokens] are packed row after row: with ``packed``, by
        ``self.row``/``self.col``, else every row has ``width`` tokens. Returns the hidden states
        (before the final norm) of the tokens indexed by ``keep``; None: none wanted, the keys and
        values are the point, and the last layer stops at them.
        """
        m = self.model
        t, n = ids.shape[0], self.lengths.shape[0]
        kvh, g, d = m.kv_heads, m.group, m.head_dim
        c0 = self.filled
        x = m.embed(ids)
        cos, sin = m.rotary(x[None], positions[None])
        cos, sin = cos[0, :, None], sin[0, :, None]  # [tokens, 1, head_dim]: the same for every head
        for i, layer in enumerate(m.layers):
            last = i == len(m.layers) - 1
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(t, m.heads, d)
            k = attn.k_proj(h).view(t, kvh, d)
            v = attn.v_proj(h).view(t, kvh, d)
            q = (q * cos + _rotate_half(q) * sin) * m.scaling
            k = k * cos + _rotate_half(k) * sin
            keys, values = self.keys[i], self.values[i]
            if packed:
                keys[:, self.row, c0 + self.col] = k.transpose(0, 1)
                values[:, self.row, c0 + self.col] = v.transpose(0, 1)
                # query heads sharing a key/value head become one block: [kv_heads, n, group, width, head_dim]
                q_rows = q.new_zeros((kvh, n, g, width, d))
                q_rows[:, self.row, :, self.col] = q.view(t, kvh, g, d)
            else:
                keys[:, :, c0:c0 + width] = k.view(n, width, kvh, d).permute(2, 0, 1, 3)
                values[:, :, c0:c0 + width] = v.view(n, width, kvh, d).permute(2, 0, 1, 3)
                q_rows = q.view(n, width, kvh, g, d).permute(2, 0, 3, 1, 4)
            if last and keep is None:
                break
            o = m.attend(q_rows.reshape(kvh, n, g * width, d), self.prefix, i, keys[:, :, :c0 + width],
                         values[:, :, :c0 + width], blocked).view(kvh, n, g, width, d)
            o = o[:, self.row, :, self.col] if packed else o.permute(1, 3, 0, 2, 4)
            o = o.reshape(t, m.heads * d)
            if last:  # only the tokens read need the rest of the last layer
                o, x = o[keep], x[keep]
            x = x + attn.o_proj(o)
            x = x + m.mlp(layer, layer.post_attention_layernorm(x))
        self.filled = c0 + width
        return x if keep is not None else None

    def prompt(self, read: bool = True) -> Any:
        """Run the prompt tokens; with ``read``, the hidden state at each row's last one."""
        import torch

        own = torch.arange(self.width, device=self.ids.device)
        causal = own[None, :] <= own[:, None]  # [queries, columns]
        blocked = ~(causal[None] & self.visible[:, None, :self.width])
        keep = torch.cumsum(self.lengths, 0) - 1 if read else None
        return self._forward(self.ids, self.start + self.col, self.width, self.padded, blocked, keep)

    def first(self) -> Any:
        return self.model.lm_head(self.model.norm(self.prompt()))

    def next(self, token: Any) -> Any:
        import torch

        col = self.filled
        self.visible[:, col] = True
        positions = self.start + self.lengths
        self.lengths = self.lengths + 1
        every = torch.arange(len(token), device=token.device)
        hidden = self._forward(token, positions, 1, False, ~self.visible[:, None, :col + 1], every)
        return self.model.lm_head(self.model.norm(hidden))


def rate(model: Any, tokenizer: Any, words: Sequence[str], prompt: Callable[[str], str], batch_size: int = 32,
         max_new_tokens: int = 0, reuse_prefix: bool = True, shared_prefix_path: bool | None = None,
         cancel: threading.Event | None = None) -> Ratings:
    """Both scorings of ``words`` under one prompt (already chat-formatted if wanted).

    With ``max_new_tokens`` > 0 the greedy answer is decoded too, continuing from the same
    forward pass that gave the expected rating; 0 skips decoding (the expected rating alone).
    ``shared_prefix_path`` chooses how the model is run: None uses the layer-by-layer path
    where the architecture fits it, False always the model's own forward (for comparison).
    Once ``cancel`` is set, the next batch raises ``Cancelled`` instead of running.
    """
    import torch

    answer_ids = answer_token_ids(tokenizer)
    device = next(model.parameters()).device
    prefix, _ = split_prompt(prompt)
    full = []
    for i, w in enumerate(words):  # tens of thousands of prompts take seconds: stoppable too
        if i % batch_size == 0:
            Cancelled.check(cancel, 0, len(words))
        full.append(tokenizer(prompt(w), add_special_tokens=True)["input_ids"])
    head, reusable = _shared_head(tokenizer, prefix, full) if reuse_prefix else ([], np.zeros(len(full), bool))
    expected = np.empty(len(words))
    mass = np.empty(len(words))
    answers = [""] * len(words)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    lean = _SharedPrefixModel(model) if shared_prefix_path is not False and _SharedPrefixModel.fits(model) else None
    if shared_prefix_path and lean is None:
        raise FailedPrecondition(f"the shared-prefix path does not support {type(model).__name__}")

    with torch.inference_mode():
        shared: Any = None
        if reusable.any():
            shared = lean.prefix(head) if lean is not None else \
                model(input_ids=torch.tensor([head], device=device), use_cache=True).past_key_values

        def run(rows: list[int], start: int) -> None:
            """Rows continuing after ``start`` shared tokens (0: computed in full)."""
            seqs = [full[r][start:] for r in rows]
            batch: _Batch
            if lean is not None:
                batch = _SharedPrefixBatch(lean, seqs, shared if start else None, max_new_tokens)
            else:
                batch = _HFBatch(model, seqs, shared, start, pad, device)
            logits = batch.first()
            expected[rows], mass[rows] = _answer_distribution(logits, answer_ids)
            generated: list[list[int]] = [[] for _ in rows]
            done = torch.zeros(len(rows), dtype=torch.bool)
            for step in range(max_new_tokens):
                token = logits.argmax(-1)
                token_cpu = token.cpu()
                for i, (t, finished) in enumerate(zip(token_cpu.tolist(), done.tolist())):
                    if not finished:
                        generated[i].append(t)
                if eos is not None:
                    done |= token_cpu == eos
                if step == max_new_tokens - 1 or done.all():
                    break
                logits = batch.next(token)
            for i, r in enumerate(rows):
                answers[r] = tokenizer.decode([t for t in generated[i] if t != eos], skip_special_tokens=True)

        order = np.argsort([len(f) for f in full], kind="stable")  # similar lengths batch together
        done = 0
        for flag, start in ((True, len(head)), (False, 0)):
            rows = [int(r) for r in order if reusable[r] == flag]
            for b in range(0, len(rows), batch_size):
                Cancelled.check(cancel, done, len(words))
                run(rows[b:b + batch_size], start)
                done += len(rows[b:b + batch_size])
    parsed = [parse_rating(a) if max_new_tokens else None for a in answers]
    return Ratings(expected, mass, answers, parsed, reusable)
