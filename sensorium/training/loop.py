"""One fine-tuning run: LoRA on a local model, from a spec and its data to an adapter folder.

The recipe is the spec. The seed is set before the adapter is created and the data order of
every epoch is a function of (seed, epoch) alone, so a run is reproducible bit for bit and a
resumed run replays exactly what the uninterrupted one would have done: the checkpoint brings
back the adapter, the optimizer and scheduler, every random generator and the step, and the
step alone says where in which epoch's order training stands.

The adapter is injected in place through transformers' peft integration, so the model stays a
plain transformers model: ``sensorium.ratings.rate`` scores it during validation exactly as the
extractor will score the published adapter.

Speed (see ``objectives``): when only the top blocks are adapted, the frozen blocks below run
once per sequence rather than once per step, and the tokens all prompts of a template share are
stored once; the output head runs only where a loss or a rating is read.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sensorium.errors import FailedPrecondition, InvalidArgument
from sensorium.training import checkpoint as ckpt
from sensorium.training.data import Example, TrainingData
from sensorium.training.execute import total_steps
from sensorium.training.objectives import (
    EncodedSet,
    Forward,
    FrozenPrefixForward,
    PlainForward,
    answer_mass,
    batch_loss,
    encode,
    expected_rating,
    frozen_prefix_support,
    letter_token_ids,
    scored_units,
)
from sensorium.training.spec import LoraSpec, TrainingSpec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
ADAPTER_NAME = "default"
EVAL_BATCH = 32
PRECOMPUTE_BATCH = 128  # rows of ~7 own tokens each: large batches keep the frozen blocks compute-bound
# Above this the frozen-block cache would crowd out the model; such runs recompute every step.
REUSE_MEMORY_LIMIT = 4 << 30

EventKind = Literal["started", "step", "eval", "checkpoint", "finished", "stopped"]


@dataclass(frozen=True)
class TrainEvent:
    """Progress, one per optimizer step plus one per evaluation and checkpoint: cheap to stream."""

    kind: EventKind
    step: int
    total_steps: int
    epoch: float  # epochs done, fractional
    loss: float | None = None
    learning_rate: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    eta_seconds: float | None = None
    tokens_per_second: float | None = None
    message: str = ""


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path | None  # None when the run was stopped before the end (it resumes from its checkpoint)
    steps: int
    metrics: dict[str, float]  # final validation_* and test_* metrics, of the adapter written
    history: list[dict[str, float]]  # one entry per evaluation during training
    seconds: float  # wall time of this call
    tokens_per_second: float  # sequence tokens trained per second of training in this call
    resumed_from_step: int
    stopped: bool = False  # should_stop() ended the run early; train() again on the same workdir resumes it


def _ignore(event: TrainEvent) -> None:
    del event


def _never() -> bool:
    return False


# ---- the run -------------------------------------------------------------------------------------
def train(spec: TrainingSpec, model_dir: Path, data: TrainingData, workdir: Path, *,
          on_event: Callable[[TrainEvent], None] = _ignore, should_stop: Callable[[], bool] = _never,
          device: str = "auto", reuse: bool = True) -> TrainResult:
    """Fine-tune ``model_dir`` on ``data`` as ``spec`` says; the adapter lands in ``workdir/adapter``.

    A checkpoint in ``workdir/checkpoints`` is resumed from. ``should_stop`` is asked before every
    step; when it says so, the state is checkpointed and the result has ``stopped`` set.
    ``reuse=False`` forces the plain forward path (for comparisons).
    """
    import torch

    began = time.monotonic()
    _check_data(spec, data)
    workdir = Path(workdir)
    model, tokenizer = load_base(model_dir, device)
    _seed(spec.seed)  # before the adapter exists: its initial weights come from this seed
    first_adapted = add_lora(model, spec.lora)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=spec.optim.learning_rate,
                                  weight_decay=spec.optim.weight_decay)
    total = total_steps(spec, len(data.train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(spec.optim.warmup_steps, total))
    answer_ids = letter_token_ids(tokenizer) if spec.task == "choice" else _rating_ids(tokenizer)
    run = _RunState.fresh()
    best_adapter: dict[str, torch.Tensor] | None = None

    resumed = ckpt.load_latest(workdir / CHECKPOINT_DIR)
    if resumed is not None:
        _check_resumable(resumed, spec, data)
        _load_weights(params, resumed.adapter)
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        ckpt.restore_rng(resumed.rng)
        run = _RunState.from_json(resumed.state)
        best_adapter = resumed.best_adapter
        logger.info("resuming %s from step %d", workdir, resumed.step)
    resumed_from = run.step

    objective = spec.objective
    encoded = {part: encode(getattr(data, part), tokenizer, objective, spec.whole_sequence_loss)
               for part in ("train", "validation", "test")}
    path, why = _choose_path(model, encoded["train"], first_adapted, reuse)
    spe = math.ceil(len(data.train) / spec.optim.batch_size)
    if resumed is not None:
        why = f"resumed from step {run.step}; {why}"
    on_event(TrainEvent("started", run.step, total, run.step / spe, message=why))

    clock = time.monotonic()
    forwards: dict[str, Forward] = {"train": _forward(path, model, encoded["train"], first_adapted, tokenizer)}
    train_seconds = time.monotonic() - clock  # the one-time cache is part of what training costs
    share = spec.lora.dropout == 0  # see objectives: a shared prefix would share its dropout mask
    tokens = 0
    steps_done = 0
    last_eval: tuple[int, dict[str, float]] | None = None

    def evaluate_part(part: str) -> dict[str, float]:
        if part not in forwards:
            forwards[part] = _forward(path, model, encoded[part], first_adapted, tokenizer)
        return evaluate(model, tokenizer, forwards[part], spec, data, answer_ids, part)

    saved_step = resumed_from if resumed is not None else -1
    model.train()
    while run.step < total and not run.stop_reason:
        if should_stop():
            if saved_step != run.step:
                saved = _save(workdir, spec, data, run, params, optimizer, scheduler, best_adapter)
                on_event(TrainEvent("checkpoint", run.step, total, run.step / spe, message=saved.name))
            on_event(TrainEvent("stopped", run.step, total, run.step / spe))
            return TrainResult(None, run.step, {}, run.history, time.monotonic() - began,
                               tokens / max(train_seconds, 1e-9), resumed_from, stopped=True)
        clock = time.monotonic()
        rows = batch_rows(spec.seed, run.step, len(data.train), spec.optim.batch_size)
        lr = scheduler.get_last_lr()[0]
        loss, n_tokens = _step(forwards["train"], rows, spec, answer_ids, share, optimizer, params)
        scheduler.step()
        run.step += 1
        steps_done += 1
        tokens += n_tokens
        run.losses.append(loss)
        train_seconds += time.monotonic() - clock
        tps = tokens / max(train_seconds, 1e-9)
        eta = (total - run.step) * train_seconds / steps_done
        on_event(TrainEvent("step", run.step, total, run.step / spe, loss=loss, learning_rate=lr,
                            eta_seconds=eta, tokens_per_second=tps))

        if data.validation and (run.step % spec.eval.every_steps == 0 or run.step == total):
            metrics = evaluate_part("validation")
            last_eval = (run.step, metrics)
            entry = {"step": float(run.step), "epoch": run.step / spe, "train_loss": float(np.mean(run.losses)),
                     "learning_rate": lr, **metrics}
            run.losses = []
            run.history.append(entry)
            message = _early_stopping(spec, run, metrics)
            if run.best_step == run.step:
                best_adapter = {n: p.detach().clone() for n, p in params.items()}
            on_event(TrainEvent("eval", run.step, total, run.step / spe, metrics=metrics, message=message))
        if run.step % spec.eval.checkpoint_every_steps == 0 or run.stop_reason:
            saved = _save(workdir, spec, data, run, params, optimizer, scheduler, best_adapter)
            saved_step = run.step
            on_event(TrainEvent("checkpoint", run.step, total, run.step / spe, message=saved.name))

    if spec.eval.early_stopping_metric and best_adapter is not None and run.best_step != run.step:
        # the best evaluation was of exactly these weights: its metrics stand for the adapter written
        _load_weights(params, best_adapter)
        best = next(h for h in run.history if h["step"] == run.best_step)
        last_eval = (run.step, {k: v for k, v in best.items() if k.startswith("validation_")})
    metrics: dict[str, float] = {}
    if data.validation:
        metrics.update(last_eval[1] if last_eval and last_eval[0] == run.step else evaluate_part("validation"))
    if data.test:
        metrics.update(evaluate_part("test"))
    adapter_dir = save_adapter(model, workdir / ADAPTER_DIR, spec.base_model)
    on_event(TrainEvent("finished", run.step, total, run.step / spe, metrics=metrics,
                        tokens_per_second=tokens / max(train_seconds, 1e-9), message=run.stop_reason))
    return TrainResult(adapter_dir, run.step, metrics, run.history, time.monotonic() - began,
                       tokens / max(train_seconds, 1e-9), resumed_from)


# ---- setup ---------------------------------------------------------------------------------------
def _check_data(spec: TrainingSpec, data: TrainingData) -> None:
    if data.task != spec.task:
        raise InvalidArgument(f"the data are for task {data.task!r}, the spec trains {spec.task!r}")
    if not data.train:
        raise InvalidArgument("no training examples")
    if spec.eval.early_stopping_metric and not data.validation:
        raise InvalidArgument("early stopping needs validation examples")
    if spec.eval.early_stopping_metric == "validation_spearman" and spec.task != "rating":
        raise InvalidArgument("validation_spearman is a rating-task metric")
    if spec.eval.early_stopping_metric == "validation_accuracy" and spec.task != "choice":
        raise InvalidArgument("validation_accuracy is a choice-task metric")
    if spec.task == "rating" and spec.objective != "text":
        unrated = [e.key for e in (*data.train, *data.validation, *data.test) if e.rating is None]
        if unrated:
            raise InvalidArgument(f"objective {spec.objective!r} needs a rating on every example; "
                                  f"{len(unrated)} have none (e.g. {unrated[0]!r})")


def _seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every device's generator


def load_base(model_dir: Path, device: str = "auto") -> tuple[Any, Any]:
    """The base model for training: safetensors only, no remote code; float32 on CPU, bfloat16 on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sensorium.models.store import check_model_dir, resolve_device, resolve_dtype

    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    target = resolve_device(device)  # type: ignore[arg-type]
    dtype = getattr(torch, resolve_dtype("auto", target))
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False,
                                                     use_safetensors=True, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FailedPrecondition(f"{model_dir} cannot be loaded for training: {exc}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FailedPrecondition(f"{model_dir}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.to(target)
    model.requires_grad_(False)
    return model, tokenizer


def add_lora(model: Any, lora: LoraSpec) -> int:
    """Inject the adapter in place; returns the index of the lowest adapted block (0: all blocks).

    Adapter weights are float32 even on a bfloat16 model: Adam's small updates vanish in bfloat16.
    """
    from peft import LoraConfig

    n_layers = int(model.config.get_text_config().num_hidden_layers)
    first = max(0, n_layers - lora.top_layers) if lora.top_layers else 0
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules),
                        layers_to_transform=list(range(first, n_layers)) if first else None,
                        layers_pattern=None)  # peft finds "layers", "h", "block", ... itself
    model.add_adapter(config, adapter_name=ADAPTER_NAME)
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    if not trainable:
        raise InvalidArgument(f"no module of the model matches lora.target_modules {list(lora.target_modules)}")
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    for p in trainable:
        p.data = p.data.float()
    return first


