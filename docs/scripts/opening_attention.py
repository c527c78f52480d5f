"""What a reply's opening reads of the document that a NAMM evicted, and whether it is what the answer needs.

``forced_opening.py`` shows a NAMM's cache giving a fact after one opening of
the reply and a wrong one after another. This script asks why. For each forced
opening (end it with a space when the answer starts with one, so that the
last position predicts the fact's first token) it runs the question and the
opening through the full cache (the item's recording replayed) and takes every
prompt position's attention over the document, per layer and KV head (the
group's mean). It prints, per layer, the share of the last position's
attention on tokens the NAMM (replayed at ``--budget``) evicted from that
layer-head, and the evicted tokens that the last position, and all the prompt's
positions together, read most.

Then the test: put back into the NAMM's cache, in every layer-head, the
``--restore`` evicted tokens ranked first by one order, and generate again
after the opening. The orders: what this opening's last position reads most
on the full cache; what another opening's last position reads; what all of
this prompt's positions (question and opening) read; what the document's own
queries put on each token, summed as H2O scores it and per query that could
see it (query-agnostic: a policy could use it); the document's first tokens;
random. ``--put-back`` puts given positions back everywhere, and
``--in-layers`` puts the prompt's reads back in one band of layers only. An
order that brings the answer back where the others do not names what the
answer needed. Keys and values come from the recording, so nothing else
changes.

    python docs/scripts/opening_attention.py --item passkey-7680-005-s0 --recordings REC8K --limit 8 \
        --opening 'The pass key is ' --opening 'The pass key mentioned in the document is ' [--budget 1024] [--restore 4,16] \
        [--put-back 26,27,30] [--in-layers 0-9]
"""

from __future__ import annotations

import argparse

