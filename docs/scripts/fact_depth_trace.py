"""Which eviction step drops a planted fact, by the fact's depth in the document.

Each item's document (seed 0: `namm eval`'s items) runs once through the full
cache while every layer's keys, values and queries are recorded; each policy
then replays the recording at 50% of the document (steps every 512 tokens and
at the document's end, query-agnostic, as `docs/scripts/replayed_qa.py` does).
After every step it records the share of the answer's own tokens that each
(layer, KV head) still holds (``kept``), the share of (layer, head) pairs that
hold all of them (``whole``), and ``kept`` per layer. Rows append to a JSONL
file (resumable, one per item and policy).

Policies: the baselines by name, a NAMM as NAME (``--namm NAME=DIR``), and on
any of them ``+rW`` (the W newest tokens always kept) or ``+kA`` (the policy's
per-head z-scored score plus A times the z-scored ``-log ||key||``, a hand-made
mix of the NAMM with KNorm's signal).

    python docs/scripts/fact_depth_trace.py OUT.jsonl --tasks needle,passkey --length 4096 --limit 2 \
        --policies shipped,h2o,tova,knorm --namm shipped=weights/default
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from replayed_qa import answer_positions, recent_protected  # noqa: E402


def with_key_norm(scorer, weight: float):
    """The policy's per-head z-scored score plus ``weight`` x the NAMM key-norm
    input (``namm_mlx.features.key_norm_feature``)."""
    from namm_mlx.features import key_norm_feature

    inner = scorer.score

    def z(x):
        x = x.astype(mx.float32)
        m = x.mean(-1, keepdims=True)
        return (x - m) / (mx.sqrt(((x - m) ** 2).mean(-1, keepdims=True)) + 1e-6)

    def score(context):
        s = inner(context)
        finite = mx.isfinite(s.scores)
        base = z(mx.where(finite, s.scores, 0.0))
        mixed = base + weight * key_norm_feature(context.keys)[..., 0]
        return dataclasses.replace(s, scores=mx.where(finite, mixed, s.scores))

    scorer.score = score
    return scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", default="needle,passkey")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--limit", type=int, default=2, help="items per task (item i: depth 0.1, 0.5, 0.9, 0.3, 0.7)")
    parser.add_argument("--policies", default="h2o,tova,knorm")
    parser.add_argument("--namm", default="", help="NAME=DIR,...")
    parser.add_argument("--budget", type=float, default=0.5)
    args = parser.parse_args()

    from namm_mlx.cache import EvictingKVCache
    from namm_mlx.eval.query_agnostic import replay_kept_sets, split_prompt
    from namm_mlx.eval.tasks import TextSource, make_items
    from namm_mlx.hook import install_hook
    from namm_mlx.models import load_model
    from namm_mlx.namm import NAMM
    from namm_mlx.policies import make_scorer
    from namm_mlx.recording import record_full_cache, recorded_layers

    namms = {k: NAMM.load(v) for k, v in (a.split("=", 1) for a in args.namm.split(",") if a)}
    policies = [p for p in args.policies.split(",") if p]
    done = set()
    if args.out.exists():
        done = {(r["item"], r["policy"]) for r in map(json.loads, args.out.read_text().splitlines()) if r}
    model, tok = load_model(None, dtype="float32")
    items = make_items(args.tasks.split(","), [args.length], args.limit, 0, TextSource.from_cache(), tok)
    install_hook()
    for item in items:
        todo = [p for p in policies if (item["_id"], p) not in done]
        if not todo:
            continue
        split = split_prompt(tok, item)
        n = len(split.document)
        facts = np.asarray(answer_positions(tok, split.document, [str(a) for a in item["answers"]]))
        recorded = record_full_cache(model, split.document, 512)
        layers, scale = recorded_layers(recorded), recorded[0].scale
        del recorded
        size = math.ceil(args.budget * n)
        for policy in todo:
            base, options = policy.split("+")[0], policy.split("+")[1:]
            if base in namms:
                scorer = make_scorer("namm", namm=namms[base], ranked=True)
            else:
                scorer = make_scorer(base, interval=512)
            for option in options:
                if option[0] == "r":
                    scorer = recent_protected(scorer, int(option[1:]))
                elif option[0] == "k":
                    scorer = with_key_norm(scorer, float(option[1:]))
            start = time.time()
            trace, caches = replay_kept_sets(layers, scale, lambda: EvictingKVCache(scorer, max_kv_size=size), n)
            steps = []
            for snap in trace:
                held = [[np.isin(facts, head) for head in layer] for layer in snap.kept]
                steps.append({
                    "offset": snap.offset,
                    "kept": float(np.mean([h.mean() for layer in held for h in layer])),
                    "whole": float(np.mean([h.all() for layer in held for h in layer])),
                    "per_layer": [float(np.mean([h.mean() for h in layer])) for layer in held],
                })
            row = {"item": item["_id"], "policy": policy, "doc": n, "fact_pos": [int(facts.min()), int(facts.max())],
                   "steps": steps}
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{item['_id']} {policy} {time.time() - start:.0f}s "
                  + " ".join(f"{s['offset']}:{s['kept']:.2f}/{s['whole']:.2f}" for s in steps), flush=True)
            del caches
        del layers
        mx.clear_cache()


if __name__ == "__main__":
    main()
