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

import numpy as np
from recorded_item import add_item_arguments, recorded_item


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
    add_item_arguments(parser)
    parser.add_argument("--namm", default="weights/default", help="the NAMM folder whose key probe is read")
    parser.add_argument("--span", type=int, help="tokens before each mark that share it (default: the NAMM's)")
    args = parser.parse_args()

    from namm_mlx.eval.facts import answer_positions
    from namm_mlx.eval.recall import load_recording
    from namm_mlx.key_probe import SKIP_FIRST, probe_scores
    from namm_mlx.namm import NAMM, NAMMFormatError

    try:
        namm = NAMM.load(args.namm)
    except NAMMFormatError as err:
        parser.error(str(err))
    if namm.key_probe is None:
        parser.error(f"{args.namm} has no key probe")
    span = namm.config.key_probe_span if args.span is None else args.span
    tok, item, document, recording = recorded_item(parser, args)
    answer = answer_positions(tok, document, [str(a) for a in item["answers"]])
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