import numpy as np
from recorded_item import add_item_arguments, recorded_item
from replayed_qa import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_item_arguments(parser)
    parser.add_argument("--opening", action="append", default=[], help="text the reply is forced to open with (repeatable)")
    parser.add_argument("--budget", type=int, default=1024, help="the NAMM's budget in tokens")
    parser.add_argument("--namm", default="weights/default")
    parser.add_argument("--restore", default="16,128", help="evicted tokens put back per layer-head (comma-separated counts)")
    parser.add_argument("--put-back", action="append", default=[], metavar="P,P,...",
                        help="document positions to put back in every layer-head that evicted them (repeatable: one test each)")
    parser.add_argument("--in-layers", action="append", default=[], metavar="A-B",
                        help="also put back the first --restore count by all prompt positions' reads in layers A-B only (repeatable)")
    parser.add_argument("--top", type=int, default=12, help="evicted tokens to list per opening")
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()
    if len(args.opening) < 2:
        parser.error("give at least two --opening texts: each one's restored tokens are the others' control")
    try:
        counts = [int(n) for n in args.restore.split(",")]
        groups = [np.array([int(p) for p in group.split(",")]) for group in args.put_back]
        bands = [range(int(a), int(b) + 1) for a, b in (span.split("-") for span in args.in_layers)]
    except ValueError:
        parser.error("--restore and --put-back take comma-separated whole numbers, --in-layers a range A-B")
    if min(counts) < 1 or any((g < 0).any() for g in groups) or any(not band for band in bands):
        parser.error("--restore counts must be at least 1, --put-back positions non-negative, --in-layers ranges A-B with A <= B")

    import mlx.core as mx

    from namm_mlx.attention import attention_probabilities
    from namm_mlx.cache import EvictingKVCache
    from namm_mlx.eval.prompts import encode
    from namm_mlx.eval.query_agnostic import replay_kept_sets, split_prompt
    from namm_mlx.eval.recall import load_recording
    from namm_mlx.hook import install_hook
    from namm_mlx.models import load_model
    from namm_mlx.namm import NAMM
    from namm_mlx.policies import FullScorer, make_scorer

    model, tokenizer = load_model(None, dtype="float32")
    tokenizer, item, document, recording = recorded_item(parser, args, tokenizer)
    question = split_prompt(tokenizer, item).question
    install_hook()
    layers, scale, _ = load_recording(recording)
    n_doc, n_layers = len(document), len(layers)

    # each replayed once; a generation extends its caches, so every use gets forks
    full = replay_kept_sets(layers, scale, lambda: EvictingKVCache(FullScorer()), n_doc)[1]
    scorer = make_scorer("namm", namm=NAMM.load(args.namm), ranked=True)
    _, namm_caches = replay_kept_sets(layers, scale, lambda: EvictingKVCache(scorer, max_kv_size=args.budget), n_doc)
    kept = [np.array(c.positions()[0]) for c in namm_caches]  # [H, k] per layer
    H = kept[0].shape[0]
    evicted = np.ones((n_layers, H, n_doc), bool)
    for layer, positions in enumerate(kept):
        for head in range(H):
            evicted[layer, head, positions[head]] = False
    # what the document's own queries put on each token, summed (H2O's heavy-hitter score), from a cache that keeps all
    h2o = replay_kept_sets(layers, scale, lambda: EvictingKVCache(make_scorer("h2o")), n_doc)[1]
    received = np.stack([np.array(c.scorer_state[0][0, :, :n_doc]) for c in h2o])  # [layers, H, n_doc]
    del h2o
    print(f"{args.item}: {n_doc:,} document tokens; NAMM {args.namm} at {args.budget} tokens keeps "
          f"{np.mean([k.shape[1] for k in kept]):.0f} per layer-head; answer {item['answers'][0]!r}")  # fmt: skip

    # every prompt position's attention over the document on the full cache, per opening
    captured: dict[int, mx.array] = {}  # layer -> the prompt's queries
    original = EvictingKVCache.attend

    def capture(self, queries, keys, values, scale, mask, sinks=None):
        captured[self.layer] = queries
        return original(self, queries, keys, values, scale, mask, sinks)

    reads, everything = {}, {}
    for opening in args.opening:
        prompt = question + encode(tokenizer, opening)
        caches = [c.fork(c.scorer) for c in full]
        EvictingKVCache.attend = capture
        try:
            logits = model(mx.array(prompt)[None], cache=caches)
        finally:
            EvictingKVCache.attend = original
        attention = np.zeros((n_layers, H, n_doc), np.float32)
        prompt_reads = np.zeros((n_layers, H, n_doc), np.float32)
        for layer, cache in enumerate(caches):
            # every prompt position's attention over the keys it sees, kept to the document's columns
            probs = attention_probabilities(captured[layer], cache.keys[:, :, : cache.length], scale)
            attention[layer] = np.array(probs[0, :, -1, :n_doc])
            prompt_reads[layer] = np.array(probs[0, :, :, :n_doc].sum(1))
        everything[opening] = prompt_reads
        first = tokenizer.decode([int(mx.argmax(logits[0, -1]).item())])
        reads[opening] = attention
        lost = (attention * evicted).sum(-1)  # [layers, H]
        print(f"\nopening {opening!r}: the full cache's next token {first!r}; attention on the document "
              f"{attention.sum(-1).mean():.3f}, on what the NAMM evicted {lost.mean():.3f} (mean over layer-heads)")  # fmt: skip
        print("  by layer, share on evicted: " + " ".join(f"{i}:{v:.3f}" for i, v in enumerate(lost.mean(-1))))
        for who, read in (("its last position", attention), ("all its prompt positions", prompt_reads)):
            weight = (read * evicted).sum((0, 1))
            print(f"  evicted tokens {who} reads most (position, token, attention summed over layer-heads, context):")
            for p in np.argsort(-weight)[: args.top]:
                context = tokenizer.decode(document[max(0, p - 6) : p + 3]).replace("\n", " ")
                print(f"    {p:6d} {tokenizer.decode([document[p]])!r:14} {weight[p]:.3f}  ...{context}...")

    def first_evicted(order: np.ndarray, layer: int, head: int, n: int) -> list[int]:
        """The first ``n`` positions of ``order[layer, head]`` that the NAMM evicted there."""
        return [p for p in order[layer, head] if evicted[layer, head, p]][:n]

    def restored_caches(order: np.ndarray, count: int, only: range | None = None) -> list:
        """The NAMM's caches with, per layer-head, the first ``count`` evicted
        positions of ``order`` [layers, H, n] put back (keys from the recording).
        A layer's heads must hold as many tokens each, so a head with fewer of
        them evicted is topped up with evicted tokens drawn at random. ``only``:
        the layers where tokens are put back (default: all)."""
        caches = []
        for layer, (keys, values, _) in enumerate(layers):
            n = count if only is None or layer in only else 0
            extras = [first_evicted(order, layer, head, n) for head in range(H)]
            most = max(map(len, extras))
            rows = []
            for head, extra in enumerate(extras):
                spare = np.setdiff1d(np.flatnonzero(evicted[layer, head]), extra)
                extra = np.concatenate([np.array(extra, np.int64), fill.choice(spare, most - len(extra), replace=False)])
                rows.append(np.sort(np.concatenate([kept[layer][head], extra])))
            index = mx.array(np.stack(rows)[None].astype(np.int32))
            c = EvictingKVCache(FullScorer(), layer=layer)
            c.keys = mx.take_along_axis(keys[:, :, :n_doc], index[..., None], axis=2)
            c.values = mx.take_along_axis(values[:, :, :n_doc], index[..., None], axis=2)
            c.length, c.offset, c.last_step_offset, c.steps = index.shape[-1], n_doc, n_doc, 1
            c.kept_positions = index
            caches.append(c)
        return caches

    rng, fill = np.random.default_rng(0), np.random.default_rng(1)
    by_rank = lambda weights: np.argsort(-weights, axis=-1)  # noqa: E731
    print("\nanswers after each opening with evicted tokens put back in every layer-head:")
    for opening in args.opening:
        prompt = question + encode(tokenizer, opening)
        namm_only = [c.fork(scorer, max_kv_size=args.budget) for c in namm_caches]
        print(f"  {opening!r:45} NAMM as is                      {generate(model, tokenizer, namm_only, prompt, args.max_tokens)!r}")
        orders = {"last position's reads": by_rank(reads[opening])}
        orders.update({"another's last position": by_rank(a) for o, a in reads.items() if o != opening})
        orders["all prompt positions' reads"] = by_rank(everything[opening])
        orders["document queries' sum (H2O)"] = by_rank(received)
        orders["document queries' mean"] = by_rank(received / (n_doc - np.arange(n_doc)))
        orders["the document's first tokens"] = np.broadcast_to(np.arange(n_doc), (n_layers, H, n_doc))
        orders["random"] = np.argsort(rng.random((n_layers, H, n_doc)), axis=-1)
        for group, chosen in zip(args.put_back, groups):
            order = np.broadcast_to(chosen[chosen < n_doc], (n_layers, H, int((chosen < n_doc).sum())))
            print(f"  {opening!r:45} + positions {group:17} {generate(model, tokenizer, restored_caches(order, len(chosen)), prompt, args.max_tokens)!r}",
                  flush=True)  # fmt: skip
        ranked = orders["all prompt positions' reads"]
        put = [first_evicted(ranked, layer, head, counts[0]) for layer in range(n_layers) for head in range(H)]
        positions, hits = np.unique(np.concatenate(put), return_counts=True)
        common = ", ".join(f"{p} {tokenizer.decode([document[p]])!r} x{h}" for p, h in sorted(zip(positions, hits), key=lambda x: -x[1])[:12])
        print(f"  {opening!r:45} the {counts[0]} per layer-head by all prompt positions' reads: {len(positions)} distinct "
              f"positions, {np.mean(positions < 40):.0%} of them before position 40; most put back: {common}")  # fmt: skip
        for span, band in zip(args.in_layers, bands):
            caches = restored_caches(ranked, counts[0], band)
            print(f"  {opening!r:45} + {counts[0]:4d} all prompt reads, layers {span:6} "
                  f"{generate(model, tokenizer, caches, prompt, args.max_tokens)!r}", flush=True)  # fmt: skip
        for count in counts:
            for label, order in orders.items():
                answer = generate(model, tokenizer, restored_caches(order, count), prompt, args.max_tokens)
                print(f"  {opening!r:45} + {count:4d} {label:27} {answer!r}", flush=True)


if __name__ == "__main__":
    main()
