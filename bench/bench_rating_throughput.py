"""Rating throughput of SmolLM2-135M-Instruct on 2 CPU threads: naive generate loop vs Sensorium.

- naive: ``model.generate(max_new_tokens=4)`` one prompt at a time (the obvious way);
- sensorium: ``sensorium.ratings.rate`` — the template's shared prefix computed once and
  attended by every row without copies, the rest of each prompt batched without padding,
  greedy decoding continued from the same pass (same 4 tokens), plus the expected rating from
  the first step;
- sensorium, expected only: the same without decoding (``max_new_tokens=0``).
Same model, prompts and thread count; each side warmed up once before timing. The greedy
answers of the prompts both ran must be identical.

The sides are timed in alternating rounds and the medians reported, so that another process
taking the cores for a while slows both rather than one. The CPU share (process CPU time over
threads x wall time) says whether the cores were ours: well under 1 means the machine was busy
and the numbers understate both sides unevenly.
Run: .venv/bin/python bench/bench_rating_throughput.py [--words 96] [--naive 24] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = """apple thunder velvet lemon whisper kick chew shout pillow garlic siren marble bread piano
river smoke candle honey nettle hammer violin pepper feather trumpet ice sand perfume drum rope
coffee glass wool bell onion silk stone rain cake thorn engine soap butter bark needle vinegar
grass whistle leather cinnamon pebble horn mint cloth kettle orange brick fur lightning cheese
sponge gravel echo rose paper chalk bubble cactus tongue knee elbow shoulder spine jaw wrist ankle
throat belly sneeze itch hunger thirst nausea cough yawn hiccup laugh dance climb swim jump""".split()


def timed(f: Callable[[], object], threads: int) -> tuple[float, float]:
    """Wall seconds of ``f()`` and the share of ``threads`` cores the process had meanwhile."""
    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    f()
    wall = time.perf_counter() - t0
    return wall, (cpu() - c0) / (threads * wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, default=96, help="words rated by sensorium (at most the 90 listed)")
    ap.add_argument("--naive", type=int, default=24, help="prompts timed for the naive loop (it is slow)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds; medians are reported")
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
          f"{len(words)} words, greedy max_new_tokens=4, batch size {args.batch_size}, {args.rounds} rounds")

    naive_answers: list[str] = []

    def naive() -> None:
        naive_answers.clear()
        for w in words[: args.naive]:
            enc = tok(prompt(w), return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            naive_answers.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))

    got = []
    sides: dict[str, tuple[int, Callable[[], object]]] = {
        "naive generate loop": (args.naive, naive),
        "sensorium, expected+greedy": (len(words), lambda: got.append(
            rate(model, tok, words, prompt, batch_size=args.batch_size, max_new_tokens=4))),
        "sensorium, expected only": (len(words), lambda: rate(
            model, tok, words, prompt, batch_size=args.batch_size, max_new_tokens=0)),
    }
    with torch.inference_mode():  # warm-up, one prompt each way
        model.generate(**tok(prompt(words[0]), return_tensors="pt"), max_new_tokens=4, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    rate(model, tok, words[:4], prompt, batch_size=4, max_new_tokens=4)

    rates: dict[str, list[float]] = {name: [] for name in sides}
    shares: list[float] = []
    for _ in range(args.rounds):
        for name, (n, f) in sides.items():
            wall, share = timed(f, args.threads)
            rates[name].append(n / wall)
            shares.append(share)

    base = statistics.median(rates["naive generate loop"])
    for name, values in rates.items():
        median = statistics.median(values)
        ratio = "" if name.startswith("naive") else f"  ({median / base:.1f}x)"
        print(f"{name + ':':28s}{median:7.2f} prompts/s{ratio}   rounds: {', '.join(f'{v:.2f}' for v in values)}")
    print(f"CPU share per timing: min {min(shares):.2f}, median {statistics.median(shares):.2f} (1 = the cores were ours)")
    fast = got[-1]
    same = sum(a == b for a, b in zip(naive_answers, fast.answers))
    print(f"identical greedy answers: {same}/{len(naive_answers)}; prefix reused for "
          f"{int(fast.prefix_reused.sum())}/{len(words)}")
    print(f"digit probability mass: mean {fast.mass.mean():.3f}; parsed answers: "
          f"{sum(p is not None for p in fast.parsed)}/{len(words)}; e.g. {fast.answers[:3]}")


if __name__ == "__main__":
    main()
