"""LongBench JSONL files: one item per line with ``input``, ``context``,
``answers``, ``dataset``, ``_id`` and optionally ``all_classes``, ``length``,
``language`` (the files of THUDM/LongBench, LongBench-E included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import NammError

REQUIRED = ("input", "context", "answers", "dataset", "_id")


class DataFileError(NammError, ValueError):
    """A JSONL file is not in LongBench's format; the message names the line."""


def load_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Items of a LongBench JSONL file (the first ``limit`` per dataset if given).

    ``answers`` may be a list or a single string (made a list); ``all_classes``
    is kept when present (classification datasets need it).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataFileError(f"cannot read {path}: {err.strerror or err}") from None
    items: list[dict[str, Any]] = []
    per_dataset: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}:{lineno}: not JSON ({err.msg})") from None
        if not isinstance(item, dict):
            raise DataFileError(f"{path}:{lineno}: expected a JSON object")
        missing = [k for k in REQUIRED if k not in item]
        if missing:
            raise DataFileError(f"{path}:{lineno}: missing {', '.join(missing)} (LongBench format needs {', '.join(REQUIRED)})")
        answers = item["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataFileError(f"{path}:{lineno}: 'answers' must be a non-empty list of strings")
        item["answers"] = answers
        item["_id"] = str(item["_id"])
        if item.get("all_classes") is not None and not isinstance(item["all_classes"], list):
            raise DataFileError(f"{path}:{lineno}: 'all_classes' must be a list")
        dataset = str(item["dataset"])
        item["dataset"] = dataset
        if limit is not None and per_dataset.get(dataset, 0) >= limit:
            continue
        per_dataset[dataset] = per_dataset.get(dataset, 0) + 1
        items.append(item)
    if not items:
        raise DataFileError(f"{path} holds no items")
    return items