def _lowest_adapted(model: Any) -> int | None:
    """The lowest block index holding an adapter, or None if some adapter sits outside the blocks."""
    lowest = None
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A", {})):
            parts = name.split(".")
            if "layers" not in parts or not parts[parts.index("layers") + 1].isdigit():
                return None
            index = int(parts[parts.index("layers") + 1])
            lowest = index if lowest is None else min(lowest, index)
    return lowest


def _choose_path(model: Any, train: EncodedSet, first_adapted: int, reuse: bool) -> tuple[str, str]:
    """("reuse" | "plain", why): the frozen-prefix path where it is known to give the plain numbers."""
    if not reuse:
        return "plain", "plain path (reuse switched off)"
    reason = frozen_prefix_support(model)
    lowest = _lowest_adapted(model)
    if reason is None and (lowest is None or lowest < first_adapted):
        reason = "an adapted module lies below the top blocks"
    if reason is None:
        hidden = int(model.config.get_text_config().hidden_size)
        size = (sum(len(it.ids) - it.prefix_len for it in train.items) + sum(map(len, train.prefixes))) * hidden
        size *= model.get_output_embeddings().weight.element_size()
        if size > REUSE_MEMORY_LIMIT:
            reason = f"the frozen-block cache would take {size / 2**30:.1f} GiB"
    if reason is None:
        reason = _self_check(model, train, first_adapted)
    if reason is not None:
        logger.warning("frozen-prefix reuse off: %s", reason)
        return "plain", f"plain path: frozen-prefix reuse off ({reason})"
    n_layers = len(model.base_model.layers)
    frozen = f"blocks 0-{first_adapted - 1} run once per sequence, " if first_adapted else ""
    return "reuse", (f"frozen-prefix reuse: {frozen}blocks {first_adapted}-{n_layers - 1} run per step; "
                     f"{len(train.prefixes)} shared prompt prefix(es) stored once")


