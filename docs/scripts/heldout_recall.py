"""Replayed future-attention recall of baselines and NAMMs on held-out documents.

The numbers behind docs/results.md's replayed-recall table and the choice of the
shipped NAMM. Each held-out document (seed 2000: neither namm eval's seed 0 nor
namm distill's 1000) runs once through the full cache; every policy then replays
the recorded keys and queries of every third layer at a fixed budget
(namm_mlx.distill.evaluate.replay_recall). Results append to a JSONL file, so
an interrupted run resumes; recordings are cached beside it.

    python docs/scripts/heldout_recall.py OUT.jsonl [NAME=NAMM_DIR,...] [LENGTHS] [ITEMS] [BUDGETS]
    python docs/scripts/heldout_recall.py OUT.jsonl --summary
"""

import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

BASELINES = ["h2o", "tova", "snapkv", "streaming", "knorm", "random"]
TASKS = ["needle", "multi_needle", "passkey", "kjv_verse", "chapter"]
LAYERS = list(range(1, 30, 3))
SEED = 2000


def summary(path: Path) -> None:
    from namm_mlx.eval.bootstrap import bootstrap_interval

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by = defaultdict(dict)
    for r in rows:
        by[(r["policy"], r["budget"])][r["item"]] = r
    print("| policy | budget | documents | recall (95% interval) | recall at the document's end |")
    print("|---|---|---|---|---|")
    for (policy, budget), d in sorted(by.items(), key=lambda kv: (str(kv[0][1]), -np.mean([r["recall"] for r in kv[1].values()]))):
        recall = [r["recall"] for r in d.values()]
        final = [r["recall_final"] for r in d.values()]
        low, high = bootstrap_interval([recall])
        print(f"| {policy} | {budget} | {len(recall)} | {np.mean(recall):.3f} ({low:.3f}-{high:.3f}) | {np.mean(final):.3f} |")


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2:3] == ["--summary"]:
        return summary(out)
    from namm_mlx.cache import EvictingKVCache
    from namm_mlx.distill.evaluate import replay_recall
    from namm_mlx.distill.record import item_tokens
    from namm_mlx.eval.recall import future_attention_from_caches, load_recording, save_recording
    from namm_mlx.eval.tasks import TextSource, make_items
    from namm_mlx.models import load_model
    from namm_mlx.namm import NAMM
    from namm_mlx.policies import make_scorer
    from namm_mlx.recording import record_full_cache, recorded_layers

    namms = dict(a.split("=", 1) for a in sys.argv[2].split(",")) if len(sys.argv) > 2 and sys.argv[2] else {}
    lengths = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "3072").split(",")]
    n_items = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    budgets = [float(b) if "." in b else int(b) for b in (sys.argv[5] if len(sys.argv) > 5 else "0.25").split(",")]
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["item"], r["policy"], str(r["budget"])))
    model, tok = load_model(None, dtype="float32")
    items = make_items(TASKS, lengths, n_items, SEED, TextSource.from_cache(), tok)
    loaded = {name: NAMM.load(path) for name, path in namms.items()}
    for item in items:
        todo = [(p, b) for p in BASELINES + list(loaded) for b in budgets if (item["_id"], p, str(b)) not in done]
        if not todo:
            continue
        cached = out.parent / (out.stem + "-recordings") / f"{item['_id']}.npz"
        if cached.exists():
            layers, scale, future = load_recording(cached)
            doc_length = future.doc_length
        else:
            tokens, doc_length = item_tokens(tok, item)
            caches = record_full_cache(model, tokens, 512, split=doc_length)
            layers = [recorded_layers(caches)[l] for l in LAYERS]
            scale = caches[0].scale
            future = future_attention_from_caches(caches, doc_length, 512, LAYERS)
            del caches
            save_recording(cached, layers, scale, future)
        for policy, budget in todo:
            size = budget if budget > 1 else math.ceil(budget * doc_length)
            scorer = make_scorer("namm", namm=loaded[policy], ranked=True) if policy in loaded else make_scorer(policy, interval=512)
            start = time.time()
            r = replay_recall(layers, scale, future, lambda: EvictingKVCache(scorer, max_kv_size=int(size)), layer_ids=LAYERS)
            record = {"item": item["_id"], "task": item["dataset"], "length": item["length"], "doc_length": doc_length,
                      "policy": policy, "budget": budget, "recall": r.mean, "recall_final": r.final,
                      "question_final": r.question_final, "per_layer": [float(x) for x in r.per_layer],
                      "per_step": r.per_step, "offsets": r.offsets, "seconds": time.time() - start}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(item["_id"], policy, budget, f"{r.mean:.3f} {r.final:.3f}", flush=True)


if __name__ == "__main__":
    main()
