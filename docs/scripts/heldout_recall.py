"""Replayed future-attention recall of baselines and NAMMs on held-out documents.

The numbers behind docs/results.md's replayed-recall table and the choice of the
shipped NAMM. Each held-out document (seed 2000: neither namm eval's seed 0 nor
namm distill's 1000) runs once through the full cache; every policy then replays
the recorded keys and queries of every third layer at a fixed budget
(namm_mlx.eval.query_agnostic.replay_kept_sets). Results append to a JSONL file, so
an interrupted run resumes; recordings are cached beside it.

A NAMM whose layers mark facts by the mean of the probes of the layers below
(key_probe_layers "mean") needs every layer replayed: ``--every-layer``
records and replays all of them and still measures recall on every third
layer, so its rows compare with the others'. Per-layer policies keep the
same numbers on those layers either way.

    python docs/scripts/heldout_recall.py OUT.jsonl [NAME=NAMM_DIR,...] [LENGTHS] [ITEMS] [BUDGETS] [--every-layer] [--baselines tova,...]
    python docs/scripts/heldout_recall.py OUT.jsonl --summary [--also MORE.jsonl] [--gap A,B]
"""

import argparse
import dataclasses
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

BASELINES = ["h2o", "tova", "snapkv", "streaming", "knorm", "random"]
TASKS = ["needle", "multi_needle", "passkey", "kjv_verse", "chapter"]
LAYERS = list(range(1, 30, 3))
SEED = 2000


def summary(paths: list[Path], pair: list[str] | None = None) -> None:
    """The table of every (policy, budget) in ``paths``; with ``pair`` (A, B),
    B's recall minus A's instead, paired over the documents both ran."""
    from namm_mlx.eval.bootstrap import bootstrap_interval

    by = defaultdict(dict)
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            by[(r["policy"], r["budget"])][r["item"]] = r
    if pair:
        a, b = pair
        print(f"| budget | documents | {b} - {a} (95% interval) | documents where {b} is ahead |")
        print("|---|---|---|---|")
        for budget in sorted({k[1] for k in by}, key=str):
            items = sorted(set(by.get((a, budget), {})) & set(by.get((b, budget), {})))
            if not items:
                continue
            diff = [by[(b, budget)][i]["recall"] - by[(a, budget)][i]["recall"] for i in items]
            low, high = bootstrap_interval([diff])
            ahead = sum(d > 0 for d in diff)
            print(f"| {budget} | {len(items)} | {np.mean(diff):+.4f} ({low:+.4f} to {high:+.4f}) | {ahead} of {len(items)} |")
        return
    print("| policy | budget | documents | recall (95% interval) | recall at the document's end |")
    print("|---|---|---|---|---|")
    for (policy, budget), d in sorted(by.items(), key=lambda kv: (str(kv[0][1]), -np.mean([r["recall"] for r in kv[1].values()]))):
        recall = [r["recall"] for r in d.values()]
        final = [r["recall_final"] for r in d.values()]
        low, high = bootstrap_interval([recall])
        print(f"| {policy} | {budget} | {len(recall)} | {np.mean(recall):.3f} ({low:.3f}-{high:.3f}) | {np.mean(final):.3f} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Replayed future-attention recall on held-out documents.")
    parser.add_argument("out", type=Path, help="JSONL file (appended to, so a run resumes)")
    parser.add_argument("namms", nargs="?", default="", help="NAME=NAMM_DIR,...")
    parser.add_argument("lengths", nargs="?", default="3072")
    parser.add_argument("items", nargs="?", type=int, default=1, help="documents per task")
    parser.add_argument("budgets", nargs="?", default="0.25")
    parser.add_argument("--summary", action="store_true", help="print the table of OUT and exit")
    parser.add_argument("--also", type=Path, action="append", default=[],
                        help="with --summary: another results file read with OUT (repeatable)")
    parser.add_argument("--gap", help="with --summary: A,B prints B's recall minus A's, paired over documents")
    parser.add_argument("--every-layer", action="store_true",
                        help="record and replay all layers (recall still on every third)")
    parser.add_argument("--baselines", default=",".join(BASELINES), help="comma-separated rules to run ('' for none)")
    args = parser.parse_args()
    if (args.gap or args.also) and not args.summary:
        parser.error("--gap and --also read results; add --summary")
    if args.gap and len(args.gap.split(",")) != 2:
        parser.error("--gap takes two policies: A,B")
    return args


