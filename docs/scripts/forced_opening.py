"""Greedy answers after a forced opening of the reply, full cache against a NAMM's.

When a NAMM keeps a fact whole yet answers wrongly, the reply may part from the
full cache's before the fact is due. Forcing both caches to open the reply the
same way separates the two: if the NAMM's cache then gives the fact, the fact is
retrievable and the opening is what led away from it. Each cache replays the
item's recording (``replayed_qa.py --recordings``) under its budget, then
generates after the question and the opening.

    python docs/scripts/forced_opening.py --item passkey-7680-005-s0 --recordings REC8K --limit 8 \
        --opening "" --opening "The pass key is" [--budget 1024] [--namm weights/default]
"""

from __future__ import annotations

import argparse

from recorded_item import add_item_arguments, recorded_item
from replayed_qa import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_item_arguments(parser)
    parser.add_argument("--opening", action="append", default=[], help="text the reply is forced to open with (repeatable; '' for none)")
    parser.add_argument("--budget", type=int, default=1024, help="the NAMM's budget in tokens")
    parser.add_argument("--namm", default="weights/default")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    openings = args.opening or [""]

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
    namm = NAMM.load(args.namm)
    install_hook()
    layers, scale, _ = load_recording(recording)
    for opening in openings:
        for name in ("full", "namm"):
            scorer = FullScorer() if name == "full" else make_scorer("namm", namm=namm, ranked=True)
            size = None if name == "full" else args.budget
            _, caches = replay_kept_sets(layers, scale, lambda: EvictingKVCache(scorer, max_kv_size=size), len(document))
            prompt = question + (encode(tokenizer, opening) if opening else [])
            print(f"{opening!r:45} {name:4} {generate(model, tokenizer, caches, prompt, args.max_tokens)!r}", flush=True)


if __name__ == "__main__":
    main()
