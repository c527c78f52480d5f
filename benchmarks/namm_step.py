"""What one NAMM step costs, part by part, next to the forward it follows.

For SmolLM2-135M-Instruct (the embedded default, float32) with ``N`` kept
tokens in every layer (2k, 4k, 8k, 16k), measures in one run:

* the forward of the 512 tokens that complete the block (stock ``KVCache``,
  fused attention; logits are not evaluated, as in mlx-lm's prefill), = 1.00;
* the step's parts (the mean of 5 calls on one layer times the 30 layers,
  which all have the same shapes), as ratios to that forward:
  probabilities (taken from the forward: the explicit attention's extra cost
  over the fused kernel; and, for comparison, recomputed from buffered
  queries as decoding steps do), features (STFT, EMA, normalisation,
  recency), BAM (over the NAMM's ``bam_window`` when it sets one), the key
  probe's marks (when it has a probe), selection/gather (kept count, per-head top-k, gather of
  K/V and carried state);
* end to end (up to 8k): the same forward on NAMM caches in which the step
  falls, over the plain forward; its transient memory (peak over what was
  live before it) next to the plain forward's and the bytes the step frees;
* up to 2k: features+BAM of all layers stacked in one call vs layer by layer.

Timings alternate between the variants and report medians, so the ratios
survive a noisy machine.

Run:  python benchmarks/namm_step.py [--sizes 2048,4096,8192,16384] [--repeats 3] [--quick]
(on Linux, preload OpenBLAS as the README says, or matmuls are ~30x slower).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

import namm_mlx
from namm_mlx import NAMM, EvictingKVCache, TokenState
from namm_mlx.attention import attention_probabilities, attention_with_probabilities
from namm_mlx.bam import bam_scores
from namm_mlx.hook import install_hook
from namm_mlx.integration import DEFAULT_NAMM_DIR
from namm_mlx.key_probe import layer_marks
from namm_mlx.models import load_model
from namm_mlx.selection import gather_tokens, protect_newest, shared_keep_count, top_k_in_order

BLOCK = 512
#: Largest cache for which the stacked-layers variant is also measured.
STACK_LIMIT = 2048
#: Calls of one layer's part per timing.
LAYER_SAMPLES = 5
#: Largest cache for which the whole forward with its step is also timed.
E2E_LIMIT = 8192


def median_times(fns: dict, repeats: int, warm_up: bool = True) -> dict[str, float]:
    """Median wall time of each function; one warm-up each (compiles kernels),
    then rounds that alternate between them (each must evaluate its outputs)."""
    for fn in fns.values() if warm_up else ():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class Shapes:
    """Random per-layer inputs with ``n_cached`` slots (the last 512 new)."""

    def __init__(self, model, n_cached: int, seed: int = 0) -> None:
        args = model.args
        self.layers = args.num_hidden_layers
        self.q_heads, self.kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        self.n_cached, self.n_old = n_cached, n_cached - BLOCK
        mx.random.seed(seed)
        shape = (1, self.kv_heads, self.n_old, self.head_dim)
        self.old_keys = [mx.random.normal(shape) for _ in range(self.layers)]
        self.old_values = [mx.random.normal(shape) for _ in range(self.layers)]
        # A document 3x longer than what is kept; kept positions ascending.
        self.offset = BLOCK * max(2, (3 * self.n_old) // BLOCK)
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(self.offset - 1, size=(self.kv_heads, self.n_old - 1), replace=False), axis=-1)
        picks = np.concatenate([picks, np.full((self.kv_heads, 1), self.offset - 1)], axis=-1)
        self.kept_positions = mx.array(picks[None].astype(np.int32))
        self.tail = mx.random.uniform(shape=(1, self.kv_heads, self.n_old, 16)) * 0.01
        self.ema = mx.random.uniform(shape=(1, self.kv_heads, self.n_old, 17)) * 0.05
        self.queries = mx.random.normal((1, self.q_heads, BLOCK, self.head_dim))
        self.keys = mx.random.normal((1, self.kv_heads, n_cached, self.head_dim))
        self.values = mx.random.normal((1, self.kv_heads, n_cached, self.head_dim))
        new = mx.broadcast_to(mx.arange(self.offset, self.offset + BLOCK, dtype=mx.int32), (1, self.kv_heads, BLOCK))
        self.positions = mx.concatenate([self.kept_positions, new], axis=-1)
        mx.eval(self.old_keys, self.old_values, self.kept_positions, self.tail, self.ema)
        mx.eval(self.queries, self.keys, self.values, self.positions)

    def full_caches(self) -> list[KVCache]:
        caches = []
        for k, v in zip(self.old_keys, self.old_values):
            c = KVCache()
            c.keys, c.values, c.offset = k, v, self.n_old
            caches.append(c)
        return caches

    def namm_caches(self, scorer) -> list[EvictingKVCache]:
        """Caches one block before a step: ``n_old`` kept slots, carried state."""
        caches = []
        for layer, (k, v) in enumerate(zip(self.old_keys, self.old_values)):
            c = EvictingKVCache(scorer, layer=layer)  # a key probe is per layer
            c.keys, c.values, c.length, c.offset = k, v, self.n_old, self.offset
            c.kept_positions, c.scorer_state = self.kept_positions, [self.tail, self.ema]
            c.last_step_offset, c.steps = self.offset, 1
            caches.append(c)
        return caches


def bench_size(model, namm: NAMM, n_cached: int, repeats: int, warm_up: bool = True) -> dict[str, float]:
    s = Shapes(model, n_cached)
    scale = s.head_dim**-0.5
    dtype = namm.config.attention_dtype
    tokens = mx.array(np.random.default_rng(1).integers(0, 49152, (1, BLOCK)).astype(np.int32))
    scorer = namm_mlx.integration.as_scorer(namm)
    attn = attention_probabilities(s.queries, s.keys, scale, dtype=dtype)
    carried = TokenState(s.kept_positions, s.tail, s.ema)
    features = namm.token_features(attn, s.positions, carried)
    scores = bam_scores(features.embedding, namm.weights, namm.config).scores
    mx.eval(attn, features.embedding, scores)
    layers = s.layers

    def forward(caches):
        model(tokens, cache=caches)  # logits stay lazy, as in mlx-lm's prefill
        mx.eval([c.state for c in caches])

    def per_layer(fn):
        """LAYER_SAMPLES calls of one layer's part (every layer has the same
        shapes): the time per call x layers, with the noise of a shared CPU
        averaged over several calls."""

        def run():
            for _ in range(LAYER_SAMPLES):
                mx.eval(fn())

        return run

    def select_gather():
        protected = protect_newest(scores)
        keep = shared_keep_count(protected, namm.config.threshold)
        kept = top_k_in_order(protected, keep)
        return [gather_tokens(a, kept) for a in (s.keys, s.values, s.positions, features.attn_tail, features.ema)]

    fns = {
        "forward": lambda: forward(s.full_caches()),
        "fused": per_layer(
            lambda: mx.fast.scaled_dot_product_attention(s.queries, s.keys, s.values, scale=scale, mask="causal")
        ),
        "explicit": per_layer(lambda: attention_with_probabilities(s.queries, s.keys, s.values, scale, dtype)),
        "recompute": per_layer(lambda: attention_probabilities(s.queries, s.keys, scale, dtype=dtype)),
        "features": per_layer(lambda: namm.token_features(attn, s.positions, carried).embedding),
        "bam": per_layer(lambda: bam_scores(features.embedding, namm.weights, namm.config).scores),
        "select": per_layer(select_gather),
    }
    if namm.key_probe is not None:
        probe, span = namm.key_probe[0], namm.config.key_probe_span
        fns["probe"] = per_layer(lambda: layer_marks(s.keys, probe, span))
    if n_cached <= E2E_LIMIT:  # BAM alone is ~4 minutes per forward at 16k on a 2-core CPU
        fns["forward+step"] = lambda: forward(s.namm_caches(scorer))
    if n_cached <= STACK_LIMIT:  # all layers' probabilities at once: 30x the memory
        stacked_attn = mx.broadcast_to(attn, (layers, *attn.shape))
        stacked_pos = mx.broadcast_to(s.positions, (layers, *s.positions.shape))
        stacked_state = TokenState(*(mx.broadcast_to(a, (layers, *a.shape)) for a in carried.arrays()))
        fns["stacked"] = lambda: mx.eval(namm.score(stacked_attn, stacked_pos, stacked_state)[0])
        fns["per-layer"] = lambda: [mx.eval(namm.score(attn, s.positions, carried)[0]) for _ in range(layers)]
    t = median_times(fns, repeats, warm_up)
    parts_of_one_layer = ("fused", "explicit", "recompute", "features", "bam", "probe", "select")
    t.update({k: v * layers / LAYER_SAMPLES for k, v in t.items() if k in parts_of_one_layer})
    fwd = t["forward"]
    parts = {
        "probabilities (from forward)": max(0.0, t["explicit"] - t["fused"]),
        "probabilities (recomputed)": t["recompute"],
        "features": t["features"],
        "BAM": t["bam"],
        **({"key probe marks": t["probe"]} if "probe" in t else {}),
        "selection/gather": t["select"],
    }

    # Memory: one forward on NAMM caches whose step falls in it, vs a plain one.
    if n_cached > E2E_LIMIT:
        print_parts(n_cached, s, layers, fwd, parts, t, None)
        return {"forward": fwd, **parts}
    caches = s.namm_caches(scorer)
    mx.clear_cache()
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    forward(caches)
    peak = mx.get_peak_memory() - active
    kept = int(np.mean([c.length for c in caches]))
    per_token = caches[0].kv_nbytes // kept + s.kv_heads * 4 * (1 + 16 + 17)  # K/V + position, tail, EMA
    freed = layers * (n_cached - kept) * per_token
    full = s.full_caches()
    mx.clear_cache()
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    forward(full)
    full_peak = mx.get_peak_memory() - active

    print_parts(n_cached, s, layers, fwd, parts, t, (peak, full_peak, freed, kept))
    return {"forward": fwd, **parts}


def print_parts(n_cached, s, layers, fwd, parts, t, memory) -> None:
    print(f"\n{n_cached:,} cached tokens ({s.n_old:,} kept + {BLOCK} new) x {layers} layers; "
          f"forward of {BLOCK} tokens {fwd:.2f} s = 1.00")  # fmt: skip
    for name, seconds in parts.items():
        print(f"  {name:30s} {seconds:8.3f} s  {seconds / fwd:6.3f} x forward")
    step = sum(v for k, v in parts.items() if k != "probabilities (recomputed)")
    print(f"  {'step (sum of the parts above)':30s} {step:8.3f} s  {step / fwd:6.3f} x forward")
    if "forward+step" in t:
        print(f"  {'forward with the step / forward':30s} {'':8s}    {t['forward+step'] / fwd:6.3f}")
    if "stacked" in t:
        print(f"  features+BAM, {layers} layers stacked in one call vs one call per layer: "
              f"{t['stacked'] / t['per-layer']:.2f}x the time")  # fmt: skip
    if memory is None:
        return
    peak, full_peak, freed, kept = memory
    print(f"  memory: forward+step peak {peak / 1e6:7.1f} MB over live (plain forward {full_peak / 1e6:7.1f} MB); "
          f"step freed {freed / 1e6:7.1f} MB (kept {kept:,.0f} of {n_cached:,})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2048,4096,8192,16384", help="kept tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1024 tokens, one repeat")
    parser.add_argument("--namm", default=None, help="NAMM folder (default: weights/default)")
    args = parser.parse_args()
    sizes = [1024] if args.quick else [int(x) for x in args.sizes.split(",")]
    repeats = 1 if args.quick else args.repeats
    namm = NAMM.load(args.namm or DEFAULT_NAMM_DIR)
    model, _ = load_model()
    install_hook()
    print(f"mlx {mx.__version__} on {mx.default_device()}; SmolLM2-135M-Instruct float32; "
          f"NAMM {args.namm or DEFAULT_NAMM_DIR}; medians of {repeats}")  # fmt: skip
    for i, n in enumerate(sizes):
        bench_size(model, namm, n, repeats, warm_up=i == 0)


if __name__ == "__main__":
    main()
