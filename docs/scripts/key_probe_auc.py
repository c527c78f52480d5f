"""Does a token's key say that it is a fact? Held-out AUCs of a linear probe on key features.

The cached keys are rotated by RoPE, so their raw coordinates depend on the
position; the magnitude of each rotated pair does not. For every layer and KV
head, a ridge probe (class-balanced, on standardised log pair magnitudes) is
fitted on training documents (seed 1000) to separate the answer's own tokens
from the rest, and scored by AUC on held-out documents (seed 2000), against
``-||k||`` (KNorm's signal). A second probe per task is fitted without that
task's documents, so a probe that only learned "digits" shows it.

    python docs/scripts/key_probe_auc.py --tasks needle,passkey,kjv_verse,multi_needle,chapter --length 2048
"""

import argparse
import pickle
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from fact_attention_auc import auc  # noqa: E402
from replayed_qa import answer_positions  # noqa: E402

SKIP = 32  # sink and document-start tokens are left out of every AUC


def pair_magnitudes(keys: np.ndarray, traditional: bool) -> np.ndarray:
    """keys [H, T, d] -> log magnitudes of the d/2 RoPE-rotated pairs [H, T, d/2]."""
    d = keys.shape[-1]
    a, b = (keys[..., 0::2], keys[..., 1::2]) if traditional else (keys[..., : d // 2], keys[..., d // 2 :])
    return np.log(np.sqrt(a * a + b * b) + 1e-6)


def documents(args, seed, limit, model, tok):
    from mlx_lm.models.cache import make_prompt_cache

    from namm_mlx.eval.query_agnostic import split_prompt
    from namm_mlx.eval.tasks import TextSource, make_items

    traditional = bool(getattr(model.layers[0].self_attn.rope, "traditional", False))
    items = make_items(args.tasks.split(","), [args.length], limit, seed, TextSource.from_cache(), tok)
    for item in items:
        doc = split_prompt(tok, item).document
        facts = answer_positions(tok, doc, [str(a) for a in item["answers"]])
        cache = make_prompt_cache(model)
        for s in range(0, len(doc), 512):
            model(mx.array(doc[s : s + 512])[None], cache=cache)
            mx.eval([c.state for c in cache])
        n = len(doc)
        feats = [pair_magnitudes(np.array(c.keys[0, :, :n].astype(mx.float32)), traditional) for c in cache]
        norms = [np.linalg.norm(np.array(c.keys[0, :, :n].astype(mx.float32)), axis=-1) for c in cache]
        label = np.isin(np.arange(n), facts)
        yield item["dataset"], feats, norms, label


def fit_probe(x: np.ndarray, y: np.ndarray, ridge: float = 1.0):
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = np.where(y, 0.5 / max(y.sum(), 1), 0.5 / max((~y).sum(), 1))
    z1 = np.concatenate([z, np.ones((len(z), 1))], 1)
    a = (z1 * w[:, None]).T @ z1 + ridge * np.eye(z1.shape[1]) / len(z)
    coef = np.linalg.solve(a, (z1 * w[:, None]).T @ np.where(y, 1.0, -1.0))
    return lambda t: np.concatenate([(t - mu) / sd, np.ones((len(t), 1))], 1) @ coef


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="needle,passkey,kjv_verse,multi_needle,chapter")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--train", type=int, default=4, help="training items per task (seed 1000)")
    parser.add_argument("--test", type=int, default=2, help="held-out items per task (seed 2000)")
    parser.add_argument("--save", help="pickle the documents' key features here (for --load)")
    parser.add_argument("--load", help="reuse features pickled by --save instead of running the model")
    args = parser.parse_args()
    if args.load:
        with open(args.load, "rb") as f:
            train, test = pickle.load(f)
        report(train, test)
        return

    from namm_mlx.models import load_model

    model, tok = load_model(None, dtype="float32")
    train = list(documents(args, 1000, args.train, model, tok))
    test = list(documents(args, 2000, args.test, model, tok))
    if args.save:
        with open(args.save, "wb") as f:
            pickle.dump((train, test), f)
    report(train, test)


def zscored(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def report(train, test) -> None:
    print(f"{len(train)} training and {len(test)} held-out documents", flush=True)
    layers, heads = len(train[0][1]), train[0][1][0].shape[0]

    def stack(docs, layer, head, exclude=None):
        keep = [d for d in docs if d[0] != exclude]
        x = np.concatenate([d[1][layer][head][SKIP:] for d in keep])
        y = np.concatenate([d[3][SKIP:] for d in keep])
        return x, y

    tasks = sorted({d[0] for d in test})
    kinds = ("probe", "probe, task left out", "shared probe", "-knorm")
    # One probe for every layer and head, on features z-scored per document and head.
    shared_x = np.concatenate([zscored(d[1][l][h][SKIP:]) for d in train for l in range(layers) for h in range(heads)])
    shared_y = np.concatenate([d[3][SKIP:] for d in train for l in range(layers) for h in range(heads)])
    shared = fit_probe(shared_x, shared_y)
    rows = {}
    for layer in range(layers):
        for head in range(heads):
            everything = fit_probe(*stack(train, layer, head))
            for task in tasks:
                left_out = fit_probe(*stack(train, layer, head, exclude=task))
                for d in (d for d in test if d[0] == task):
                    y = d[3][SKIP:]
                    x = d[1][layer][head][SKIP:]
                    for kind, s in zip(kinds, (everything(x), left_out(x), shared(zscored(x)), -d[2][layer][head][SKIP:])):
                        rows.setdefault((task, kind), []).append((layer, head, auc(s, y)))
    for task in tasks:
        for kind in kinds:
            values = np.array([r[2] for r in rows[(task, kind)]])
            per_layer = np.nanmean(values.reshape(-1, layers * heads), 0).reshape(layers, heads).mean(1)
            best = int(np.argmax(per_layer))
            print(f"{task:13s} {kind:20s} mean {np.nanmean(values):.3f} best layer {best} {per_layer[best]:.3f} "
                  f"layers>0.9: {int((per_layer > 0.9).sum())}/{layers}", flush=True)
    for kind in kinds:
        print(f"all           {kind:20s} mean {np.nanmean([r[2] for t in tasks for r in rows[(t, kind)]]):.3f}")


if __name__ == "__main__":
    main()
