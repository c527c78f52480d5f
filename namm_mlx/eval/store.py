"""``predictions.jsonl``: one line per finished (item, run) pair, appended at
once, so an interrupted evaluation resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


from ..files import atomic_write
from .plan import NAMM_POLICIES, PolicyRun, is_one_shot

PREDICTIONS = "predictions.jsonl"


def item_hash(item: Mapping[str, Any]) -> str:
    """Short content hash: a resumed run only skips pairs for the very same item."""
    blob = json.dumps([item.get("context"), item.get("input"), item.get("answers")], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:12]


def _schedule(policy: str, baseline_eviction: str, protocol: str = "agnostic", recall_only: bool = False) -> str:
    """What a pair's result depends on besides item, policy, budget and protocol.

    Recall-only runs replay a recording (:func:`replay_document`): exact for the
    full cache and one-shot policies (same key as their scored runs), an
    approximation for online ones (their own schedule, ``"replay"``)."""
    if policy == "full":
        return "full"
    if protocol == "aware":
        return "-" if policy in NAMM_POLICIES else ("prompt" if is_one_shot(policy, baseline_eviction) else "online")
    schedule = "online" if policy in NAMM_POLICIES else baseline_eviction
    return "replay" if recall_only and schedule == "online" else schedule


def pair_key(
    item_or_record: Mapping[str, Any],
    run: PolicyRun | None = None,
    baseline_eviction: str = "online",
    protocol: str = "agnostic",
    recall_only: bool = False,
) -> tuple[str, str, str, str, str, str]:
    """``(_id, item_hash, policy, budget label, schedule, protocol)`` of a record,
    or of an item and a run. A record without ``eviction`` has the online
    schedule; one without ``protocol`` is question-aware."""
    r = item_or_record
    if run is None:
        schedule = r.get("eviction") or _schedule(r["policy"], "online", "aware")
        return (str(r["_id"]), r["item_hash"], r["policy"], r["budget"], schedule, r.get("protocol") or "aware")
    schedule = _schedule(run.policy, baseline_eviction, protocol, recall_only)
    return (str(r["_id"]), item_hash(r), run.policy, run.budget_label, schedule, protocol)


def read_predictions(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a predictions file (none if it does not exist).

    A line that is not a complete JSON object (a run killed mid-write) is
    dropped; with ``repair`` the file is rewritten without it, so appending
    continues on a clean line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and {"_id", "item_hash", "policy", "budget", "score"} <= record.keys():
            records.append(record)
        else:
            bad += 1
    if bad and repair:
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def pending_pairs(
    items: Sequence[Mapping[str, Any]],
    runs: Sequence[PolicyRun],
    records: Iterable[Mapping[str, Any]],
    baseline_eviction: str = "online",
    protocol: str = "agnostic",
    recall_only: bool = False,
) -> list[tuple[PolicyRun, Mapping[str, Any]]]:
    """The (run, item) pairs not yet in ``records``, run-major. A recall-only
    record (no score) completes a pair only for a recall-only run."""
    done = {pair_key(r) for r in records if recall_only or r.get("score") is not None}
    return [
        (run, item)
        for run in runs
        for item in items
        if pair_key(item, run, baseline_eviction, protocol, recall_only) not in done
    ]


def latest_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One record per pair: the last one written, unless only an earlier one has a
    score (a recall-only record never hides a scored one)."""
    chosen: dict[tuple, Mapping[str, Any]] = {}
    for r in records:
        key = pair_key(r)
        if key in chosen and r.get("score") is None and chosen[key].get("score") is not None:
            continue
        chosen[key] = r
    return list(chosen.values())
