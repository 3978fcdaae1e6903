"""From examples to a loss: tokens, the forward pass that reaches the scored positions, the objectives.

Every objective reads the same place the extractor reads a rating from: the next-token
distribution after the chat-formatted prompt. "text" trains the answer as written (the rating
with two decimals, or the option letter, then the end-of-turn token); "distribution" and
"regression" need no answer tokens at all and train that one distribution directly, so what is
optimised is exactly the expected rating that ``sensorium.ratings`` reports.

Two forward paths compute the same numbers:

- ``PlainForward`` runs the whole model on every sequence; it works for any causal LM.
- ``FrozenPrefixForward`` (Llama-style decoders) splits the work where it repeats. Blocks below
  the first adapted one never change, so their output for every sequence is computed once, in
  ``no_grad``, and kept. All prompts of one template share their tokens up to the word (the chat
  preamble and the instruction, ~90% of each sequence); those tokens are stored once per
  template rather than once per example, and the lower blocks see each example's own tokens
  only. During a step the adapted blocks run each distinct prefix once and let every row's own
  tokens attend to its keys and values, unless LoRA dropout is on: a prefix shared by several
  rows would then share one dropout mask, so rows are run whole to keep the plain path's noise.

Losses are returned as sums; the loop divides by the number of scored units (answer tokens for
"text", examples otherwise) of the whole optimizer batch, so the result does not depend on how a
batch is cut into micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sensorium.errors import FailedPrecondition
from sensorium.prompts import chat_prompt
from sensorium.ratings import ANSWERS

if TYPE_CHECKING:
    import torch

    from sensorium.training.data import Example

Objective = Literal["text", "distribution", "regression"]
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

# Decoders whose blocks are called as the Llama block is: (hidden, attention_mask, position_ids,
# past_key_values, position_embeddings) with rotary embeddings from ``model.rotary_emb``.
LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")


# ---- encoding --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """One example as tokens, and which positions of it are scored."""

    ids: tuple[int, ...]  # the chat-formatted prompt, then (objective "text") the answer
    prompt_len: int
    loss_from: int  # first scored position: its next-token distribution is compared with ids[loss_from + 1]
    n_scored: int  # scored positions: loss_from .. loss_from + n_scored - 1
    group: int  # which shared prompt prefix the example starts with
    prefix_len: int  # tokens of that prefix (always < prompt_len, so every row keeps a token of its own)
    example: Example

    @property
    def answer_offset(self) -> int:
        """Index, among the scored positions, of the one the answer is read from."""
        return self.prompt_len - 1 - self.loss_from


@dataclass(frozen=True)
class EncodedSet:
    items: list[Encoded]
    prefixes: list[tuple[int, ...]]  # per group


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for other in sequences[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return n


def encode(examples: Sequence[Example], tokenizer: Any, objective: Objective,
           whole_sequence_loss: bool = False) -> EncodedSet:
    """Tokens as the extractor builds them: ``tokenizer(chat_prompt(prompt), add_special_tokens=True)``.

    The answer is tokenised on its own and appended, which is what the model sees when it
    generates it after the prompt. Examples of one dimension (one template) form a group whose
    longest common token prefix is shared by the frozen-prefix path.
    """
    if not examples:
        return EncodedSet([], [])
    texts = [chat_prompt(e.prompt, tokenizer) for e in examples]
    prompts = tokenizer(texts, add_special_tokens=True)["input_ids"]
    answers: list[list[int]] = [[] for _ in examples]
    if objective == "text":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise FailedPrecondition("objective 'text' needs the tokenizer's end-of-turn (eos) token")
        targets = tokenizer([e.target for e in examples], add_special_tokens=False)["input_ids"]
        answers = [[*t, eos] for t in targets]
    keys: dict[Any, list[int]] = {}
    for i, e in enumerate(examples):
        keys.setdefault(e.dimension, []).append(i)
    group_of = [0] * len(examples)
    prefixes: list[tuple[int, ...]] = []
    for members in keys.values():
        seqs = [prompts[i] for i in members]
        length = min(_common_prefix(seqs), min(len(s) for s in seqs) - 1)
        for i in members:
            group_of[i] = len(prefixes)
        prefixes.append(tuple(seqs[0][:max(length, 0)]))
    items = []
    for i, e in enumerate(examples):
        prompt, answer = prompts[i], answers[i]
        if not prompt:
            raise FailedPrecondition(f"example {e.key!r}: the prompt encodes to no tokens")
        ids = (*prompt, *answer)
        if objective == "text":
            loss_from = 0 if whole_sequence_loss else len(prompt) - 1
            n_scored = len(ids) - 1 - loss_from
        else:
            loss_from, n_scored = len(prompt) - 1, 1
        items.append(Encoded(ids=ids, prompt_len=len(prompt), loss_from=loss_from, n_scored=n_scored,
                             group=group_of[i], prefix_len=len(prefixes[group_of[i]]), example=e))
    return EncodedSet(items, prefixes)


# ---- objectives ------------------------------------------------------------------------------
def soft_rating_targets(ratings: torch.Tensor, n_answers: int = len(ANSWERS)) -> torch.Tensor:
    """Probabilities over the answers 0..n-1 whose expected value is the rating.

    The mass sits on the two neighbouring integers (all of it on one for a whole rating), the
    least spread distribution with that mean: p(ceil) = r - floor(r).
    """
    import torch

    r = ratings.clamp(0, n_answers - 1).to(torch.float32)
    low = r.floor().clamp(max=n_answers - 2)
    upper = r - low
    targets = torch.zeros((len(r), n_answers), dtype=torch.float32, device=r.device)
    rows = torch.arange(len(r), device=r.device)
    targets[rows, low.long()] = 1 - upper
    targets[rows, low.long() + 1] = upper
    return targets


def expected_rating(logits: torch.Tensor, answer_ids: Sequence[int]) -> torch.Tensor:
    """The extractor's readout: answer probabilities renormalised over the six answers, by value."""
    import torch

    probs = torch.softmax(logits.float()[:, list(answer_ids)], dim=-1)
    return probs @ torch.arange(len(answer_ids), dtype=probs.dtype, device=probs.device)


