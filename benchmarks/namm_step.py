"""Cost of one NAMM step relative to the attention it rides on.

Prints, for each shape, the time of one NAMM step (token features + BAM +
selection + state gather, given GQA-averaged attention probabilities and a
carried state) divided by the time of one ``mx.fast.scaled_dot_product_attention``
call of the same layer (512 new queries against the whole cache). Both are
measured in the same run, so the ratio survives a noisy machine. A NAMM step
happens once per 512 tokens, so the amortised per-token overhead is the ratio
divided by the number of forward passes in that block (1 for a 512-token
prefill chunk, 512 during decoding).

Run:  python benchmarks/namm_step.py [--repeats 3] [--quick]
(on Linux, preload OpenBLAS as the README says, or matmuls are ~30x slower).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from namm_mlx import NAMM, NAMMConfig, TokenState
from namm_mlx.features import gqa_mean


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn`` (which must evaluate its own outputs)."""
    fn()  # warm-up: compiles kernels, grows the recency table
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_namm(config: NAMMConfig, seed: int = 0) -> NAMM:
    rng = np.random.default_rng(seed)
    return NAMM.from_flat(
        rng.normal(0, 0.5, config.param_size).astype(np.float32),
        rng.uniform(0.0, 0.05, config.n_bins),
        rng.uniform(1e-4, 1e-3, config.n_bins),
        config,
    )


def layer_inputs(kv_heads: int, q_heads: int, n_new: int, n_cached: int, head_dim: int, layers: int = 1):
    """Random probabilities/state for ``layers`` stacked layers with ``n_cached`` slots."""
    n_old = n_cached - n_new
    logits = mx.random.normal((layers, 1, q_heads, n_new, n_cached))
    causal = mx.arange(n_cached)[None, :] <= (n_old + mx.arange(n_new))[:, None]
    probs = mx.softmax(mx.where(causal, logits * 3, -mx.inf), axis=-1)
    attn = gqa_mean(probs, kv_heads, "bfloat16")
    positions = mx.broadcast_to(mx.arange(n_cached, dtype=mx.int32), (layers, 1, kv_heads, n_cached))
    carried = TokenState(
        positions[..., :n_old],
        mx.random.uniform(shape=(layers, 1, kv_heads, n_old, 16)) * 0.01,
        mx.random.uniform(shape=(layers, 1, kv_heads, n_old, 17)) * 0.05,
    )
    q = mx.random.normal((1, q_heads, n_new, head_dim)).astype(mx.float32)
    k = mx.random.normal((1, kv_heads, n_cached, head_dim)).astype(mx.float32)
    v = mx.random.normal((1, kv_heads, n_cached, head_dim)).astype(mx.float32)
    mx.eval(attn, carried.arrays(), q, k, v)
    return attn, positions, carried, (q, k, v)


def bench_shape(name: str, layers: int, q_heads: int, kv_heads: int, head_dim: int, n_cached: int, repeats: int):
    config = NAMMConfig()
    namm = random_namm(config)
    n_new = config.update_interval
    attn, positions, carried, (q, k, v) = layer_inputs(kv_heads, q_heads, n_new, n_cached, head_dim, layers)
    keys = mx.random.normal((1, kv_heads, n_cached, head_dim))
    mx.eval(keys)

    def sdpa_one_layer():
        mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5, mask="causal"))

    def recompute_probs_one_layer():
        """What the cache adds to capture NAMM's input: softmax(QK^T) + GQA mean."""
        scores = (q.reshape(1, kv_heads, q_heads // kv_heads, n_new, head_dim) * head_dim**-0.5) @ mx.swapaxes(
            k[:, :, None], -1, -2
        )
        causal = mx.arange(n_cached)[None, :] <= (n_cached - n_new + mx.arange(n_new))[:, None]
        probs = mx.softmax(mx.where(causal, scores, -mx.inf), axis=-1, precise=True)
        mx.eval(probs.astype(mx.bfloat16).astype(mx.float32).mean(axis=2))

    def namm_step_per_layer():
        for layer in range(layers):
            state = TokenState(*(a[layer] for a in carried.arrays()))
            result = namm.step(attn[layer], positions[layer], state)
            mx.eval(result.kept, result.state.arrays(), _gather(keys, result.kept))

    def namm_scores_stacked():
        scores, state, *_ = namm.score(attn, positions, carried)
        mx.eval(scores, state.arrays())

    t_sdpa = timed(sdpa_one_layer, repeats)
    t_probs = timed(recompute_probs_one_layer, repeats)
    t_step = timed(namm_step_per_layer, repeats) / layers
    print(f"\n{name}: {layers} layer(s), {q_heads}/{kv_heads} heads, head_dim {head_dim}, "
          f"{n_new} new queries, {n_cached} cached tokens")
    print(f"  sdpa (one layer)                 {t_sdpa * 1e3:9.2f} ms   = 1.00")
    print(f"  NAMM step (one layer)            {t_step * 1e3:9.2f} ms   = {t_step / t_sdpa:5.2f} x sdpa")
    print(f"  attention recompute (one layer)  {t_probs * 1e3:9.2f} ms   = {t_probs / t_sdpa:5.2f} x sdpa")
    if layers > 1:
        t_stacked = timed(namm_scores_stacked, repeats) / layers
        print(f"  NAMM scores, layers stacked      {t_stacked * 1e3:9.2f} ms/layer = {t_stacked / t_sdpa:5.2f} x sdpa")
    return t_step / t_sdpa


def _gather(keys: mx.array, kept: mx.array) -> mx.array:
    return mx.take_along_axis(keys, kept[..., None], axis=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="skip the 16k Llama shape")
    args = parser.parse_args()
    print(f"mlx {mx.__version__}, device {mx.default_device()}")
    bench_shape("Llama-3-8B layer", 1, 32, 8, 128, 4096, args.repeats)
    if not args.quick:
        bench_shape("Llama-3-8B layer", 1, 32, 8, 128, 16384, args.repeats)
    bench_shape("SmolLM2-135M", 30, 9, 3, 64, 4096, args.repeats)


if __name__ == "__main__":
    main()
