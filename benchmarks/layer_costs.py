"""Where one layer's 512-token forward spends its time as the cache grows.

A capped cache bounds the cost per token, but how much that cost still
depends on how many tokens are kept is set by one layer's split between the
parts that do not see the cache (projections and MLP, fixed per token) and
attention (proportional to the keys). For SmolLM2-135M-Instruct's layer 0
(float32, its real weights) and 512 new queries over ``N`` keys (the newest
512 among them), this measures in one run, as medians of alternating calls:

* the projections and MLP of the 512 tokens (the part that does not grow), = 1.00;
* the fused attention (``mx.fast.scaled_dot_product_attention``, causal);
* the explicit attention that also returns the NAMM's probabilities;
* inside it: the ``Q K^T`` matmul, the softmax, ``P V``;
* one ``exp`` and one ``add`` over the same number of logits, which says
  whether the softmax costs what its arithmetic should on this machine;
* the explicit attention with each quarter of the query rows given only the
  keys it can see (no softmax over the masked corner of the new block), and
  how far its output is from the fused kernel's: the saving, and what it
  costs in exactness (the shipped attention equals the fused kernel's bit for
  bit on the CPU, which recordings rely on);

then a least-squares line ``forward(N) = a + b N`` through the explicit
attention plus the fixed part, and what that line predicts for a
``--max-kv-size`` run's rate at a mean cache of ``--steady`` keys against one
at ``--ramp`` keys (the mean over a run that starts from an empty cache).

Run:  python benchmarks/layer_costs.py [--keys 512,1024,2048,4096] [--repeats 5] [--quick]
(on Linux, preload OpenBLAS as the README says).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from namm_mlx.attention import _causal_probs, attention_with_probabilities
from namm_mlx.features import gqa_mean
from namm_mlx.models import load_model

BLOCK = 512
#: Row blocks of the trimmed variant: a quarter of the rows each.
TRIM_BLOCKS = 4


def median_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, one warm-up each, then rounds
    that alternate between them so a noisy machine hits all alike."""
    for fn in fns.values():
        mx.eval(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            mx.eval(fn())
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def fixed_part(layer, x: mx.array):
    """The layer's work that does not depend on the cache: norms, Q/K/V/O
    projections and the MLP (attention replaced by its input)."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    h = x + attn.o_proj(q)
    return h + layer.mlp(layer.post_attention_layernorm(h)), k, v


def trimmed_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> tuple[mx.array, mx.array]:
    """The explicit attention, each block of rows over only the keys it sees
    (its probabilities padded back to every key for the scorer)."""
    B, Hq, L, D = q.shape
    H, N = k.shape[1], k.shape[2]
    qg = (q * scale).reshape(B, H, Hq // H, L, D)
    size = -(-L // TRIM_BLOCKS)
    outputs, means = [], []
    for start in range(0, L, size):
        stop = min(L, start + size)
        seen = N - L + stop
        probs = _causal_probs(qg[..., start:stop, :], k[:, :, :seen], N - L + start)
        outputs.append((probs @ v[:, :, None, :seen]).reshape(B, Hq, stop - start, D))
        mean = gqa_mean(probs.reshape(B, Hq, stop - start, seen), H, "float32")
        means.append(mx.pad(mean, [(0, 0), (0, 0), (0, 0), (0, N - seen)]))
    return mx.concatenate(outputs, axis=2), mx.concatenate(means, axis=2)


def measure(model, keys: int, repeats: int) -> dict[str, float]:
    args = model.args
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    dim = args.head_dim or args.hidden_size // heads
    scale = dim**-0.5
    mx.random.seed(keys)
    x = mx.random.normal((1, BLOCK, args.hidden_size))
    q = mx.random.normal((1, heads, BLOCK, dim))
    k = mx.random.normal((1, kv_heads, keys, dim))
    v = mx.random.normal((1, kv_heads, keys, dim))
    group = heads // kv_heads
    qg = (q * scale).reshape(1, kv_heads, group, BLOCK, dim)
    logits = qg @ mx.swapaxes(k[:, :, None], -1, -2)
    probs = mx.softmax(logits, axis=-1, precise=True)
    mx.eval(x, q, k, v, logits, probs)
    layer = model.layers[0]
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    explicit = attention_with_probabilities(q, k, v, scale)
    trimmed = trimmed_attention(q, k, v, scale)
    deviation = {
        "explicit_vs_fused": mx.abs(explicit[0] - fused).max().item(),
        "trimmed_vs_fused": mx.abs(trimmed[0] - fused).max().item(),
    }
    times = median_ms(
        {
            "fixed": lambda: fixed_part(layer, x),
            "fused": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"),
            "explicit": lambda: attention_with_probabilities(q, k, v, scale),
            "trimmed": lambda: trimmed_attention(q, k, v, scale),
            "QK^T": lambda: qg @ mx.swapaxes(k[:, :, None], -1, -2),
            "softmax": lambda: mx.softmax(logits, axis=-1, precise=True),
            "PV": lambda: probs @ v[:, :, None],
            "exp": lambda: mx.exp(logits),
            "add": lambda: logits + 1.0,
        },
        repeats,
    )
    return {**times, **deviation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default="512,1024,2048,4096", help="keys per layer (kept + the 512 new), comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steady", type=float, default=1860.0, help="mean keys per chunk of a long run past its ramp (kept + 512 new; prefill_chunks.py prints the kept)")
    parser.add_argument("--ramp", type=float, default=1450.0, help="mean keys per chunk of a short run that starts from an empty cache, ramp included")
    parser.add_argument("--quick", action="store_true", help="smoke test: 512 and 1024 keys, one repeat")
    args = parser.parse_args()
    sizes = [512, 1024] if args.quick else [int(n) for n in args.keys.split(",")]
    repeats = 1 if args.quick else args.repeats
    if min(sizes) < BLOCK:
        parser.error(f"--keys must be at least {BLOCK} (the new block is among them)")

    model, _ = load_model()
    heads = model.args.num_attention_heads
    print(f"mlx {mx.__version__} on {mx.default_device()}; SmolLM2-135M-Instruct layer 0, float32; "
          f"{BLOCK} queries; medians of {repeats}; ratios to the layer's fixed part (projections + MLP)")  # fmt: skip
    rows = []
    header = (f"{'keys':>6} | {'fixed ms':>8} | {'fused':>6} | {'explicit':>8} | {'QK^T':>6} | {'softmax':>7} | {'PV':>6} | "
              f"{'ns/exp':>6} | {'ns/add':>6} | {'trimmed':>7} | {'max |out - fused|':>17}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for n in sizes:
        t = measure(model, n, repeats)
        logits = heads * BLOCK * n
        rows.append((n, t))
        f = t["fixed"]
        print(f"{n:6d} | {f:8.1f} | {t['fused'] / f:6.2f} | {t['explicit'] / f:8.2f} | {t['QK^T'] / f:6.2f} | "
              f"{t['softmax'] / f:7.2f} | {t['PV'] / f:6.2f} | {1e6 * t['exp'] / logits:6.2f} | {1e6 * t['add'] / logits:6.2f} | "
              f"{t['trimmed'] / f:7.2f} | {t['explicit_vs_fused']:.0e} / {t['trimmed_vs_fused']:.0e} trimmed",
              flush=True)  # fmt: skip
    if len(rows) < 2:
        return
    n = np.array([r[0] for r in rows], dtype=np.float64)
    total = np.array([r[1]["fixed"] + r[1]["explicit"] for r in rows])
    b, a = np.polyfit(n, total, 1)
    print(f"\nlayer forward with the explicit attention ~ {a:.1f} ms + {b * 1e3:.1f} us x keys "
          f"(at 2,048 keys the part that grows with the keys is {b * 2048 / (a + b * 2048):.0%} of it)")  # fmt: skip
    ratio = (a + b * args.ramp) / (a + b * args.steady)
    print(f"predicted rate with a mean of {args.steady:,.0f} keys per chunk over the rate with a mean of "
          f"{args.ramp:,.0f}: {ratio:.2f} (below 1 for any per-key cost above 0)")  # fmt: skip


if __name__ == "__main__":
    main()
