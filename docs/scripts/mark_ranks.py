"""Where a fact's tokens rank among a key probe's marks: one layer's probe, or the mean of the layers up to it.

A NAMM with a key probe keeps each layer's surest marks first, so a fact
survives a small budget only if its tokens rank near the top. This scores the
probe on a recorded document's full-cache keys (pooled over each layer's KV
heads by ``max``, spread over ``--span`` tokens before each mark, as a step
ranks them at the document's end) and prints, per layer, how many tokens are
marked (score ``>= 0``) and the worst rank among the answer's tokens, for the
layer's own probe and for the mean of the probes of that layer and the layers
below it (``key_probe_layers: mean``).

    python docs/scripts/mark_ranks.py --item passkey-7680-000-s0 --recordings REC8K [--namm weights/default]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np


def ranks(scores: np.ndarray, span: int, answer: list[int]) -> tuple[int, int]:
    """(tokens marked, worst rank of an answer token) for one ranking's raw scores."""
    import mlx.core as mx

    from namm_mlx.key_probe import spread_marks

    spread = np.asarray(spread_marks(mx.array(scores), span))
    rank = np.empty(len(spread), int)
    rank[np.argsort(-spread, kind="stable")] = np.arange(len(spread))
    return int((spread >= 0).sum()), int(rank[answer].max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--item", required=True, help="item id, e.g. passkey-7680-000-s0 (seed 0 items)")
    parser.add_argument("--recordings", type=Path, required=True, help="folder with ITEM.npz from replayed_qa.py --recordings")
    parser.add_argument("--namm", default="weights/default", help="the NAMM folder whose key probe is read")
    parser.add_argument("--span", type=int, help="tokens before each mark that share it (default: the NAMM's)")
    parser.add_argument("--limit", type=int, default=4, help="items per task, as replayed_qa.py built them")
    args = parser.parse_args()

    parsed = re.fullmatch(r"([a-z_]+)-(\d+)-(\d+)-s0", args.item)
    if not parsed:
        parser.error(f"--item {args.item!r}: give an id as replayed_qa.py prints it, e.g. passkey-7680-000-s0")
    recording = args.recordings / f"{args.item}.npz"
    if not recording.exists():
        parser.error(f"no recording {recording}: run replayed_qa.py --recordings {args.recordings} on the item first")

    from namm_mlx.eval.facts import answer_positions
    from namm_mlx.eval.query_agnostic import split_prompt
    from namm_mlx.eval.recall import load_recording
    from namm_mlx.eval.tasks import TextSource, make_items
    from namm_mlx.key_probe import SKIP_FIRST, probe_scores
    from namm_mlx.models import load_model
    from namm_mlx.namm import NAMM

    namm = NAMM.load(args.namm)
    if namm.key_probe is None:
        parser.error(f"{args.namm} has no key probe")
    span = namm.config.key_probe_span if args.span is None else args.span
    task, length = parsed.group(1), int(parsed.group(2))
    _, tok = load_model(None, dtype="float32")
    items = [it for it in make_items([task], [length], args.limit, 0, TextSource.from_cache(), tok) if it["_id"] == args.item]
    if not items:
        parser.error(f"no item {args.item!r} among seed 0's {task} items of {length} tokens")
    document = split_prompt(tok, items[0]).document
    answer = answer_positions(tok, document, [str(a) for a in items[0]["answers"]])
    layers, _, _ = load_recording(recording)
    n = len(document)
    pooled = np.stack([np.asarray(probe_scores(keys[..., :n, :], namm.key_probe[i]).max(axis=1))[0]
                       for i, (keys, _, _) in enumerate(layers)])  # fmt: skip
    pooled[:, :SKIP_FIRST] = -np.inf  # the sink and the instructions, which every policy keeps
    print(f"{args.item}: {n} tokens, the answer's {len(answer)} tokens at {answer[0]}-{answer[-1]}, span {span}")
    print("| layer | own: marked | own: worst answer rank | mean of layers 0..l: marked | mean: worst answer rank |")
    print("|---|---|---|---|---|")
    for layer in range(len(pooled)):
        own = ranks(pooled[layer], span, answer)
        mean = ranks(pooled[: layer + 1].mean(axis=0), span, answer)
        print(f"| {layer} | {own[0]} | {own[1]} | {mean[0]} | {mean[1]} |")


if __name__ == "__main__":
    main()