def _self_check(model: Any, train: EncodedSet, first_adapted: int) -> str | None:
    """Both paths on two examples: a transformers change that breaks the reuse path shows up here."""
    import torch

    sample = EncodedSet(train.items[:2], train.prefixes)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            a = FrozenPrefixForward(model, sample, first_adapted).hidden([0, 1], share_prefix=True)
            b = PlainForward(model, sample, 0).hidden([0, 1])
    except Exception as exc:  # any failure of the hand-run blocks means: use the model's own forward
        return f"self-check failed: {type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    tolerance = 1e-4 if a.dtype == torch.float32 else 5e-2
    error = float((a.float() - b.float()).abs().max() / (1 + b.float().abs().max()))
    return None if error <= tolerance else f"self-check: the paths differ by {error:.2e}"


def _forward(path: str, model: Any, data: EncodedSet, first_adapted: int, tokenizer: Any) -> Forward:
    import torch

    if path == "plain":
        return PlainForward(model, data, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return FrozenPrefixForward(model, data, first_adapted, batch_size=PRECOMPUTE_BATCH)
    finally:
        model.train(was_training)


def _rating_ids(tokenizer: Any) -> list[int]:
    from sensorium.ratings import answer_token_ids

    return answer_token_ids(tokenizer)


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup to the learning rate, then linear decay to 0 at ``total`` (as transformers does)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def batch_rows(seed: int, step: int, n: int, batch_size: int) -> list[int]:
    """The training examples of optimizer step ``step``: a seeded permutation per epoch, then batches.

    The last batch of an epoch may be smaller; the next epoch starts a new permutation.
    """
    per_epoch = math.ceil(n / batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[position * batch_size:(position + 1) * batch_size].tolist()


# ---- one step ------------------------------------------------------------------------------------
def _micro_batches(forward: Forward, rows: Sequence[int], size: int) -> list[list[int]]:
    """Rows of one template together, then by length: a micro-batch then runs few shared prefixes
    and carries little padding. Losses are sums, so the order changes nothing else."""
    items = forward.data.items
    ordered = sorted(rows, key=lambda r: (items[r].group, len(items[r].ids), r))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def _step(forward: Forward, rows: Sequence[int], spec: TrainingSpec, answer_ids: Sequence[int], share: bool,
          optimizer: Any, params: dict[str, Any]) -> tuple[float, int]:
    """Accumulate the batch's gradient over micro-batches, clip, update; (mean loss, tokens)."""
    import torch

    items = [forward.data.items[r] for r in rows]
    units = scored_units(items, spec.objective)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in _micro_batches(forward, rows, spec.optim.micro_batch_size):
        loss = batch_loss(forward, micro, spec.objective, answer_ids, share_prefix=share).loss / units
        loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(list(params.values()), spec.optim.max_grad_norm)
    optimizer.step()
    return total, sum(len(it.ids) for it in items)


# ---- evaluation ----------------------------------------------------------------------------------
def evaluate(model: Any, tokenizer: Any, forward: Forward, spec: TrainingSpec, data: TrainingData,
             answer_ids: Sequence[int], part: str) -> dict[str, float]:
    """Loss, and per-dimension Spearman (rating) or accuracy per subtask (choice), as ``part``_*.

    Ratings are read with ``sensorium.ratings.rate``, the extractor's own code, wherever the
    built-in template reproduces the examples' prompts; otherwise from the answer position of
    the loss pass, which is the same readout.
    """
    import torch

    items = forward.data.items
    was_training = model.training
    model.eval()
    loss = 0.0
    logits = []
    try:
        with torch.no_grad():
            for rows in _micro_batches(forward, range(len(items)), EVAL_BATCH):
                out = batch_loss(forward, rows, spec.objective, answer_ids, share_prefix=True)
                loss += float(out.loss)
                logits.append((rows, out.answer_logits.float()))
            answer = torch.empty((len(items), logits[0][1].shape[1]))
            for rows, values in logits:
                answer[rows] = values.cpu()
            metrics = {f"{part}_loss": loss / scored_units(items, spec.objective)}
            examples = [it.example for it in items]
            if spec.task == "choice":
                metrics.update(_accuracy(examples, answer, answer_ids, part))
            else:
                expected = _expected_ratings(model, tokenizer, examples, data.language, answer, answer_ids)
                metrics.update(_spearman(examples, expected, part))
                metrics[f"{part}_answer_mass"] = float(answer_mass(answer, answer_ids).mean())
    finally:
        model.train(was_training)
    return metrics


def _expected_ratings(model: Any, tokenizer: Any, examples: Sequence[Example], language: str,
                      answer: torch.Tensor, answer_ids: Sequence[int]) -> np.ndarray:
    from sensorium.errors import SensoriumError
    from sensorium.prompts import chat_prompt, default_template
    from sensorium.ratings import rate

    out = expected_rating(answer, answer_ids).numpy().astype(np.float64)
    by_dimension: dict[str | None, list[int]] = {}
    for i, e in enumerate(examples):
        by_dimension.setdefault(e.dimension, []).append(i)
    for dimension, rows in by_dimension.items():
        try:
            template = default_template(language, dimension or "")
        except SensoriumError:
            continue
        if any(template.render(examples[i].key) != examples[i].prompt for i in rows):
            continue
        ratings = rate(model, tokenizer, [examples[i].key for i in rows],
                       lambda w, t=template: chat_prompt(t.render(w), tokenizer), batch_size=EVAL_BATCH)
        out[rows] = ratings.expected
    return out


def _spearman(examples: Sequence[Example], expected: np.ndarray, part: str) -> dict[str, float]:
    from scipy.stats import spearmanr

    metrics: dict[str, float] = {}
    dimensions = sorted({e.dimension for e in examples if e.dimension})
    for dimension in dimensions:
        rows = [i for i, e in enumerate(examples) if e.dimension == dimension]
        human = np.array([examples[i].rating for i in rows], dtype=np.float64)
        model = expected[rows]
        ok = len(rows) >= 3 and np.ptp(human) > 0 and np.ptp(model) > 0
        metrics[f"{part}_spearman_{dimension}"] = float(spearmanr(model, human).statistic) if ok else math.nan
    values = [v for v in metrics.values() if math.isfinite(v)]
    metrics[f"{part}_spearman"] = float(np.mean(values)) if values else math.nan
    return metrics


def _accuracy(examples: Sequence[Example], answer: torch.Tensor, letter_ids: Sequence[int],
              part: str) -> dict[str, float]:
    from sensorium.training.objectives import LETTERS

    chosen = answer[:, list(letter_ids)].argmax(dim=1).tolist()
    right = np.array([LETTERS[c] == e.target for c, e in zip(chosen, examples, strict=True)])
    metrics = {f"{part}_accuracy": float(right.mean())}
    for subtask in sorted({e.subtask for e in examples if e.subtask}):
        mask = np.array([e.subtask == subtask for e in examples])
        metrics[f"{part}_accuracy_{subtask}"] = float(right[mask].mean())
    return metrics


# ---- early stopping ------------------------------------------------------------------------------
@dataclass
class _RunState:
    """What the loop carries from step to step, and through a checkpoint (as JSON)."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # step losses since the last evaluation
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stop_reason: str = ""  # early stopping said stop: a resumed run goes straight to the end

    @classmethod
    def fresh(cls) -> _RunState:
        return cls()

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> _RunState:
        return cls(step=int(state["step"]), history=list(state["history"]), losses=list(state["losses"]),
                   best_value=state["best_value"], best_step=state["best_step"], bad_evals=int(state["bad_evals"]),
                   stop_reason=str(state["stop_reason"]))

    def to_json(self, spec: TrainingSpec, data: TrainingData, per_epoch: int) -> dict[str, Any]:
        epoch, position = divmod(self.step, per_epoch)
        return {"step": self.step, "epoch": epoch, "position": position, "history": self.history,
                "losses": self.losses, "best_value": self.best_value, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "stop_reason": self.stop_reason,
                "seed": spec.seed, "spec_digest": spec.digest, "split_digest": data.split.digest,
                "train_examples": len(data.train)}


def _early_stopping(spec: TrainingSpec, run: _RunState, metrics: dict[str, float]) -> str:
    """Track the best evaluation and set ``run.stop_reason`` when patience runs out; the event message."""
    name = spec.eval.early_stopping_metric
    if name is None:
        return ""
    value = metrics.get(name, math.nan)
    lower_is_better = name == "validation_loss"
    better = math.isfinite(value) and (run.best_value is None or
                                       (value < run.best_value if lower_is_better else value > run.best_value))
    if better:
        run.best_value, run.best_step, run.bad_evals = value, run.step, 0
        return f"best {name} so far: {value:.4f}"
    run.bad_evals += 1
    if run.bad_evals >= spec.eval.patience:
        run.stop_reason = (f"early stopping: {name} has not improved for {run.bad_evals} evaluations; "
                           f"keeping the adapter of step {run.best_step}")
        return run.stop_reason
    return f"no improvement in {name} ({run.bad_evals}/{spec.eval.patience})"


# ---- state on disk -------------------------------------------------------------------------------
def _save(workdir: Path, spec: TrainingSpec, data: TrainingData, run: _RunState, params: dict[str, Any],
          optimizer: Any, scheduler: Any, best_adapter: dict[str, Any] | None) -> Path:
    per_epoch = math.ceil(len(data.train) / spec.optim.batch_size)
    return ckpt.save(workdir / CHECKPOINT_DIR, run.step, adapter=params, optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), state=run.to_json(spec, data, per_epoch),
                     rng=ckpt.capture_rng(), best_adapter=best_adapter)


def _check_resumable(resumed: ckpt.Checkpoint, spec: TrainingSpec, data: TrainingData) -> None:
    """A checkpoint continues only the run that wrote it: same recipe (seed included), same split."""
    state = resumed.state
    if state.get("spec_digest") != spec.digest:
        raise FailedPrecondition(f"{resumed.path} was written by another spec (seed {state.get('seed')}, "
                                 f"this run's seed {spec.seed}); use a fresh workdir")
    if state.get("split_digest") != data.split.digest or state.get("train_examples") != len(data.train):
        raise FailedPrecondition(f"{resumed.path} was written for another split of the data; use a fresh workdir")


def _load_weights(params: dict[str, Any], weights: dict[str, Any]) -> None:
    import torch

    if set(params) != set(weights):
        raise FailedPrecondition(f"checkpointed adapter holds {len(weights)} tensors, the model {len(params)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(device=p.device, dtype=p.dtype))


def save_adapter(model: Any, directory: Path, base_model: str) -> Path:
    """``adapter_config.json`` and ``adapter_model.safetensors`` as peft writes them, and nothing else.

    Keys carry peft's ``base_model.model.`` prefix so that ``load_adapter`` and peft alike read
    the folder. It replaces any previous folder in one rename.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from sensorium.models.adapters import CONFIG, WEIGHTS

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        # embedding layers are never adapted here; "auto" would look the base model up on the hub
        state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
        save_file({f"base_model.model.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()},
                  str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
        config.base_model_name_or_path = base_model
        config.inference_mode = True
        config.save_pretrained(str(tmp))
        extra = sorted(set(os.listdir(tmp)) - {CONFIG, WEIGHTS})
        for name in extra:  # a peft version that writes more (e.g. a README) is trimmed to the contract
            os.remove(tmp / name)
        for name in (CONFIG, WEIGHTS):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if directory.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.rename(directory, aside / directory.name)
            os.rename(tmp, directory)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
