"""The item behind a recording that ``replayed_qa.py --recordings`` wrote, for scripts that study one.

Items are rebuilt from their id (seed 0, as ``replayed_qa.py`` builds them), so
a script gets the document's tokens and the answers without storing them.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any


def add_item_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--item", required=True, help="item id, e.g. passkey-7680-000-s0 (seed 0 items)")
    parser.add_argument("--recordings", type=Path, required=True, help="folder with ITEM.npz from replayed_qa.py --recordings")
    parser.add_argument("--limit", type=int, default=4, help="items per task, as replayed_qa.py built them")


def recorded_item(parser: argparse.ArgumentParser, args: argparse.Namespace, tokenizer: Any = None) -> tuple[Any, dict, list[int], Path]:
    """``(tokenizer, item, document tokens, recording path)`` for ``args.item``,
    or one ``parser.error`` line when the id is malformed, the recording is
    missing or no such item exists. Without ``tokenizer`` the default model's is loaded."""
    parsed = re.fullmatch(r"([a-z_]+)-(\d+)-(\d+)-s0", args.item)
    if not parsed:
        parser.error(f"--item {args.item!r}: give an id as replayed_qa.py prints it, e.g. passkey-7680-000-s0")
    recording = args.recordings / f"{args.item}.npz"
    if not recording.exists():
        parser.error(f"no recording {recording}: run replayed_qa.py --recordings {args.recordings} on the item first")

    from namm_mlx.eval.query_agnostic import split_prompt
    from namm_mlx.eval.tasks import TextSource, make_items
    from namm_mlx.models import load_model

    if tokenizer is None:
        _, tokenizer = load_model(None, dtype="float32")
    task, length = parsed.group(1), int(parsed.group(2))
    items = [it for it in make_items([task], [length], args.limit, 0, TextSource.from_cache(), tokenizer) if it["_id"] == args.item]
    if not items:
        parser.error(f"no item {args.item!r} among seed 0's {task} items of {length} tokens")
    return tokenizer, items[0], split_prompt(tokenizer, items[0]).document, recording
