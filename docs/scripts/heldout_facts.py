"""Fact-token survival and recall of baselines and NAMMs on the held-out 3k documents.

Reuses the recordings of heldout_recall.py (10 layers: 1, 4, ..., 28; seed 2000).
For each policy and budget the recorded layers are replayed as in
heldout_recall.py; at the document's end it reports the share of the answer's
own tokens in the document that each (layer, KV head) kept (``fact_kept``), the
share of (layer, head) pairs that kept all of them (``fact_whole``), and the
future-attention recall. A cheap, dense proxy for "will it still answer":
rows append to a JSONL file (resumable).

    python docs/scripts/heldout_facts.py OUT.jsonl NAME=NAMM_DIR,... [BUDGETS] [POLICIES]
    python docs/scripts/heldout_facts.py OUT.jsonl --summary
"""

import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from heldout_recall import LAYERS, SEED, TASKS  # noqa: E402
from replayed_qa import answer_positions, fact_survival  # noqa: E402

RECORDINGS = Path(__file__).parents[1] / "recall-heldout-3k-recordings"


def summary(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by = defaultdict(list)
    for r in rows:
        by[(str(r["budget"]), r["policy"])].append(r)
    print("| budget | policy | documents | fact tokens kept | fact whole | recall |")
    print("|---|---|---|---|---|---|")
    for (budget, policy), rs in sorted(by.items(), key=lambda kv: (kv[0][0], -np.mean([r["fact_kept"] for r in kv[1]]))):
        print(f"| {budget} | {policy} | {len(rs)} | {np.mean([r['fact_kept'] for r in rs]):.3f} | "
              f"{np.mean([r['fact_whole'] for r in rs]):.3f} | {np.mean([r['recall'] for r in rs]):.3f} |")


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2:3] == ["--summary"]:
        return summary(out)
    from namm_mlx.cache import EvictingKVCache
    from namm_mlx.eval.query_agnostic import replay_kept_sets
    from namm_mlx.eval.recall import future_attention_recall, load_recording
    from namm_mlx.eval.tasks import TextSource, make_items
    from namm_mlx.models import load_model
    from namm_mlx.namm import NAMM
    from namm_mlx.policies import make_scorer
    from namm_mlx.distill.record import item_tokens

    namms = {k: NAMM.load(v) for k, v in (a.split("=", 1) for a in sys.argv[2].split(",") if a)}
    budgets = [float(b) if "." in b else int(b) for b in (sys.argv[3] if len(sys.argv) > 3 else "0.25").split(",")]
    baselines = [p for p in (sys.argv[4] if len(sys.argv) > 4 else "h2o,tova,snapkv").split(",") if p]
    done = set()
    if out.exists():
        done = {(r["item"], r["policy"], str(r["budget"])) for r in map(json.loads, out.read_text().splitlines())}
    _, tok = load_model(None, dtype="float32")
    items = make_items(TASKS, [3072], 1, SEED, TextSource.from_cache(), tok)
    for item in items:
        todo = [(p, b) for p in baselines + list(namms) for b in budgets if (item["_id"], p, str(b)) not in done]
        if not todo:
            continue
        layers, scale, future = load_recording(RECORDINGS / f"{item['_id']}.npz")
        doc_length = future.doc_length
        tokens, _ = item_tokens(tok, item)
        facts = answer_positions(tok, tokens[:doc_length], [str(a) for a in item["answers"]])
        for policy, budget in todo:
            size = int(budget if budget > 1 else math.ceil(budget * doc_length))
            scorer = make_scorer("namm", namm=namms[policy], ranked=True) if policy in namms else make_scorer(policy, interval=512)
            start = time.time()
            make = lambda: EvictingKVCache(scorer, max_kv_size=size)  # noqa: E731
            trace, caches = replay_kept_sets(layers, scale, make, doc_length, layer_ids=LAYERS)
            kept, whole = fact_survival(caches, facts)
            r = future_attention_recall(future, trace)
            row = {"item": item["_id"], "task": item["dataset"], "policy": policy, "budget": budget, "facts": len(facts),
                   "fact_kept": kept, "fact_whole": whole, "recall": r.mean, "recall_final": r.final,
                   "seconds": round(time.time() - start, 1)}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(item["_id"], policy, budget, f"facts {kept:.3f}/{whole:.3f} recall {r.mean:.3f}", flush=True)


if __name__ == "__main__":
    main()