def answer_mass(logits: torch.Tensor, answer_ids: Sequence[int]) -> torch.Tensor:
    """Share of the full next-token distribution the answers hold together."""
    import torch

    return torch.softmax(logits.float(), dim=-1)[:, list(answer_ids)].sum(dim=-1)


def text_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the next tokens."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), targets, reduction="sum")


def distribution_loss(logits: torch.Tensor, ratings: torch.Tensor, answer_ids: Sequence[int]) -> torch.Tensor:
    """Summed cross-entropy against soft targets, over the full vocabulary.

    Taking the softmax over the whole vocabulary (not the six answers) also pushes mass onto the
    answers, which a base model mostly spends elsewhere.
    """
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=-1)[:, list(answer_ids)]
    return -(soft_rating_targets(ratings, len(answer_ids)) * log_probs).sum()


def regression_loss(logits: torch.Tensor, ratings: torch.Tensor, answer_ids: Sequence[int]) -> torch.Tensor:
    """Summed squared error of the expected rating."""
    return ((expected_rating(logits, answer_ids) - ratings.float()) ** 2).sum()


# ---- forward paths ---------------------------------------------------------------------------
class Forward(Protocol):
    """Final-norm hidden states at the scored positions of some rows, in row order."""

    model: Any
    data: EncodedSet

    def hidden(self, rows: Sequence[int], *, share_prefix: bool) -> torch.Tensor: ...


def _scored_index(items: Sequence[Encoded], starts: Sequence[int]) -> tuple[list[int], list[int]]:
    rows: list[int] = []
    cols: list[int] = []
    for i, (item, start) in enumerate(zip(items, starts, strict=True)):
        rows += [i] * item.n_scored
        cols += range(start, start + item.n_scored)
    return rows, cols


class PlainForward:
    """The whole model on right-padded sequences: any causal LM with ``base_model`` and an output head."""

    def __init__(self, model: Any, data: EncodedSet, pad_id: int) -> None:
        self.model = model
        self.data = data
        self.pad_id = pad_id

    def hidden(self, rows: Sequence[int], *, share_prefix: bool = False) -> torch.Tensor:
        import torch

        items = [self.data.items[r] for r in rows]
        length = max(len(it.ids) for it in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, :len(it.ids)] = torch.tensor(it.ids)
            mask[i, :len(it.ids)] = 1
        device = self.model.get_output_embeddings().weight.device
        out = self.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        r, c = _scored_index(items, [it.loss_from for it in items])
        return out.last_hidden_state[r, c]


class _PrefixKV:
    """Stands in for a transformers cache in the blocks' attention.

    First it records each layer's keys and values of the shared prefixes; once ``rows`` is set,
    it puts each row's prefix (``rows`` indexes the recorded prefixes) in front of the row's own
    keys and values. Autograd flows through both, so adapted blocks train on the prefix too.
    """

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if self.rows is None:
            self.layers[layer_idx] = (key, value)
            return key, value
        k, v = self.layers[layer_idx]
        return torch.cat((k[self.rows], key), dim=2), torch.cat((v[self.rows], value), dim=2)


