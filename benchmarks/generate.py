"""Full cache vs NAMM eviction on a long document, measured in one run.

For the default model (SmolLM2-135M-Instruct) and a ~4k-token document, runs
stock mlx-lm ``stream_generate`` twice, once with mlx-lm's own KV cache and
once with a NAMM attached, and prints prefill and decode tokens/s, peak
memory, the bytes held by the caches and the share of wall time spent in NAMM
steps, with NAMM/full ratios.

Run:  python benchmarks/generate.py [--doc FILE] [--tokens 4096] [--namm DIR]
(on Linux preload OpenBLAS as the README says).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np

import namm_mlx
from namm_mlx import NAMM, EvictingKVCache
from namm_mlx.integration import DEFAULT_NAMM_DIR
from namm_mlx.models import load_model

REPO = Path(__file__).resolve().parents[1]
FIXTURE_NAMM = REPO.parent / "shared" / "fixtures" / "namm-reference" / "expected_conversion_tiny.safetensors"


def pick_namm(path: str | None) -> tuple[NAMM, str]:
    """The given NAMM, else the shipped default, else the reference fixture's vector."""
    if path:
        return NAMM.load(path), path
    default = DEFAULT_NAMM_DIR
    if (default / "namm.safetensors").exists():
        return NAMM.load(default), str(default)
    e = {k: np.asarray(v) for k, v in mx.load(str(FIXTURE_NAMM)).items()}
    return NAMM.from_flat(e["param_vector"], e["norm.mean"], e["norm.var"]), f"{FIXTURE_NAMM.name} (reference fixture)"


def document_prompt(tokenizer, doc: str, n_tokens: int) -> list[int]:
    """A chat prompt of about ``n_tokens``: the document (repeated or cut), then a question."""
    question = "\n\nSummarise the passage above in two sentences."
    body = tokenizer.encode(doc, add_special_tokens=False)
    while len(body) < n_tokens:
        body = body + body
    text = tokenizer.decode(body[: n_tokens - 64])
    messages = [{"role": "user", "content": text + question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


class StepTimer:
    """Times eviction steps only: the forward graph feeding a step is evaluated
    before the clock starts, so the time is the NAMM's own."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self._original = EvictingKVCache.evict

    def __enter__(self) -> "StepTimer":
        timer = self

        def timed_evict(cache: EvictingKVCache) -> None:
            mx.eval(cache.keys, cache.values, cache.queries)
            start = time.perf_counter()
            timer._original(cache)
            timer.seconds += time.perf_counter() - start
            timer.steps += 1

        EvictingKVCache.evict = timed_evict
        return self

    def __exit__(self, *exc) -> None:
        EvictingKVCache.evict = self._original


def run(model, tokenizer, prompt: list[int], max_tokens: int) -> dict:
    cache = model.make_cache() if hasattr(model, "make_cache") else mlx_lm.models.cache.make_prompt_cache(model)
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    with StepTimer() as timer:
        for response in mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=cache, prefill_step_size=512
        ):
            pass
    wall = time.perf_counter() - start
    kv_bytes = sum(c.kv_nbytes if isinstance(c, EvictingKVCache) else c.nbytes for c in cache)
    return {
        "prefill_tps": response.prompt_tps,
        "decode_tps": response.generation_tps,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "cache_mb": sum(c.nbytes for c in cache) / 1e6,
        "kv_mb": kv_bytes / 1e6,
        "namm_share": timer.seconds / wall,
        "steps": timer.steps,
        "wall": wall,
        "kept": np.mean([c.length / c.offset for c in cache if isinstance(c, EvictingKVCache)] or [1.0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", default=None, help="text file (default: the examples/ text)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--namm", default=None, help="NAMM folder (default: weights/default)")
    args = parser.parse_args()

    doc_path = Path(args.doc) if args.doc else next(iter(sorted((REPO / "examples").glob("*.txt"))))
    namm, namm_name = pick_namm(args.namm)
    model, tokenizer = load_model()
    prompt = document_prompt(tokenizer, doc_path.read_text(), args.tokens)
    print(f"mlx {mx.__version__} on {mx.default_device()}; SmolLM2-135M-Instruct; {len(prompt)}-token prompt "
          f"from {doc_path.name}; NAMM: {namm_name}")

    full = run(model, tokenizer, prompt, args.max_tokens)
    namm_mlx.attach(model, namm)
    evicted = run(model, tokenizer, prompt, args.max_tokens)

    rows = [
        ("prefill tok/s", "prefill_tps", "{:.1f}"),
        ("decode tok/s", "decode_tps", "{:.1f}"),
        ("peak memory GB", "peak_gb", "{:.3f}"),
        ("cache bytes MB (all state)", "cache_mb", "{:.1f}"),
        ("live K/V MB", "kv_mb", "{:.1f}"),
        ("kept fraction", "kept", "{:.3f}"),
        ("wall s", "wall", "{:.1f}"),
    ]
    print(f"\n{'':28s} {'full':>10s} {'NAMM':>10s} {'NAMM/full':>10s}")
    for label, key, fmt in rows:
        ratio = evicted[key] / full[key] if full[key] else float("nan")
        print(f"{label:28s} {fmt.format(full[key]):>10s} {fmt.format(evicted[key]):>10s} {ratio:10.2f}")
    print(f"{'NAMM steps (all layers)':28s} {'':>10s} {evicted['steps']:>10d}")
    print(f"{'time share of NAMM steps':28s} {'':>10s} {evicted['namm_share']:10.1%}")


if __name__ == "__main__":
    main()
