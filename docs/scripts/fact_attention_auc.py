"""Does the attention a fact receives from the document mark it? AUCs of fact tokens against the rest.

For training documents (seed 1000, never `namm eval`'s), the document runs once
through the full cache. On every third layer, for each KV head (query heads
GQA-averaged), every token's mean attention from the queries ``lo`` to ``hi``
tokens after it is computed, for several windows: right after the token is
read (its "burst") and later. The AUC says how well that number separates the
answer's own tokens from every other token (0.5: not at all; tokens in the
first 32 positions and those without a full window are left out). The same is
reported for ``-||key||`` (KNorm's signal). Printed per document: the mean over
layer-heads and the best single layer-head.

    python docs/scripts/fact_attention_auc.py --tasks needle,passkey,kjv_verse --length 2048 --limit 3
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from replayed_qa import answer_positions  # noqa: E402

WINDOWS = [(1, 8), (1, 32), (32, 128), (128, 512)]


def auc(x: np.ndarray, positive: np.ndarray) -> float:
    ranks = np.argsort(np.argsort(x))
    n1 = positive.sum()
    n0 = len(x) - n1
    if not n1 or not n0:
        return float("nan")
    return float((ranks[positive].sum() - n1 * (n1 - 1) / 2) / (n1 * n0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="needle,passkey,kjv_verse")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()

    from namm_mlx.eval.query_agnostic import split_prompt
    from namm_mlx.eval.tasks import TextSource, make_items
    from namm_mlx.hook import install_hook
    from namm_mlx.models import load_model
    from namm_mlx.recording import record_full_cache, recorded_layers

    model, tok = load_model(None, dtype="float32")
    install_hook()
    items = make_items(args.tasks.split(","), [args.length], args.limit, args.seed, TextSource.from_cache(), tok)
    totals = {w: [] for w in WINDOWS}
    knorm_total = []
    for item in items:
        doc = split_prompt(tok, item).document
        n = len(doc)
        facts = np.asarray(answer_positions(tok, doc, [str(a) for a in item["answers"]]))
        recorded = record_full_cache(model, doc, 512)
        layers, scale = recorded_layers(recorded), recorded[0].scale
        per_window = {w: [] for w in WINDOWS}
        knorm = []
        p = np.arange(n)
        label = np.isin(p, facts)
        for li in range(0, len(layers), 3):
            k, _, q = layers[li]
            heads, group = k.shape[1], q.shape[1] // k.shape[1]
            logits = (q[0] @ mx.repeat(k, group, axis=1)[0].transpose(0, 2, 1)) * scale
            probs = mx.softmax(logits + mx.triu(mx.full((n, n), -mx.inf), k=1), axis=-1)
            a = np.array(probs.reshape(heads, group, n, n).mean(1))  # [H, query, key]
            norms = np.linalg.norm(np.array(k[0]), axis=-1)  # [H, T]
            knorm += [auc(-norms[h][32:], label[32:]) for h in range(heads)]
            cumulative = np.concatenate([np.zeros((1, heads, n)), np.cumsum(a.transpose(1, 0, 2), axis=0)], 0)
            for lo, hi in WINDOWS:
                s0, s1 = np.minimum(p + lo, n), np.minimum(p + hi, n)
                mask = (p >= 32) & (p < n - hi)
                mean = (cumulative[s1, :, p] - cumulative[s0, :, p]) / np.maximum(s1 - s0, 1)[:, None]  # [T, H]
                per_window[(lo, hi)] += [auc(np.log(mean[mask, h] + 1e-9), label[mask]) for h in range(heads)]
            del a, probs
        cells = []
        for w in WINDOWS:
            values = np.array(per_window[w])
            if np.isnan(values).all():
                cells.append(f"q+{w[0]}..{w[1]}: -")
                continue
            cells.append(f"q+{w[0]}..{w[1]}: {np.nanmean(values):.3f} (best {np.nanmax(values):.2f})")
            totals[w].append(np.nanmean(values))
        knorm_total.append(np.mean(knorm))
        print(f"{item['_id']} facts {facts.min()}-{facts.max()} " + " ".join(cells) + f" -knorm {np.mean(knorm):.3f}",
              flush=True)
        del recorded, layers
        mx.clear_cache()
    print("mean " + " ".join(f"q+{w[0]}..{w[1]}: {np.mean(totals[w]):.3f}" for w in WINDOWS if totals[w])
          + f" -knorm {np.mean(knorm_total):.3f}")


if __name__ == "__main__":
    main()
