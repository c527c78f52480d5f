"""Prefill throughput window by window within one run, under ``--max-kv-size``.

``generate.py`` gives one prefill rate per document, so a long document's rate
mixes the ramp (the cache filling up to the cap) with the steady state under
the cap, and rates from separate runs differ with the machine's load. This
script prefills one document through NAMM caches capped at ``--max-kv-size``
in 512-token chunks, as mlx-lm does, and prints the tokens/s of every
``--window`` tokens from the same run, so whether the cost per token grows
with the document can be read directly.

Run:  python benchmarks/prefill_chunks.py [--tokens 32768] [--max-kv-size 2048] [--window 4096] [--quick]
(on Linux, preload OpenBLAS as the README says).
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
from generate import default_document, document_prompt, load_stretched
from mlx_lm.models.cache import make_prompt_cache

import namm_mlx
from namm_mlx import NAMM
from namm_mlx.integration import DEFAULT_NAMM_DIR

CHUNK = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768, help="prompt length")
    parser.add_argument("--max-kv-size", type=int, default=2048)
    parser.add_argument("--window", type=int, default=4096, help="tokens per printed rate (a multiple of 512)")
    parser.add_argument("--namm", default=None, help="NAMM folder (default: weights/default)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2048-token prompt, 1024-token windows")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.window = 2048, 1024
    if args.window % CHUNK or args.window <= 0:
        parser.error(f"--window must be a positive multiple of {CHUNK}")

    model, tokenizer, note = load_stretched(args.tokens + 64)
    prompt = document_prompt(tokenizer, default_document().read_text(), args.tokens)
    namm_mlx.attach(model, NAMM.load(args.namm or DEFAULT_NAMM_DIR), max_kv_size=args.max_kv_size)
    cache = make_prompt_cache(model)
    print(f"mlx {mx.__version__} on {mx.default_device()}; {len(prompt):,}-token prompt, "
          f"--max-kv-size {args.max_kv_size}, {CHUNK}-token chunks{note}")  # fmt: skip
    done, spent, window_start = 0, 0.0, 0
    for start in range(0, len(prompt), CHUNK):
        chunk = prompt[start : start + CHUNK]
        t0 = time.perf_counter()
        model(mx.array(chunk)[None], cache=cache)
        mx.eval([c.state for c in cache])
        spent += time.perf_counter() - t0
        done += len(chunk)
        if done - window_start >= args.window or done == len(prompt):
            kept = sum(c.length for c in cache) / len(cache)
            print(f"  tokens {window_start:6,d}-{done:6,d}: {(done - window_start) / spent:6.1f} tok/s, "
                  f"mean kept per layer {kept:,.0f}", flush=True)  # fmt: skip
            window_start, spent = done, 0.0


if __name__ == "__main__":
    main()
