"""``namm eval`` end to end with the real default model (SmolLM2-135M), kept tiny."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

DATA = Path(__file__).parent / "data"


def _invoke(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _table_rows(output: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if len(cells) >= 9 and cells[3].isdigit():
            rows[(cells[0], cells[1])] = cells
    return rows


@pytest.mark.real_model
def test_eval_passkey_full_vs_knorm(tmp_path):
    """The question-aware protocol (the default before issue 12), end to end."""
    out = tmp_path / "run"
    args = ["eval", "--policy", "full,knorm", "--tasks", "passkey", "--lengths", "1024", "--limit", "2",
            "--budget", "0.5", "--text", str(DATA / "pride_and_prejudice.txt"), "--out", str(out),
            "--query-aware", "--baseline-eviction", "prompt"]
    result = _invoke(args)
    rows = _table_rows(result.stdout)
    assert set(rows) == {("passkey", "full"), ("passkey", "knorm")}
    assert rows[("passkey", "full")][2] == "-" and rows[("passkey", "knorm")][2] == "0.5"
    assert float(rows[("passkey", "full")][5]) == 1.0  # kept fraction
    assert float(rows[("passkey", "knorm")][5]) < 0.8

    records = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert {(r["policy"], r["_id"]) for r in records} == {
        (p, f"passkey-1024-00{i}-s0") for p in ("full", "knorm") for i in (0, 1)}
    for r in records:
        assert {"_id", "dataset", "policy", "prediction", "kept_fraction", "score", "prefill_tps", "decode_tps",
                "peak_memory_gb"} <= r.keys()
        assert 900 < r["prompt_tokens"] <= 1024 and r["generated_tokens"] <= 32
    full = [r for r in records if r["policy"] == "full"]
    assert sum(r["score"] for r in full) >= 1  # the full cache reads a 1k-token passkey

    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and [o["run"] for o in results["overall"]] == ["full", "knorm@0.5"]
    assert {t["run"]: t["n"] for t in results["by_task"]} == {"full": 2, "knorm@0.5": 2}
    png = (out / "score_vs_kept.png").read_bytes()
    from namm_mlx.eval.plot import DPI, SIZE

    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (round(SIZE[0] * DPI), round(SIZE[1] * DPI))

    # rerunning resumes: nothing is recomputed, the same table comes back
    again = _invoke(args)
    assert "resuming: 4 of 4" in again.stderr
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    assert _table_rows(again.stdout) == rows


@pytest.mark.real_model
def test_eval_longbench_jsonl(tmp_path):
    facts = " ".join(f"Fact {i}: the tower of Quexville has {i + 3} bells." for i in range(60))
    rows = [
        {"input": "What is the capital of Zorbland?", "answers": ["Quexville"], "dataset": "hotpotqa",
         "context": "The capital of Zorbland is Quexville. " + facts, "_id": "lb-1", "length": 500},
        {"input": "What is the capital of Zorbland?", "answers": ["LOC"], "dataset": "trec", "_id": "lb-2",
         "context": "Question: Where is Paris?\nType: LOC\nQuestion: How many legs?\nType: NUM\n",
         "all_classes": ["LOC", "NUM", "HUM"]},
    ]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "lb"
    result = _invoke(["eval", "--policy", "full,streaming", "--data", str(data), "--budget", "0.5",
                      "--max-tokens", "12", "--max-length", "400", "--out", str(out), "--no-progress"])
    table = _table_rows(result.stdout)
    assert {k[0] for k in table} == {"hotpotqa", "trec", "(mean)"}  # two tasks: a mean row per policy
    records = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4
    by_key = {(r["_id"], r["policy"]): r for r in records}
    long_item = by_key[("lb-1", "full")]
    assert long_item["truncated"] and long_item["prompt_tokens"] <= 400 - 12  # middle-truncated to the budget
    assert not by_key[("lb-2", "full")]["truncated"]
    assert long_item["metric"] == "qa_f1_score" and by_key[("lb-2", "full")]["metric"] == "classification_score"
    assert all(0.0 <= r["score"] <= 1.0 and r["generated_tokens"] <= 12 for r in records)
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"] == {"hotpotqa": "qa_f1_score", "trec": "classification_score"}
    assert results["config"]["data"] == [str(data)]


@pytest.mark.real_model
def test_eval_query_agnostic_namm_and_baseline_at_one_budget(tmp_path):
    """The default protocol end to end: the shipped NAMM (ranked) and H2O keep the
    same number of tokens of the document, every pair has its recall, the table
    and results.json carry intervals, and a rerun has nothing to do."""
    out = tmp_path / "qa"
    args = ["eval", "--policy", "full,namm,h2o", "--tasks", "passkey", "--lengths", "768", "--limit", "1",
            "--budget", "0.5", "--max-tokens", "8", "--text", str(DATA / "pride_and_prejudice.txt"), "--out", str(out),
            "--no-progress"]
    result = _invoke(args)
    header = result.stdout.splitlines()[0].split()
    assert "recall" in header and "CI" in header
    records = {r["policy"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert set(records) == {"full", "namm", "h2o"}
    doc = records["full"]["document_tokens"]
    assert doc % 16 == 0 and records["full"]["prompt_tokens"] == doc + records["full"]["question_tokens"]
    for policy in ("namm", "h2o"):
        r = records[policy]
        assert r["protocol"] == "agnostic" and r["eviction"] == "online" and r["budget"] == "0.5"
        assert r["max_kv_size"] == -(-doc // 2) and r["kept_fraction"] == pytest.approx(r["max_kv_size"] / doc)
        assert 0.0 < r["recall"] < 1.0 and r["recall_offsets"][-1] == doc
    assert records["full"]["recall"] == 1.0 and records["namm"]["namm_sha"]
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "agnostic" and results["config"]["protocol"] == "agnostic"
    for row in results["overall"]:
        lo, hi = row["recall_ci"]
        assert lo <= row["recall"] <= hi and row["score_ci"] is not None
    again = _invoke(args)
    assert "resuming: 3 of 3" in again.stderr
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("args, message", [
    (["--tasks", "passkey", "--data", "x.jsonl"], "either --tasks"),
    (["--tasks", "nope"], "unknown task"),
    (["--policy", "full,lru"], "unknown policy"),
    (["--budget", "2.5"], "bad budget"),
    (["--recall-only", "--query-aware"], "--recall-only"),
    (["--policy", "full,namm2"], "--namm2 DIR"),
])
def test_eval_rejects_bad_arguments(tmp_path, args, message):
    result = CliRunner().invoke(app, ["eval", "--out", str(tmp_path), *args])
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output