def main() -> None:
    args = parse_args()
    out = args.out
    if args.summary:
        return summary([out, *args.also], args.gap.split(",") if args.gap else None)
    from namm_mlx.cache import EvictingKVCache
    from namm_mlx.distill.record import item_tokens
    from namm_mlx.eval.query_agnostic import replay_kept_sets
    from namm_mlx.eval.recall import (KeptSnapshot, future_attention_from_caches, future_attention_recall,
                                      load_recording, save_recording)
    from namm_mlx.eval.tasks import TextSource, make_items
    from namm_mlx.models import load_model
    from namm_mlx.namm import NAMM
    from namm_mlx.policies import make_scorer
    from namm_mlx.recording import record_full_cache, recorded_layers

    namms = dict(a.split("=", 1) for a in args.namms.split(",")) if args.namms else {}
    lengths = [int(x) for x in args.lengths.split(",")]
    n_items = args.items
    budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",")]
    baselines = [b for b in args.baselines.split(",") if b]
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["item"], r["policy"], str(r["budget"])))
    model, tok = load_model(None, dtype="float32")
    replayed = list(range(len(model.layers))) if args.every_layer else LAYERS
    measured = [replayed.index(l) for l in LAYERS]
    recordings = out.parent / (out.stem + ("-all-recordings" if args.every_layer else "-recordings"))
    items = make_items(TASKS, lengths, n_items, SEED, TextSource.from_cache(), tok)
    loaded = {name: NAMM.load(path) for name, path in namms.items()}
    for item in items:
        todo = [(p, b) for p in baselines + list(loaded) for b in budgets if (item["_id"], p, str(b)) not in done]
        if not todo:
            continue
        cached = recordings / f"{item['_id']}.npz"
        if cached.exists():
            layers, scale, future = load_recording(cached)
            doc_length = future.doc_length
        else:
            tokens, doc_length = item_tokens(tok, item)
            caches = record_full_cache(model, tokens, 512, split=doc_length)
            recorded = recorded_layers(caches)
            layers = [recorded[l] for l in replayed]
            scale = caches[0].scale
            future = future_attention_from_caches(caches, doc_length, 512, replayed)
            del caches
            save_recording(cached, layers, scale, future)
        future = dataclasses.replace(future, block_sums=[future.block_sums[i] for i in measured],
                                     block_max=[future.block_max[i] for i in measured])
        for policy, budget in todo:
            size = budget if budget > 1 else math.ceil(budget * doc_length)
            scorer = make_scorer("namm", namm=loaded[policy], ranked=True) if policy in loaded else make_scorer(policy, interval=512)
            start = time.time()
            trace, _ = replay_kept_sets(layers, scale, lambda: EvictingKVCache(scorer, max_kv_size=int(size)),
                                        future.doc_length, layer_ids=replayed)
            r = future_attention_recall(future, [KeptSnapshot(s.offset, [s.kept[i] for i in measured]) for s in trace])
            record = {"item": item["_id"], "task": item["dataset"], "length": item["length"], "doc_length": doc_length,
                      "policy": policy, "budget": budget, "recall": r.mean, "recall_final": r.final,
                      "question_final": r.question_final, "per_layer": [float(x) for x in r.per_layer],
                      "per_step": r.per_step, "offsets": r.offsets, "seconds": time.time() - start}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(item["_id"], policy, budget, f"{r.mean:.3f} {r.final:.3f}", flush=True)


if __name__ == "__main__":
    main()
