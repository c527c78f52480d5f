"""Full cache vs NAMM variants on one long document, measured in one run.

For the default model (SmolLM2-135M-Instruct, float32) and one document of
``--tokens`` tokens, runs mlx-lm's own ``generate_step`` (512-token prefill
chunks, so NAMM steps fall on the reference cadence) for each cache:

* ``full``: mlx-lm's ``KVCache``;
* ``namm``: the NAMM's caches;
* ``namm+max-kv``: the same with ``--max-kv-size`` (default 2048);
* ``namm+kv-bits``: the same with the kept keys/values quantised (``--kv-bits``, default 8).

and prints prefill and decode tokens/s (decoding ``--max-tokens`` tokens,
512 by default, end-of-sequence ignored, NAMM steps included), peak memory,
the live K/V bytes at the end, the kept fraction and the share of wall time
spent in NAMM steps, each also as a ratio to the full cache. Documents past
the model's trained context get the YaRN scaling ``namm chat`` would apply
(for every cache alike).

Run:  python benchmarks/generate.py [--tokens 4096] [--max-tokens 512] [--caches full,namm,...] [--quick]
(on Linux preload OpenBLAS as the README says).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, make_prompt_cache

import namm_mlx
from namm_mlx import NAMM, EvictingKVCache
from namm_mlx.integration import DEFAULT_NAMM_DIR
from namm_mlx.models import resolve_model_path
from namm_mlx.session import context_limit, yarn_scaling

REPO = Path(__file__).resolve().parents[1]
CACHES = ("full", "namm", "namm+max-kv", "namm+kv-bits")


def document_prompt(tokenizer, doc: str, n_tokens: int) -> list[int]:
    """A chat prompt of about ``n_tokens``: the document (repeated or cut), then a request."""
    question = "\n\nSummarise the passage above in detail, chapter by chapter."
    body = tokenizer.encode(doc, add_special_tokens=False)
    while len(body) < n_tokens:
        body = body + body
    text = tokenizer.decode(body[: n_tokens - 64])
    messages = [{"role": "user", "content": text + question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def load_stretched(positions: int) -> tuple:
    """The default model, with the YaRN scaling ``namm chat`` applies when
    ``positions`` exceed its trained context; and a note saying which."""
    path = resolve_model_path(None)
    trained = context_limit(json.loads((Path(path) / "config.json").read_text()))
    overrides, note = {}, ""
    if trained and positions > trained:
        scaling = yarn_scaling(positions, trained)
        overrides = {"rope_scaling": scaling, "max_position_embeddings": positions}
        note = f"; YaRN x{scaling['factor']:g} ({positions:,} positions > {trained:,} trained)"
    model, tokenizer = mlx_lm.load(str(path), model_config=overrides)
    return model, tokenizer, note


def default_document() -> Path:
    """The text under ``examples/`` every benchmark reads by default."""
    return next(iter(sorted((REPO / "examples").glob("*.txt"))))


class StepTimer:
    """Times eviction steps only: everything the step reads (including the
    probabilities its forward computed) is evaluated before the clock starts."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self._original = EvictingKVCache.evict

    def __enter__(self) -> "StepTimer":
        timer = self

        def timed_evict(cache: EvictingKVCache) -> None:
            mx.eval(cache.keys, cache.values, cache.queries, cache._forward_probabilities)
            start = time.perf_counter()
            timer._original(cache)
            timer.seconds += time.perf_counter() - start
            timer.steps += 1

        EvictingKVCache.evict = timed_evict
        return self

    def __exit__(self, *exc) -> None:
        EvictingKVCache.evict = self._original


def kv_bytes(cache: list) -> int:
    """Live key/value bytes (a full cache's growth slack excluded)."""
    total = 0
    for c in cache:
        if isinstance(c, EvictingKVCache):
            total += c.kv_nbytes
        elif isinstance(c, KVCache) and c.keys is not None:
            total += (c.keys.nbytes + c.values.nbytes) * c.offset // c.keys.shape[2]
    return total