def frozen_prefix_support(model: Any) -> str | None:
    """None when ``FrozenPrefixForward`` can run this model's blocks itself; else the reason it cannot."""
    config = model.config
    kind = getattr(config, "model_type", "?")
    if kind not in LLAMA_STYLE:
        return f"model type {kind!r} is not a Llama-style decoder ({', '.join(LLAMA_STYLE)})"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "the model has sliding-window attention layers"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    body = model.base_model
    missing = [a for a in ("embed_tokens", "layers", "rotary_emb", "norm") if not hasattr(body, a)]
    if missing:
        return f"the model body has no {', '.join(missing)}"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (sdpa or eager only)"
    return None


class FrozenPrefixForward:
    """Adapted blocks only, on block inputs computed once; see the module docstring.

    ``first_adapted`` is the index of the lowest block with an adapter (0: every block; the cache
    then holds the token embeddings). The cache lives on the model's device in its dtype.
    """

    def __init__(self, model: Any, data: EncodedSet, first_adapted: int, *, batch_size: int = 32) -> None:
        reason = frozen_prefix_support(model)
        if reason:
            raise FailedPrecondition(f"frozen-prefix reuse: {reason}")
        self.model = model
        self.data = data
        self.body = model.base_model
        self.first = first_adapted
        self.lower = list(self.body.layers[:first_adapted])
        self.upper = list(self.body.layers[first_adapted:])
        self.impl = model.config._attn_implementation
        weight = model.get_output_embeddings().weight
        self.device, self.dtype = weight.device, self.body.embed_tokens.weight.dtype
        self.prefix_states: list[torch.Tensor] = []
        self.suffix_states: list[torch.Tensor] = [None] * len(data.items)  # type: ignore[list-item]
        self._precompute(batch_size)

    @property
    def cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.prefix_states, *self.suffix_states))

    # -- running blocks -------------------------------------------------------------------------
    def _mask(self, query_lens: torch.Tensor, prefix_lens: torch.Tensor, prefix_slots: int,
              length: int) -> torch.Tensor:
        """Row b, query i may see prefix slots below prefix_lens[b] and its own tokens up to i.

        Padded queries (i >= query_lens[b]) see the row's real tokens, never nothing: a query
        with no key at all would turn into NaN and spread through the values that reach it.
        """
        import torch

        q = torch.arange(length, device=self.device)
        own = (q[None, :, None] >= q[None, None, :]) & (q[None, None, :] < query_lens[:, None, None])
        slots = torch.arange(prefix_slots, device=self.device)
        prefix = (slots[None, None, :] < prefix_lens[:, None, None]).expand(-1, length, -1)
        allowed = torch.cat((prefix, own), dim=2)[:, None]
        if self.impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min)

    def _run(self, blocks: Sequence[Any], hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             kv: _PrefixKV | None) -> torch.Tensor:
        if not blocks:
            return hidden
        embeddings = self.body.rotary_emb(hidden, position_ids=positions)
        for block in blocks:
            out = block(hidden, attention_mask=mask, position_ids=positions, past_key_values=kv, use_cache=False,
                        position_embeddings=embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _padded(self, states: Sequence[torch.Tensor], length: int) -> torch.Tensor:
        import torch

        out = torch.zeros((len(states), length, states[0].shape[-1]), dtype=self.dtype, device=self.device)
        for i, s in enumerate(states):
            out[i, :len(s)] = s
        return out

    def _prefix_pass(self, blocks: Sequence[Any], states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, _PrefixKV]:
        """Right-padded prefixes through ``blocks``, recording their keys and values."""
        import torch

        lens = torch.tensor([len(s) for s in states], device=self.device)
        slots = int(lens.max())
        kv = _PrefixKV()
        positions = torch.arange(slots, device=self.device).expand(len(states), -1)
        # an empty prefix still runs one (zero, never attended) slot, so that no query is left keyless
        mask = self._mask(lens.clamp(min=1), lens.new_zeros(len(states)), 0, slots)
        return self._run(blocks, self._padded(states, slots), positions, mask, kv), kv

    def _precompute(self, batch_size: int) -> None:
        import torch

        items = self.data.items
        embed = self.body.embed_tokens
        with torch.no_grad():
            for g, prefix in enumerate(self.data.prefixes):
                kv: _PrefixKV | None = None
                if prefix:
                    h = embed(torch.tensor([prefix], device=self.device))
                    out, kv = self._prefix_pass(self.lower, [h[0]])
                    self.prefix_states.append(out[0].detach())
                    kv.rows = torch.zeros(1, dtype=torch.long, device=self.device)
                else:
                    self.prefix_states.append(torch.zeros((0, embed.weight.shape[1]), dtype=self.dtype,
                                                          device=self.device))
                members = sorted((i for i, it in enumerate(items) if it.group == g),
                                 key=lambda i: len(items[i].ids))
                p = len(prefix)
                for b in range(0, len(members), batch_size):
                    rows = members[b:b + batch_size]
                    seqs = [items[r].ids[p:] for r in rows]
                    length = max(map(len, seqs))
                    ids = torch.zeros((len(rows), length), dtype=torch.long)
                    for i, s in enumerate(seqs):
                        ids[i, :len(s)] = torch.tensor(s)
                    lens = torch.tensor([len(s) for s in seqs], device=self.device)
                    positions = p + torch.arange(length, device=self.device).expand(len(rows), -1)
                    mask = self._mask(lens, torch.full_like(lens, p), p, length)
                    if kv is not None:
                        kv.rows = torch.zeros(len(rows), dtype=torch.long, device=self.device)
                    h = self._run(self.lower, embed(ids.to(self.device)), positions, mask, kv)
                    for i, r in enumerate(rows):
                        self.suffix_states[r] = h[i, :len(seqs[i])].detach().clone()

    # -- the adapted blocks -----------------------------------------------------------------------
    def hidden(self, rows: Sequence[int], *, share_prefix: bool) -> torch.Tensor:
        import torch

        items = [self.data.items[r] for r in rows]
        share = share_prefix and all(it.loss_from >= it.prefix_len for it in items)
        n = len(items)
        if share:
            groups = sorted({it.group for it in items})
            kv: _PrefixKV | None = None
            slots = 0
            if any(self.prefix_states[g].shape[0] for g in groups):
                _, kv = self._prefix_pass(self.upper, [self.prefix_states[g] for g in groups])
                kv.rows = torch.tensor([groups.index(it.group) for it in items], device=self.device)
                slots = max(self.prefix_states[g].shape[0] for g in groups)
            states = [self.suffix_states[r] for r in rows]
            starts = [it.prefix_len for it in items]
        else:
            kv, slots = None, 0
            states = [torch.cat((self.prefix_states[it.group], self.suffix_states[r])) for it, r in zip(items, rows)]
            starts = [0] * n
        lens = torch.tensor([len(s) for s in states], device=self.device)
        length = int(lens.max())
        begin = torch.tensor(starts, device=self.device)
        positions = begin[:, None] + torch.arange(length, device=self.device)[None, :]
        mask = self._mask(lens, begin if slots else begin.new_zeros(n), slots, length)
        h = self._run(self.upper, self._padded(states, length), positions, mask, kv)
        r, c = _scored_index(items, [it.loss_from - s for it, s in zip(items, starts, strict=True)])
        return self.body.norm(h[r, c])


# ---- a batch's loss --------------------------------------------------------------------------
@dataclass
class BatchLoss:
    loss: torch.Tensor  # summed over the batch's scored units
    answer_logits: torch.Tensor  # (rows, vocab): the next-token logits where the answer is read


def scored_units(items: Sequence[Encoded], objective: Objective) -> int:
    """What a loss sum is divided by: answer tokens for "text", examples otherwise."""
    return sum(it.n_scored for it in items) if objective == "text" else len(items)


def batch_loss(forward: Forward, rows: Sequence[int], objective: Objective, answer_ids: Sequence[int], *,
               share_prefix: bool = True) -> BatchLoss:
    """Summed loss of ``rows`` under ``objective``; the output head runs at the scored positions only."""
    import torch

    items = [forward.data.items[r] for r in rows]
    head = forward.model.get_output_embeddings()
    logits = head(forward.hidden(rows, share_prefix=share_prefix))
    device = logits.device
    if objective == "text":
        targets = torch.tensor([t for it in items for t in it.ids[it.loss_from + 1:it.loss_from + 1 + it.n_scored]],
                               device=device)
        starts = [0, *accumulate(it.n_scored for it in items[:-1])]
        answer = logits[[s + it.answer_offset for s, it in zip(starts, items, strict=True)]]
        return BatchLoss(text_loss(logits, targets), answer)
    ratings = torch.tensor([float(it.example.rating) for it in items], device=device)  # type: ignore[arg-type]
    if objective == "distribution":
        return BatchLoss(distribution_loss(logits, ratings, answer_ids), logits)
    if objective == "regression":
        return BatchLoss(regression_loss(logits, ratings, answer_ids), logits)
    raise ValueError(f"unknown objective {objective!r}")


def letter_token_ids(tokenizer: Any, letters: Sequence[str] = LETTERS) -> list[int]:
    """The single token each option letter is written with, as the first answer token."""
    ids = []
    for letter in letters:
        tokens = tokenizer.encode(letter, add_special_tokens=False)
        if len(tokens) != 1:
            raise FailedPrecondition(f"the tokenizer writes the option letter {letter!r} as {len(tokens)} tokens")
        ids.append(tokens[0])
    return ids
