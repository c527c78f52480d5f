"""Which tokens one policy keeps and another drops, and how much later attention they carry.

Recall says how much of the later attention a policy keeps; this says where a
difference between two policies comes from. One item's recording (as
``replayed_qa.py --recordings`` writes it) is replayed through both policies at
one budget, and at every eviction step from ``--from`` tokens read on, for every
layer and KV head, the tokens kept by only one of them are counted and weighed
by the attention all later queries (the rest of the document, the question and
the answer, on the full cache) put on them, as a share of all that attention.
The tokens are grouped by kind (digits, words, punctuation, white space), and
the first policy's own tokens by whether the key probe marks them (score
``>= 0``, pooled over the layer's heads as the NAMM's ``key_probe_heads``
says and over the layers below as its ``key_probe_layers`` says, spread over
the ``key_probe_span`` tokens before each mark, on the full cache's keys: the
marks the NAMM ranks first, up to the evictions that change which neighbour a
slot has).

    python docs/scripts/displaced_tokens.py OUT.json --item passkey-7680-000-s0 --recordings REC8K \
        [--namm weights/default] [--against tova] [--budget 1024] [--from 4608] [--limit 4]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from recorded_item import add_item_arguments, recorded_item


def kind(text: str) -> str:
    if re.fullmatch(r"\s*\d+\s*", text):
        return "digit"
    if not text.strip():
        return "space"
    if re.fullmatch(r"\s*[^\w\s]+\s*", text):
        return "punctuation"
    return "word"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="JSON written here (one entry per step)")
    add_item_arguments(parser)
    parser.add_argument("--namm", default="weights/default", help="the NAMM folder (the first policy, ranked at the budget)")
    parser.add_argument("--against", default="tova", help="the rule it is compared with")
    parser.add_argument("--budget", type=int, default=1024, help="tokens per layer")
    parser.add_argument("--from", dest="start", type=int, default=0, help="first step (tokens read) to report")
    args = parser.parse_args()

    from namm_mlx.cache import EvictingKVCache
    from namm_mlx.eval.query_agnostic import replay_kept_sets
    from namm_mlx.eval.recall import load_recording
    from namm_mlx.files import atomic_write
    from namm_mlx.hook import install_hook
    from namm_mlx.key_probe import probe_scores, spread_marks
    from namm_mlx.namm import NAMM, NAMMFormatError
    from namm_mlx.policies import make_scorer

    tok, _, document, recording = recorded_item(parser, args)
    layers, scale, future = load_recording(recording)
    install_hook()
    try:
        namm = NAMM.load(args.namm)
    except NAMMFormatError as err:
        parser.error(str(err))
    scorers = {"namm": make_scorer("namm", namm=namm, ranked=True), args.against: make_scorer(args.against, interval=512)}
    kept = {}
    for name, scorer in scorers.items():
        trace, _ = replay_kept_sets(layers, scale, lambda: EvictingKVCache(scorer, max_kv_size=args.budget), len(document))
        kept[name] = {s.offset: s.kept for s in trace}
    kinds = np.array([kind(tok.decode([t])) for t in document])
    span, heads = namm.config.key_probe_span, namm.config.key_probe_heads
    probed = []  # per layer, its tokens' probe scores [1, H or 1, T]: a token's score depends on its key alone
    for layer, (keys, _, _) in enumerate(layers if namm.key_probe is not None else []):
        scores = probe_scores(keys, namm.key_probe[layer])
        probed.append(scores if heads == "own" else scores.mean(axis=1, keepdims=True) if heads == "mean"
                      else scores.max(axis=1, keepdims=True))
    if namm.config.key_probe_layers == "mean":  # each layer marks by the mean of its probe and the ones below
        probed = [sum(probed[: layer + 1]) / (layer + 1) for layer in range(len(probed))]
    edges, report = future.edges, {}
    for offset in sorted(set(kept["namm"]) & set(kept[args.against])):
        if offset < args.start or offset not in edges:
            continue
        block = edges.index(offset)
        total, entry = 0.0, {"namm_only": {}, f"{args.against}_only": {}}
        marked = 0
        for layer in range(len(layers)):
            later = future.block_sums[layer][:, block:, :offset].sum(axis=1)  # [H, offset]
            # spread within the text read, so a mark past the step cannot reach back
            marks = np.asarray(spread_marks(probed[layer][..., :offset], span))[0] if probed else None
            for head in range(later.shape[0]):
                total += float(later[head].sum())
                mine, theirs = set(kept["namm"][offset][layer][head].tolist()), set(kept[args.against][offset][layer][head].tolist())
                for key, only in (("namm_only", mine - theirs), (f"{args.against}_only", theirs - mine)):
                    only = np.array(sorted(only), dtype=int)
                    if key == "namm_only" and marks is not None:
                        marked += int((marks[min(head, len(marks) - 1), only] >= 0).sum())
                    for k in set(kinds[only].tolist()):
                        tokens = only[kinds[only] == k]
                        count, weight = entry[key].get(k, (0, 0.0))
                        entry[key][k] = (count + len(tokens), weight + float(later[head, tokens].sum()))
        row = {"offset": offset}
        for key, by_kind in entry.items():
            row[key] = {
                "pairs": sum(c for c, _ in by_kind.values()),
                "later_attention": round(sum(w for _, w in by_kind.values()) / total, 5),
                "by_kind": {k: {"pairs": c, "later_attention": round(w / total, 5)} for k, (c, w) in sorted(by_kind.items())},
            }
        row["namm_only"]["marked_pairs"] = marked
        report[offset] = row
        print(json.dumps(row), flush=True)
    atomic_write(args.out, json.dumps({"item": args.item, "budget": args.budget, "namm": args.namm, "against": args.against,
                                       "layer_heads": sum(k.shape[1] for k, _, _ in layers), "steps": list(report.values())}, indent=1))


if __name__ == "__main__":
    main()