def run(model, prompt: list[int], max_tokens: int) -> dict:
    cache = make_prompt_cache(model)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    with StepTimer() as timer:
        first = None
        n = 0
        for n, _ in enumerate(
            generate_step(mx.array(prompt), model, prompt_cache=cache, max_tokens=max_tokens, prefill_step_size=512),
            start=1,
        ):
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    evicting = [c for c in cache if isinstance(c, EvictingKVCache)]
    result = {
        "prefill_tps": len(prompt) / (first - start),
        "decode_tps": (n - 1) / (end - first) if n > 1 else float("nan"),
        "peak_gb": mx.get_peak_memory() / 1e9,
        "kv_mb": kv_bytes(cache) / 1e6,
        "cache_mb": sum(c.nbytes for c in cache) / 1e6,
        "kept": float(np.mean([c.length / c.offset for c in evicting])) if evicting else 1.0,
        "step_share": timer.seconds / (end - start),
        "steps": timer.steps,
        "wall": end - start,
        "generated": n,
    }
    del cache
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", default=None, help="text file (default: the examples/ text)")
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens to decode (EOS ignored)")
    parser.add_argument("--namm", default=None, help="NAMM folder (default: weights/default)")
    parser.add_argument("--max-kv-size", type=int, default=2048)
    parser.add_argument("--kv-bits", type=int, default=8)
    parser.add_argument("--caches", default=",".join(CACHES), help=f"comma-separated subset of {','.join(CACHES)}")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1024-token prompt, 32 tokens decoded")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.max_tokens = 1024, 32
    caches = [c for c in args.caches.split(",") if c]
    unknown = sorted(set(caches) - set(CACHES))
    if unknown:
        parser.error(f"unknown caches {unknown}; choose from {','.join(CACHES)}")

    doc_path = Path(args.doc) if args.doc else default_document()
    namm = NAMM.load(args.namm or DEFAULT_NAMM_DIR)
    model, tokenizer, note = load_stretched(args.tokens + args.max_tokens + 64)
    prompt = document_prompt(tokenizer, doc_path.read_text(), args.tokens)
    print(f"mlx {mx.__version__} on {mx.default_device()}; SmolLM2-135M-Instruct float32; {len(prompt):,}-token "
          f"prompt from {doc_path.name}, {args.max_tokens} tokens decoded{note}; NAMM {args.namm or DEFAULT_NAMM_DIR}")  # fmt: skip

    results = {}
    for name in caches:
        if name == "full":
            namm_mlx.detach(model)
        else:
            namm_mlx.attach(
                model, namm,
                max_kv_size=args.max_kv_size if name == "namm+max-kv" else None,
                kv_bits=args.kv_bits if name == "namm+kv-bits" else None,
            )  # fmt: skip
        results[name] = run(model, prompt, args.max_tokens)
        r = results[name]
        print(f"  {name}: prefill {r['prefill_tps']:.1f} tok/s, decode {r['decode_tps']:.2f} tok/s, "
              f"peak {r['peak_gb']:.3f} GB, wall {r['wall']:.0f} s", flush=True)  # fmt: skip
    namm_mlx.detach(model)

    rows = [
        ("prefill tok/s", "prefill_tps", "{:.1f}"),
        ("decode tok/s", "decode_tps", "{:.2f}"),
        ("peak memory GB", "peak_gb", "{:.3f}"),
        ("live K/V MB", "kv_mb", "{:.1f}"),
        ("cache MB (all state)", "cache_mb", "{:.1f}"),
        ("kept fraction", "kept", "{:.3f}"),
        ("share of time in steps", "step_share", "{:.1%}"),
        ("NAMM steps (layer calls)", "steps", "{:d}"),
        ("wall s", "wall", "{:.1f}"),
    ]
    base = results.get("full")
    print(f"\n{'':26s}" + "".join(f"{name:>14s}" for name in results))
    for label, key, fmt in rows:
        print(f"{label:26s}" + "".join(f"{fmt.format(r[key]):>14s}" for r in results.values()))
    if base:
        print(f"\nratio to the full cache")
        for label, key, _ in rows[:4]:
            cells = [r[key] / base[key] if base[key] else float("nan") for r in results.values()]
            print(f"{label:26s}" + "".join(f"{c:14.2f}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"prompt_tokens": len(prompt), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
