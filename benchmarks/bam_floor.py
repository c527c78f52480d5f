"""The floor under a NAMM step's cost: the reference BAM's attention against the forward it follows.

A step scores every kept token with the BAM, whose attention is over the kept
tokens themselves (each attends to itself and every newer one), so it costs
O(N^2) per KV head, while the 512-token forward's attention costs
O(512 * N) per query head. For SmolLM2-135M (9 query heads, 3 KV heads, 30
layers) at N = 4,096 the BAM computes about 1.5x the forward's attention
logits. This prints, for the default model in float32, the forward of 512
tokens after 3,584 cached ones (stock mlx-lm cache) and the BAM attention of
3 heads x 4,096 tokens times 30 layers, and their ratio: the step can cost no
less than that ratio unless the BAM itself changes. ``--windows`` adds the
same ratio for a windowed BAM (``NAMMConfig.bam_window``: each token sees only
the W tokens from it on), whose cost grows as N x W.

Run:  python benchmarks/bam_floor.py [--windows 256,128]   (on Linux, preload OpenBLAS as the README says)
"""

import argparse
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from namm_mlx.bam import backward_attention
from namm_mlx.models import load_model

CACHED, BLOCK, BAM_WIDTH, REPEATS = 3584, 512, 32, 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", default="", help="BAM windows to time too (comma-separated tokens)")
    windows = [0] + [int(w) for w in parser.parse_args().windows.split(",") if w]
    model, _ = load_model(None, dtype="float32")
    cache = make_prompt_cache(model)
    tokens = mx.random.randint(100, 40000, (1, CACHED + BLOCK))
    for start in range(0, CACHED, BLOCK):
        model(tokens[:, start : start + BLOCK], cache=cache)
        mx.eval([c.state for c in cache])

    def forward() -> None:
        for c in cache:
            c.offset = CACHED  # rewind, so every call appends the same block
        model(tokens[:, CACHED:], cache=cache)  # logits stay unevaluated, as in mlx-lm's prefill
        mx.eval([c.state for c in cache])

    forward()
    start = time.perf_counter()
    for _ in range(REPEATS):
        forward()
    forward_s = (time.perf_counter() - start) / REPEATS

    n, heads, layers = CACHED + BLOCK, cache[0].keys.shape[1], len(cache)
    q, k, v = (mx.random.normal((1, heads, n, BAM_WIDTH)) for _ in range(3))
    print(f"forward of {BLOCK} tokens after {CACHED:,} cached: {forward_s:.2f} s")
    for window in windows:
        mx.eval(q, k, v, backward_attention(q, k, v, window))
        start = time.perf_counter()
        for _ in range(REPEATS):
            mx.eval(backward_attention(q, k, v, window))
        bam_s = (time.perf_counter() - start) / REPEATS * layers
        name = f"window {window}" if window else "every newer token (reference)"
        print(f"BAM attention, {heads} heads x {n:,} tokens x {layers} layers, {name}: {bam_s:.2f} s, "
              f"{bam_s / forward_s:.2f}x the forward")


if __name__ == "__main__":
    main()
