"""Rating throughput of SmolLM2-135M-Instruct on 2 CPU threads: naive generate loop vs Sensorium.

- naive: ``model.generate(max_new_tokens=4)`` one prompt at a time (the obvious way);
- sensorium: ``sensorium.ratings.rate`` — batched, the template's shared prefix computed once
  and its key/value cache reused, greedy decoding continued from the same pass (same 4 tokens),
  plus the expected rating from the first step.
Same model, prompts and thread count. The greedy answers of the prompts both ran must be identical.
Run: .venv/bin/python bench/bench_rating_throughput.py [--words 96] [--naive 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = """apple thunder velvet lemon whisper kick chew shout pillow garlic siren marble bread piano
river smoke candle honey nettle hammer violin pepper feather trumpet ice sand perfume drum rope
coffee glass wool bell onion silk stone rain cake thorn engine soap butter bark needle vinegar
grass whistle leather cinnamon pebble horn mint cloth kettle orange brick fur lightning cheese
sponge gravel echo rose paper chalk bubble cactus tongue knee elbow shoulder spine jaw wrist ankle
throat belly sneeze itch hunger thirst nausea cough yawn hiccup laugh dance climb swim jump""".split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, default=96)
    ap.add_argument("--naive", type=int, default=24, help="prompts timed for the naive loop (it is slow)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import torch

    from sensorium.models import DEFAULT_MODEL, ModelRegistry, ModelStore
    from sensorium.prompts import chat_prompt, default_template
    from sensorium.ratings import rate

    torch.set_num_threads(args.threads)
    loaded = ModelRegistry.default(ModelStore(ROOT / "var" / "bench-models")).load(DEFAULT_MODEL)
    model, tok = loaded.model, loaded.tokenizer
    template = default_template("en", "visual")
    prompt = lambda w: chat_prompt(template.render(w), tok)  # noqa: E731
    words = WORDS[: args.words]
    n_tokens = len(tok(prompt(words[0]))["input_ids"])
    print(f"{DEFAULT_MODEL}, {args.threads} threads, prompts of ~{n_tokens} tokens (chat template), "
          f"{len(words)} words, greedy max_new_tokens=4")

    t0 = time.perf_counter()
    naive_answers = []
    for w in words[: args.naive]:
        enc = tok(prompt(w), return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        naive_answers.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    naive_rate = args.naive / (time.perf_counter() - t0)

    rate(model, tok, words[:4], prompt, batch_size=4, max_new_tokens=4)  # warm-up, as the naive loop had
    t0 = time.perf_counter()
    got = rate(model, tok, words, prompt, batch_size=args.batch_size, max_new_tokens=4)
    fast_rate = len(words) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    rate(model, tok, words, prompt, batch_size=args.batch_size, max_new_tokens=0)
    expected_only = len(words) / (time.perf_counter() - t0)

    same = sum(a == b for a, b in zip(naive_answers, got.answers))
    print(f"naive generate loop:        {naive_rate:7.2f} prompts/s")
    print(f"sensorium, expected+greedy: {fast_rate:7.2f} prompts/s  ({fast_rate / naive_rate:.1f}x)")
    print(f"sensorium, expected only:   {expected_only:7.2f} prompts/s  ({expected_only / naive_rate:.1f}x)")
    print(f"identical greedy answers: {same}/{args.naive}; prefix reused for {int(got.prefix_reused.sum())}/{len(words)}")
    print(f"digit probability mass: mean {got.mass.mean():.3f}; parsed answers: "
          f"{sum(p is not None for p in got.parsed)}/{len(words)}; e.g. {got.answers[:3]}")


if __name__ == "__main__":
    main()
