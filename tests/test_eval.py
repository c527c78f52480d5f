"""namm_mlx.eval without the real model: metrics, tasks, prompts, JSONL, resume,
budget matching, the plots and the answer likelihood (tiny random model)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from namm_mlx.data import parse_kjv
from namm_mlx.eval import (
    Budget,
    DataFileError,
    EvalError,
    LogProb,
    PolicyRun,
    TextSource,
    answer_logprob,
    answer_logprobs,
    classification_score,
    code_sim_score,
    count_score,
    effective_budget,
    full_cache_factory,
    fuzz_ratio,
    load_jsonl,
    make_item,
    make_items,
    matched_budgets,
    max_new_tokens,
    middle_truncate,
    normalize_answer,
    parse_budgets,
    pending_pairs,
    plan_runs,
    prompt_tokens,
    qa_f1_score,
    qa_f1_zh_score,
    read_predictions,
    retrieval_score,
    retrieval_zh_score,
    rouge_l_score,
    rouge_zh_score,
    score_prediction,
    substring_match,
)
from namm_mlx.eval import runner
from namm_mlx.eval.plot import POLICY_RGB, plot_score_vs_kept
from namm_mlx.eval.prompts import encode
from namm_mlx.eval.tasks import parse_chapters

DATA = Path(__file__).parent / "data"
PRIDE = DATA / "pride_and_prejudice.txt"
KJV = DATA / "kjv_sample.tsv"


# --------------------------------------------------------------------------- metrics


def test_normalize_answer():
    assert normalize_answer("The  Cat, a hat!") == "cat hat"
    assert normalize_answer("An apple; THE end.") == "apple end"


def test_qa_f1_hand_computed():
    # pred -> [cat, sat, on, mat], truth -> [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert qa_f1_score("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert qa_f1_score("dog", "cat") == 0.0
    assert qa_f1_score("Paris.", "paris") == 1.0


def test_qa_f1_zh_char_level():
    # chars [北 京 大 学] vs [北 京]: P = 1/2, R = 1, F1 = 2/3
    assert qa_f1_zh_score("北京大学。", "北京") == pytest.approx(2 / 3)


def test_rouge_l_hand_computed():
    # one sentence each: unique words 5 and 5, LCS "the cat on the mat" -> {the, cat, on, mat} = 4
    assert rouge_l_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    # summary level: LCS unions over the hypothesis sentences: {c, e} + {a, b} = 4;
    # R = 4/5 reference words, P = 4/4 hypothesis words: F = 8/9
    # (a plain LCS over the whole text would only find 2)
    assert rouge_l_score("c e. a b", "a b c d e") == pytest.approx(8 / 9, abs=1e-6)
    # P = 2/4 (unique hyp words a, b, x, y), R = 2/2: F = 2/3
    assert rouge_l_score("a x b y", "a b") == pytest.approx(2 / 3, abs=1e-6)
    assert rouge_l_score("", "a b") == 0.0
    assert rouge_l_score("...", "a b") == 0.0
    assert rouge_zh_score("今天天气好", "今天好") == pytest.approx(rouge_l_score("今 天 天 气 好", "今 天 好"))


def test_classification_hand_computed():
    classes = ["LOC", "NUM", "HUM"]
    assert classification_score("LOC or NUM", "LOC", all_classes=classes) == 0.5
    assert classification_score("HUM", "LOC", all_classes=classes) == 0.0
    # a class that is a strict substring of the answer does not count against it
    assert classification_score("Description of thing", "Description of thing",
                                all_classes=["Description", "Description of thing"]) == 1.0
    # LongBench removes while iterating: "a" goes, "b" is skipped -> [b, "ab c"] -> 1/2
    assert classification_score("ab c", "ab c", all_classes=["a", "b", "ab c"]) == 0.5


def test_retrieval_and_count_hand_computed():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 4", "Paragraph 3") == 0.5
    assert retrieval_score("no idea", "Paragraph 3") == 0.0
    assert retrieval_zh_score("段落2", "段落2") == 1.0
    assert count_score("There are 5 unique paragraphs, 5 in all", "5") == 1.0
    assert count_score("3 or 5", "5") == 0.5
    assert count_score("many", "5") == 0.0


def test_fuzz_ratio_and_code_similarity():
    assert fuzz_ratio("abc", "abd") == 67  # LCS 2: 2*2/6
    assert fuzz_ratio("kitten", "sitting") == 62  # LCS "ittn": 8/13 = 0.615
    assert fuzz_ratio("", "abc") == 0
    # first line without ``` / # / // is "x = foo(1)": LCS 9 of 10+10 -> 90
    assert code_sim_score("```python\n# comment\nx = foo(1)\n", "x = foo(2)") == 0.9


def test_score_prediction_protocol():
    # max over answers
    assert score_prediction("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    # triviaqa scores only the first line; hotpotqa the whole prediction
    assert score_prediction("triviaqa", "Paris\nLondon", ["London"]) == 0.0
    assert score_prediction("hotpotqa", "Paris\nLondon", ["London"]) == pytest.approx(2 / 3)
    # LongBench-E names share the base dataset's metric
    assert score_prediction("qasper_e", "a cat", ["cat"]) == 1.0
    assert max_new_tokens("gov_report_e") == 512
    assert score_prediction("lcc_e", "x = foo(1)", ["x = foo(2)"]) == 0.9  # code similarity, not qa-F1 (0)
    # multi-needle: the share of needles recalled, not the best one
    assert score_prediction("multi_needle", "1111111 and 3333333", ["1111111", "2222222", "3333333"]) == pytest.approx(2 / 3)
    assert score_prediction("needle", "It is 1234567.", ["1234567"]) == 1.0
    assert substring_match("no", "1234567") == 0.0
    assert max_new_tokens("gov_report") == 512 and max_new_tokens("needle") == 32
    assert max_new_tokens("unknown_dataset") == 64


# --------------------------------------------------------------------------- tasks


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from namm_mlx.models import default_model_path

    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def source():
    return TextSource.from_files([PRIDE, KJV])


def _ratio(tokenizer, context: str, needle: str) -> float:
    at = context.index(needle)
    assert context.count(needle) == 1
    return len(encode(tokenizer, context[:at])) / len(encode(tokenizer, context))


def test_items_are_deterministic(tokenizer, source):
    a = make_items(["needle", "kjv_verse", "chapter"], [1024], 2, 7, source, tokenizer)
    b = make_items(["needle", "kjv_verse", "chapter"], [1024], 2, 7, source, tokenizer)
    c = make_items(["needle", "kjv_verse", "chapter"], [1024], 2, 8, source, tokenizer)
    assert a == b
    assert [i["context"] for i in a] != [i["context"] for i in c]
    assert len({i["_id"] for i in a}) == 6
    for item in a:
        assert {"_id", "dataset", "context", "input", "answers", "length", "depth"} <= item.keys()
    # the first items do not depend on how many are asked for (like --limit)
    assert make_items(["needle"], [1024], 1, 7, source, tokenizer)[0] == a[0]


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_at_requested_depth(tokenizer, source, depth):
    item = make_item("needle", 2048, 0, 0, source, tokenizer, depth=depth)
    needle = item["needles"][0]
    assert item["answers"][0] in needle
    assert abs(_ratio(tokenizer, item["context"], needle) - depth) < 0.03
    n = len(prompt_tokens(tokenizer, item)[0])
    assert 0.95 * 2048 <= n <= 2048


def test_multi_needle_and_passkey_depths(tokenizer, source):
    item = make_item("multi_needle", 2048, 0, 0, source, tokenizer, depth=0.2)
    assert item["depths"] == pytest.approx([0.2, 0.2 + 1 / 3, 0.2 + 2 / 3], abs=1e-3)
    for needle, depth, value in zip(item["needles"], item["depths"], item["answers"]):
        assert value in needle
        assert abs(_ratio(tokenizer, item["context"], needle) - depth) < 0.04
    assert len(set(item["keys"])) == 3 and all(k in item["input"] for k in item["keys"])
    passkey = make_item("passkey", 1024, 0, 0, source, tokenizer, depth=0.5)
    assert abs(_ratio(tokenizer, passkey["context"], passkey["needles"][0]) - 0.5) < 0.05


def test_kjv_items_reference_real_verses(tokenizer, source):
    verses = dict(parse_kjv(KJV.read_text()))
    for item in make_items(["kjv_verse"], [1024, 2048], 3, 0, source, tokenizer):
        ref = item["reference_verse"]
        assert ref in item["input"]
        assert verses[ref] == item["answers"][0]
        line = f"{ref} {verses[ref]}"
        assert item["context"].count(line) == 1
        assert abs(_ratio(tokenizer, item["context"], line) - item["depth"]) < 0.08


def test_chapter_items(tokenizer, source):
    chapters = dict(parse_chapters(PRIDE.read_text()))
    assert sorted(chapters) == list(range(1, 16))
    for item in make_items(["chapter"], [1024, 4096], 3, 0, source, tokenizer):
        number = int(item["answers"][0])
        assert number in item["chapters"]
        flat = " ".join(item["context"].split())
        at = flat.index(item["sentence"])
        heading = flat[:at].rfind("Chapter ")
        assert flat[heading:].startswith(f"Chapter {number} ")
        assert item["sentence"] in " ".join(chapters[number].split())  # really from that chapter
        assert abs(len(encode(tokenizer, flat[:at])) / len(encode(tokenizer, flat)) - item["depth"]) < 0.1
    assert len(make_item("chapter", 4096, 0, 0, source, tokenizer)["chapters"]) == 4


def test_lengths_are_capped_to_the_model(tokenizer, source):
    item = make_item("needle", 8192, 0, 0, source, tokenizer, max_prompt_tokens=3000)
    assert item["length"] == 8192
    assert 2800 <= len(prompt_tokens(tokenizer, item)[0]) <= 3000


# --------------------------------------------------------------------------- prompts


def test_middle_truncation(tokenizer):
    text = PRIDE.read_text()[:8000]
    ids = encode(tokenizer, text)
    cut = middle_truncate(tokenizer, text, 200)
    assert 195 <= len(encode(tokenizer, cut)) <= 205
    assert cut.startswith(tokenizer.decode(ids[:100])) and cut.endswith(tokenizer.decode(ids[-100:]))
    item = {"_id": "x", "dataset": "hotpotqa", "context": text, "input": "Who is Mr. Bennet?", "answers": ["a"]}
    full, truncated = prompt_tokens(tokenizer, item)
    assert not truncated
    short, truncated = prompt_tokens(tokenizer, item, max_prompt_tokens=300)
    assert truncated and 280 <= len(short) <= 300 < len(full)
    decoded = tokenizer.decode(short)
    assert "Who is Mr. Bennet?" in decoded and decoded.rstrip().endswith("assistant")


def test_longbench_templates(tokenizer, tmp_path):
    from namm_mlx.eval.prompts import load_prompt_templates

    path = tmp_path / "dataset2prompt.json"
    path.write_text(json.dumps({"hotpotqa": "P: {context}\nQ: {input}\nA:", "lcc": "Code:\n{context}Next line of code:\n"}))
    templates = load_prompt_templates(path)
    qa = {"dataset": "hotpotqa", "context": "CTX", "input": "QQ"}
    text = tokenizer.decode(prompt_tokens(tokenizer, qa, templates=templates)[0])
    assert "P: CTX\nQ: QQ\nA:" in text and "<|im_start|>user" in text
    code = {"dataset": "lcc", "context": "def f():\n", "input": ""}
    ids = prompt_tokens(tokenizer, code, templates=templates)[0]
    # LongBench feeds code raw: BOS (SmolLM2's is <|im_start|>) and the text, no user turn
    assert ids[0] == tokenizer.bos_token_id and "user" not in tokenizer.decode(ids)
    assert tokenizer.decode(ids[1:]) == "Code:\ndef f():\nNext line of code:\n"


# --------------------------------------------------------------------------- LongBench JSONL


def _jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def test_load_longbench_jsonl(tmp_path):
    rows = [
        {"input": "Q1", "context": "C1", "answers": ["A1", "B1"], "length": 10, "dataset": "hotpotqa",
         "language": "en", "all_classes": None, "_id": "id1"},
        {"input": "Q2", "context": "C2", "answers": "A2", "dataset": "hotpotqa", "_id": 2},
        {"input": "Q3", "context": "C3", "answers": ["LOC"], "dataset": "trec", "_id": "id3",
         "all_classes": ["LOC", "NUM"]},
    ]
    items = load_jsonl(_jsonl(tmp_path / "lb.jsonl", rows))
    assert [i["_id"] for i in items] == ["id1", "2", "id3"]
    assert items[1]["answers"] == ["A2"] and items[2]["all_classes"] == ["LOC", "NUM"]
    assert [i["_id"] for i in load_jsonl(tmp_path / "lb.jsonl", limit=1)] == ["id1", "id3"]
    with pytest.raises(DataFileError, match=r"lb2.jsonl:2: not JSON"):
        load_jsonl(_jsonl(tmp_path / "lb2.jsonl", [rows[0], "{broken"]))
    with pytest.raises(DataFileError, match="missing answers"):
        load_jsonl(_jsonl(tmp_path / "lb3.jsonl", [{k: v for k, v in rows[0].items() if k != "answers"}]))


# --------------------------------------------------------------------------- budgets, runs, resume


def test_parse_budgets_and_plan():
    assert parse_budgets("0.25, 1024") == [Budget(keep_fraction=0.25), Budget(max_kv_size=1024)]
    for bad in ("0", "1.5", "x", "-1"):
        with pytest.raises(EvalError):
            parse_budgets(bad)
    runs = plan_runs(["knorm", "full", "snapkv"], parse_budgets("0.5"), match="namm")
    assert [r.label for r in runs] == ["namm", "full", "knorm@0.5", "knorm@match:namm", "snapkv@0.5", "snapkv@match:namm"]
    with pytest.raises(EvalError, match="needs a budget"):
        plan_runs(["h2o"], [])
    with pytest.raises(EvalError, match="unknown policy"):
        plan_runs(["lru"], parse_budgets("0.5"))


def test_match_namm_budget_derivation():
    records = [
        {"policy": "namm", "dataset": "needle", "kept_fraction": 0.50, "step_kept_fraction": 0.40},
        {"policy": "namm", "dataset": "needle", "kept_fraction": 0.70, "step_kept_fraction": 0.60},
        {"policy": "namm", "dataset": "chapter", "kept_fraction": 1.00, "step_kept_fraction": None},
        {"policy": "knorm", "dataset": "needle", "kept_fraction": 0.10, "step_kept_fraction": 0.10},
    ]
    matched = matched_budgets(records)
    assert matched["needle"] == pytest.approx({"kept_fraction": 0.6, "step_kept_fraction": 0.5, "n": 2})
    assert matched["chapter"]["step_kept_fraction"] == 1.0  # never stepped: its end-of-prompt value
    match = Budget(match="namm")
    # online baselines cap the kept share at each step -> the NAMM's step value
    assert effective_budget(PolicyRun("knorm", match), "needle", matched, "online") == (pytest.approx(0.5), None)
    # one-shot baselines (SnapKV always, every baseline by default) have no
    # unevicted tail -> the NAMM's end-of-prompt value
    assert effective_budget(PolicyRun("snapkv", match), "needle", matched, "online") == (pytest.approx(0.6), None)
    assert effective_budget(PolicyRun("knorm", match), "needle", matched) == (pytest.approx(0.6), None)
    assert effective_budget(PolicyRun("h2o", Budget(max_kv_size=256)), "needle", matched) == (None, 256)
    assert effective_budget(PolicyRun("full"), "needle", matched) == (None, None)
    # with lengths, each (task, length) group is matched on its own, falling back to the task
    by_length = matched_budgets(
        [dict(r, length=L) for r, L in zip(records, (2048, 4096, 2048, 2048))], scope="task_length"
    )
    assert set(by_length) == {"needle@2048", "needle@4096", "chapter@2048"}
    assert effective_budget(PolicyRun("knorm", match), "needle", by_length, length=4096) == (pytest.approx(0.7), None)
    assert effective_budget(PolicyRun("knorm", match), "needle", by_length, length=2048) == (pytest.approx(0.5), None)
    assert effective_budget(PolicyRun("knorm", match), "needle", {**by_length, **matched}, length=1024)[0] == pytest.approx(0.6)
    overall = matched_budgets(records, scope="overall")
    assert overall["*"]["kept_fraction"] == pytest.approx(0.7333, abs=1e-3)
    assert effective_budget(PolicyRun("knorm", match), "anything", overall, "online")[0] == pytest.approx((0.4 + 0.6 + 1.0) / 3)
    with pytest.raises(EvalError, match="no NAMM results"):
        effective_budget(PolicyRun("knorm", match), "passkey", matched)


def _items(n=3):
    return [{"_id": f"t-{i}", "dataset": "needle", "context": f"ctx {i}", "input": "q", "answers": [str(i)], "length": 1024}
            for i in range(n)]


def _record(item, run, score=1.0, kept=1.0):
    return {
        "_id": item["_id"], "item_hash": runner.item_hash(item), "dataset": item["dataset"], "length": item["length"],
        "depth": None, "policy": run.policy, "budget": run.budget_label, "prediction": "p", "answers": item["answers"],
        "score": score, "kept_fraction": kept, "step_kept_fraction": None, "kv_cache_mb": 1.0, "prompt_tokens": 1000,
        "prefill_seconds": 10.0, "generated_tokens": 10, "decode_tps": 10.0, "peak_memory_gb": 0.5,
    }


def test_pending_pairs_skip_recorded(tmp_path):
    items = _items()
    runs = [PolicyRun("full"), PolicyRun("knorm", Budget(keep_fraction=0.5))]
    done = [_record(items[0], runs[0]), _record(items[2], runs[1])]
    todo = pending_pairs(items, runs, done, "online", protocol="aware")
    assert [(r.label, i["_id"]) for r, i in todo] == [
        ("full", "t-1"), ("full", "t-2"), ("knorm@0.5", "t-0"), ("knorm@0.5", "t-1")]
    # an item whose content changed is not skipped even with the same id
    changed = dict(items[0], context="other")
    assert pending_pairs([changed], runs[:1], done, "online", protocol="aware") == [(runs[0], changed)]
    # the same pair under the other baseline schedule is a different result
    assert [(r.label, i["_id"]) for r, i in pending_pairs(items, runs[1:], done, "prompt", protocol="aware")] == [
        ("knorm@0.5", "t-0"), ("knorm@0.5", "t-1"), ("knorm@0.5", "t-2")]


def test_resume_from_predictions(tmp_path, monkeypatch):
    import namm_mlx.integration as integration

    items = _items()
    runs = [PolicyRun("full"), PolicyRun("knorm", Budget(keep_fraction=0.5))]
    pred = tmp_path / "predictions.jsonl"
    lines = [json.dumps(_record(items[0], runs[0], score=1.0)), json.dumps(_record(items[1], runs[1], score=0.0, kept=0.5))]
    stale = dict(_record(items[0], runs[0]), _id="gone")  # not in this plan: ignored by the summary
    pred.write_text("\n".join(lines + [json.dumps(stale)]) + '\n{"_id": "t-2", "item_ha')  # torn last line

    calls = []
    monkeypatch.setattr(integration, "attach", lambda model, scorer, **kw: calls.append(("attach", scorer.name, kw)))
    monkeypatch.setattr(integration, "detach", lambda model: None)

    def fake_evaluate(model, tokenizer, item, run, **kw):
        calls.append((item["_id"], run.label))
        return _record(item, run, score=0.5, kept=kw["keep_fraction"] or 1.0)

    monkeypatch.setattr(runner, "evaluate_item", fake_evaluate)
    results = runner.run_eval(
        None, None, items, runs, tmp_path, progress=False, log=lambda m: None, baseline_eviction="online", protocol="aware"
    )
    evaluated = [c for c in calls if c[0] != "attach"]
    assert evaluated == [("t-1", "full"), ("t-2", "full"), ("t-0", "knorm@0.5"), ("t-2", "knorm@0.5")]
    assert ("attach", "knorm", {"max_kv_size": None, "keep_fraction": 0.5}) in calls
    records = read_predictions(pred)
    assert len(records) == 7 and all(r["_id"] != "t-2" or r["score"] == 0.5 for r in records)
    assert results["complete"] and results["pairs"] == {"done": 6, "planned": 6}
    by_run = {t["run"]: t for t in results["by_task"]}
    assert by_run["full"]["score"] == pytest.approx(100 * (1.0 + 0.5 + 0.5) / 3, abs=0.01)
    assert by_run["knorm@0.5"]["score"] == pytest.approx(100 * (0.5 + 0.0 + 0.5) / 3, abs=0.01)
    assert by_run["knorm@0.5"]["kept_fraction"] == 0.5
    assert json.loads((tmp_path / "results.json").read_text())["by_task"] == results["by_task"]
    # a second run has nothing left to do
    calls.clear()
    runner.run_eval(None, None, items, runs, tmp_path, progress=False, log=lambda m: None, baseline_eviction="online",
                    protocol="aware")
    assert calls == []


# --------------------------------------------------------------------------- PNG


def png_pixels(path) -> np.ndarray:
    """The PNG's RGB pixels as uint8 [H, W, 3] (read back with matplotlib)."""
    from matplotlib.image import imread

    return (imread(path)[..., :3] * 255).round().astype(np.uint8)


def count(pixels: np.ndarray, rgb) -> int:
    return int(np.all(pixels == np.array(rgb, dtype=np.uint8), axis=-1).sum())


def test_score_vs_kept_plot(tmp_path):
    rows = [
        {"policy": "full", "kept_fraction": 1.0, "score": 80.0},
        {"policy": "namm", "kept_fraction": 0.4, "score": 70.0},
        {"policy": "h2o", "kept_fraction": 0.25, "score": 30.0},
        {"policy": "h2o", "kept_fraction": 0.5, "score": 55.0},
    ]
    path = tmp_path / "plot.png"
    assert plot_score_vs_kept(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = png_pixels(path)
    assert pixels.shape == (440, 800, 3) and tuple(pixels[0, 0]) == (255, 255, 255)
    plot_area, legend = pixels[:, :555], pixels[:, 620:]  # the legend sits right of the axes
    for policy in ("full", "namm", "h2o"):
        assert count(plot_area, POLICY_RGB[policy]) >= 40, policy  # a whole square marker at least
        assert count(legend, POLICY_RGB[policy]) >= 20, policy  # its legend entry
    assert count(pixels, POLICY_RGB["tova"]) == 0
    assert not plot_score_vs_kept([], tmp_path / "empty.png")


def test_namm_marker_is_not_hidden_by_a_baseline_at_the_same_point(tmp_path):
    """With --match namm a baseline can land on the NAMM's exact (kept, score)
    point; the NAMM is drawn last, so its marker stays visible."""
    rows = [
        {"policy": "namm", "kept_fraction": 0.7, "score": 24.8},
        {"policy": "knorm", "kept_fraction": 0.7, "score": 24.8},
    ]
    path = tmp_path / "plot.png"
    assert plot_score_vs_kept(rows, path)
    plot_area = png_pixels(path)[:, :555]
    assert count(plot_area, POLICY_RGB["namm"]) >= 100  # the larger marker, on top
    assert count(plot_area, POLICY_RGB["knorm"]) == 0  # covered


def test_generation_axis_ticks_sit_on_whole_generations():
    """A fitness curve's x labels name the generation under them."""
    from namm_mlx.eval.plot import fitness_figure

    for last in (3, 10, 40):
        records = [{"generation": g, "best": 1.0, "mean": 0.5, "kept_fraction": 0.4} for g in range(1, last + 1)]
        fig = fitness_figure(records)
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), (last, ticks)


def test_plots_without_matplotlib_say_how_to_get_them(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if the [plot] extra were not installed
        "from namm_mlx.eval.plot import plot_score_vs_kept\n"
        "rows = [{'policy': 'namm', 'kept_fraction': 0.5, 'score': 1.0}]\n"
        f"print(plot_score_vs_kept(rows, {str(tmp_path / 'p.png')!r}), plot_score_vs_kept(rows, {str(tmp_path / 'q.png')!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False" and not (tmp_path / "p.png").exists()
    assert out.stderr.count("pip install 'namm-mlx[plot]'") == 1  # said once


# --------------------------------------------------------------------------- likelihood


class CharTokenizer:
    """Characters as token ids (vocab 97) and no chat template: enough for prompts."""

    chat_template = None
    bos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 97 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 32) for i in ids)


def test_answer_logprob_matches_one_forward():
    from tiny_models import tiny_model

    from namm_mlx import attach, detach
    from namm_mlx.cache import evict_now
    from namm_mlx.policies import make_scorer
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_model("llama")
    tok = CharTokenizer()
    item = {"_id": "i", "dataset": "needle", "context": "abcdefghij" * 80, "input": "what?", "answers": ["xyz"]}
    prompt = prompt_tokens(tok, item)[0]
    answer = tok.encode("xyz")
    assert len(prompt) > 512  # chunked prefill crosses an aligned boundary
    logits = model(mx.array([prompt + answer])).astype(mx.float32)[0]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    expected = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer))

    full = answer_logprob(model, tok, item, full_cache_factory(model))
    assert isinstance(full, float) and isinstance(full, LogProb)
    assert float(full) == pytest.approx(expected, abs=1e-3)
    assert full.tokens == 3 and full.mean == pytest.approx(expected / 3, abs=1e-3)

    attach(model, make_scorer("knorm", interval=128), keep_fraction=0.25)
    try:
        pairs = answer_logprobs(model, tok, [item], lambda: make_prompt_cache(model))
        assert pairs[0][0] == pytest.approx(float(full), abs=1e-6)
        assert abs(pairs[0][1] - float(full)) > 1e-3  # eviction changed the likelihood
        # precomputed full values are reused as given
        sentinel = LogProb(-1.0, 3)
        assert answer_logprobs(model, tok, [item], lambda: make_prompt_cache(model), full=[sentinel])[0][0] is sentinel
    finally:
        detach(model)
    seen = []
    attach(model, make_scorer("snapkv"), keep_fraction=0.25)
    try:
        snap = answer_logprob(model, tok, item, lambda: make_prompt_cache(model),
                              after_prefill=lambda c: seen.append(evict_now(c)))
    finally:
        detach(model)
    assert seen == [3] and abs(snap - float(full)) > 1e-3


# --------------------------------------------------------------------------- shared prefill


def test_shared_prefill_matches_each_policy_own_prefill(tmp_path, tokenizer, source, wide_tiny_model):
    """One prefill forked per policy gives the records each one-shot policy gets
    from its own prefill (SnapKV, TOVA, KNorm, streaming: identical arithmetic,
    so identical answers), with the budget applied and the full cache intact.
    The arithmetic is the same for any weights: a tiny random model with the
    real tokenizer stands in for SmolLM2."""
    import namm_mlx
    from namm_mlx.policies import make_scorer

    model, tok = wide_tiny_model, tokenizer
    (item,) = make_items(["passkey"], [700], 1, 3, source, tok)
    budget = Budget(keep_fraction=0.3)
    policies = ["snapkv", "tova", "knorm", "streaming"]
    runs = [PolicyRun("full")] + [PolicyRun(p, budget) for p in policies]
    results = runner.run_eval(model, tok, [item], runs, tmp_path, progress=False, log=lambda m: None, max_tokens=8,
                              protocol="aware", baseline_eviction="prompt")
    records = {r["policy"]: r for r in read_predictions(tmp_path / "predictions.jsonl")}
    assert set(records) == {"full", *policies} and results["complete"]
    assert records["full"]["kept_fraction"] == 1.0
    prompt_len = records["full"]["prompt_tokens"]
    for policy in policies:
        r = records[policy]
        assert r["eviction"] == "prompt" and r["prefill_tps"] == records["full"]["prefill_tps"]
        assert r["kept_fraction"] == pytest.approx(math.ceil(0.3 * (prompt_len - 1)) / (prompt_len - 1), abs=1e-9)
        namm_mlx.attach(model, make_scorer(policy, interval=None), keep_fraction=0.3)
        try:
            prompt, _, limit = runner.prepare_prompt(tok, item, None, 8, None)
            own = runner.generate_answer(model, tok, prompt, limit, one_shot=True)
        finally:
            namm_mlx.detach(model)
        assert own["prediction"] == r["prediction"], policy
        assert own["kept_fraction"] == r["kept_fraction"], policy


def test_resume_refuses_namm_results_from_other_weights(tmp_path):
    from namm_mlx import NAMM

    items = _items(1)
    run = PolicyRun("namm")
    from namm_mlx.integration import as_scorer

    zero = NAMM.zeros()

    own = runner.namm_fingerprint(as_scorer(zero))
    other = runner.namm_fingerprint(as_scorer(NAMM.from_flat(np.full(4172, 0.1, np.float32), zero.norm_mean, zero.norm_var)))
    assert own != other and len(own) == 12
    record = dict(_record(items[0], run), namm_sha=other)
    (tmp_path / "predictions.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(EvalError, match="other weights"):
        runner.run_eval(None, None, items, [run], tmp_path, namm=zero, progress=False, log=lambda m: None, protocol="aware")
    # results of the same weights resume: nothing left to do, no model needed
    (tmp_path / "predictions.jsonl").write_text(json.dumps(dict(record, namm_sha=own)) + "\n")
    results = runner.run_eval(None, None, items, [run], tmp_path, namm=zero, progress=False, log=lambda m: None, protocol="aware")
    assert results["complete"]


# --------------------------------------------------------------------------- query-agnostic protocol


def test_split_prompt_is_what_namm_chat_feeds(tokenizer, source):
    from namm_mlx.eval.query_agnostic import HOP, QueryAgnosticError, split_prompt
    from namm_mlx.session import first_turn_parts

    (item,) = make_items(["passkey"], [700], 1, 3, source, tokenizer)
    split = split_prompt(tokenizer, item)
    before, after = first_turn_parts(tokenizer, item["context"])
    chat_document = encode(tokenizer, before)
    assert len(split.document) % HOP == 0 and 0 <= len(chat_document) - len(split.document) < HOP
    assert split.document == chat_document[: len(split.document)]
    assert split.question == chat_document[len(split.document):] + encode(tokenizer, item["input"] + after)
    assert item["input"] not in tokenizer.decode(split.document) and not split.truncated
    # too long: the document loses its middle, the question stays whole
    short = split_prompt(tokenizer, item, max_prompt_tokens=300)
    assert short.truncated and len(short.tokens) <= 300 and short.question[-len(split.question) + HOP:] == split.question[-len(split.question) + HOP:]
    # a LongBench template is split at the question too; one that asks first cannot be
    templated = split_prompt(tokenizer, item, templates={"passkey": "Text: {context}\nQuestion: {input}\nAnswer:"})
    assert len(templated.document) % HOP == 0 and "Question:" not in tokenizer.decode(templated.document)
    with pytest.raises(QueryAgnosticError, match="before the document"):
        split_prompt(tokenizer, item, templates={"passkey": "Question: {input}\n{context}"})


@pytest.fixture(scope="module")
def wide_tiny_model(tokenizer):
    """A tiny random llama with the real tokenizer's vocabulary (so prompts and
    generation go through the real chat template and detokenizer)."""
    from tiny_models import tiny_model

    return tiny_model("llama", seed=1, vocab_size=len(tokenizer.vocab))


def _random_namm(seed=0, scale=0.3):
    from namm_mlx import NAMM

    zero = NAMM.zeros()
    vector = np.random.default_rng(seed).normal(0, scale, zero.to_flat().shape).astype(np.float32)
    return NAMM.from_flat(vector, zero.norm_mean, zero.norm_var)


def _qa_items(questions):
    context = " ".join(f"Room {i} of the old house has a {c} door and {i + 2} windows." for i, c in
                       zip(range(40), ["red", "blue", "green", "white"] * 10))
    return [{"_id": f"q{i}", "dataset": "needle", "context": context, "input": q, "answers": ["red"], "length": 1024}
            for i, q in enumerate(questions)]


def test_query_agnostic_kept_sets_do_not_depend_on_the_question(tmp_path, tokenizer, wide_tiny_model):
    """Every policy (full, NAMM ranked and at its threshold, every baseline),
    evicting online at one fixed budget: two questions about one document leave
    identical kept positions; the budget is the same number of tokens for all;
    each pair records its recall."""
    from namm_mlx.policies import POLICY_NAMES

    items = _qa_items(["What colour is the door of room 0?", "How many windows does room 17 have, and why?"])
    runs = [PolicyRun("namm")] + plan_runs(list(POLICY_NAMES), parse_budgets("0.3"), budget_namm=True)
    assert [r.label for r in runs] == ["namm", "full", "namm@0.3", "streaming@0.3", "h2o@0.3", "snapkv@0.3", "tova@0.3",
                                       "knorm@0.3", "random@0.3"]
    results = runner.run_eval(wide_tiny_model, tokenizer, items, runs, tmp_path, namm=_random_namm(), max_tokens=2,
                              progress=False, log=lambda m: None)
    assert results["complete"] and results["protocol"] == "agnostic"
    records = read_predictions(tmp_path / "predictions.jsonl")
    assert len(records) == 2 * len(runs)
    by = {(r["_id"], r["policy"], r["budget"]): r for r in records}
    doc = records[0]["document_tokens"]
    assert doc > 512 and doc % 16 == 0  # at least one cadence step, then the forced one at the end
    budget = math.ceil(0.3 * doc)
    digests = set()
    for run in runs:
        a, b = by[("q0", run.policy, run.budget_label)], by[("q1", run.policy, run.budget_label)]
        assert a["question_tokens"] != b["question_tokens"]
        assert a["kept_digest"] == b["kept_digest"], run.label
        assert a["protocol"] == "agnostic" and a["eviction"] == ("full" if run.policy == "full" else "online")
        digests.add(a["kept_digest"])
        for r in (a, b):
            assert 0.0 <= r["recall"] <= 1.0 and 0.0 <= r["recall_final"] <= 1.0
            assert len(r["recall_per_layer"]) == 3
            if run.budget is not None:
                assert r["max_kv_size"] == budget and r["kept_fraction"] == pytest.approx(budget / doc)
                assert r["recall_offsets"] == [512, doc] and r["recall"] < 1.0
    assert by[("q0", "full", "-")]["recall"] == 1.0 and by[("q0", "full", "-")]["kept_fraction"] == 1.0
    assert len(digests) == len(runs)  # the digest tells policies apart
    rows = {t["run"]: t for t in results["by_task"]}
    assert rows["h2o@0.3"]["recall"] == pytest.approx((by[("q0", "h2o", "0.3")]["recall"] + by[("q1", "h2o", "0.3")]["recall"]) / 2, abs=1e-4)
    lo, hi = rows["h2o@0.3"]["recall_ci"]
    assert lo <= rows["h2o@0.3"]["recall"] <= hi and rows["full"]["score_ci"] is not None
    # where recall is lost: per layer and per step, averaged over the items
    assert len(rows["h2o@0.3"]["recall_per_layer"]) == 3 and len(rows["h2o@0.3"]["recall_per_step"]) == 2
    assert np.mean(rows["h2o@0.3"]["recall_per_step"]) == pytest.approx(rows["h2o@0.3"]["recall"], abs=1e-3)


def test_recall_only_resume_and_protocols_kept_apart(tmp_path, tokenizer, wide_tiny_model):
    items = _qa_items(["What colour is the door of room 0?"])
    runs = [PolicyRun("full"), PolicyRun("knorm", Budget(max_kv_size=200))]
    pred = tmp_path / "predictions.jsonl"
    old = dict(_record(items[0], runs[0]), _id=items[0]["_id"])  # a question-aware record (no protocol field)
    pred.write_text(json.dumps(old) + "\n")
    logs = []
    kwargs = dict(max_tokens=2, progress=False, log=logs.append)
    results = runner.run_eval(wide_tiny_model, tokenizer, items, runs, tmp_path, recall_only=True, **kwargs)
    assert any("question-aware protocol" in m for m in logs)
    assert results["complete"] and {o["run"]: o["score"] for o in results["overall"]} == {"full": None, "knorm@kv200": None}
    knorm = next(o for o in results["overall"] if o["run"] == "knorm@kv200")
    assert knorm["n"] == 0 and knorm["n_recall"] == 1 and 0 < knorm["recall"] < 1
    assert "-" in runner.format_table(results).splitlines()[-1].split()
    fresh = [r for r in read_predictions(pred) if r.get("protocol") == "agnostic"]
    assert len(fresh) == 2 and all(r["score"] is None and r["prediction"] is None for r in fresh)
    # a scored run redoes the recall-only pairs; the old question-aware line stays and stays apart
    results = runner.run_eval(wide_tiny_model, tokenizer, items, runs, tmp_path, **kwargs)
    assert len(read_predictions(pred)) == 5
    assert results["complete"] and all(o["score"] is not None and o["n"] == 1 for o in results["overall"])
    # nothing is left to do for either kind of run
    for recall_only in (False, True):
        runner.run_eval(None, None, items, runs, tmp_path, recall_only=recall_only, **kwargs)
    assert len(read_predictions(pred)) == 5
    with pytest.raises(EvalError, match="query-agnostic"):
        runner.run_eval(None, None, items, runs, tmp_path, recall_only=True, protocol="aware", **kwargs)
    # a one-shot policy evicts nothing before the document's end, so the replay
    # (recall-only) gives exactly its online kept set and recall
    for recall_only in (True, False):
        runner.run_eval(wide_tiny_model, tokenizer, items, runs[1:], tmp_path, recall_only=recall_only,
                        baseline_eviction="prompt", **kwargs)
    replayed, online = [r for r in read_predictions(pred) if r.get("eviction") == "prompt"]
    assert replayed["score"] is None and online["score"] is not None
    assert replayed["kept_digest"] == online["kept_digest"] and replayed["recall"] == pytest.approx(online["recall"], abs=1e-6)


def test_budgets_and_plans_of_the_query_agnostic_protocol():
    runs = plan_runs(["full", "namm", "namm2", "h2o"], parse_budgets("0.25,1024"), budget_namm=True)
    assert [r.label for r in runs] == ["full", "namm@0.25", "namm@kv1024", "namm2@0.25", "namm2@kv1024", "h2o@0.25",
                                       "h2o@kv1024"]
    # with --match namm the NAMM's own threshold run comes first; namm2 is not matched to itself
    matched = plan_runs(["namm", "namm2", "h2o"], parse_budgets("0.5"), match="namm", budget_namm=True)
    assert [r.label for r in matched] == ["namm", "namm@0.5", "namm2@0.5", "h2o@0.5", "h2o@match:namm"]
    assert [r.label for r in plan_runs(["namm"], [], budget_namm=True)] == ["namm"]
    # fractions of the document become tokens per layer, rounded up; token budgets stay
    assert runner.document_budget(PolicyRun("h2o", Budget(keep_fraction=0.25)), "needle", 1001) == 251
    assert runner.document_budget(PolicyRun("namm", Budget(max_kv_size=1024)), "needle", 4096) == 1024
    assert runner.document_budget(PolicyRun("full"), "needle", 4096) is None
    table = matched_budgets([{"policy": "namm", "budget": "-", "dataset": "needle", "length": 2048, "kept_fraction": 0.4},
                             {"policy": "namm", "budget": "0.5", "dataset": "needle", "length": 2048, "kept_fraction": 0.5}])
    assert table["needle@2048"]["n"] == 1  # only the NAMM's threshold run sets the match
    assert runner.document_budget(PolicyRun("h2o", Budget(match="namm")), "needle", 2000, table, 2048) == 800


def test_match_namm_under_the_query_agnostic_protocol(tmp_path, tokenizer, wide_tiny_model):
    """--match namm: the NAMM's own threshold run goes first over every item; the
    baseline then keeps that share of each document as a fixed token budget."""
    items = _qa_items(["What colour is the door of room 0?", "Which room has 9 windows?"])
    runs = plan_runs(["h2o"], [], match="namm", budget_namm=True)
    assert [r.label for r in runs] == ["namm", "h2o@match:namm"]
    results = runner.run_eval(wide_tiny_model, tokenizer, items, runs, tmp_path, namm=_random_namm(scale=0.05),
                              recall_only=True, progress=False, log=lambda m: None)
    records = read_predictions(tmp_path / "predictions.jsonl")
    assert [r["policy"] for r in records] == ["namm", "namm", "h2o", "h2o"]  # the NAMM over every item first
    share = sum(r["kept_fraction"] for r in records[:2]) / 2
    assert 0 < share < 1 and results["matched_budgets"]["needle@1024"]["kept_fraction"] == pytest.approx(share)
    for r in records[2:]:
        assert r["max_kv_size"] == math.ceil(share * r["document_tokens"]) and r["eviction"] == "replay"


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_contains_the_mean_and_narrows_with_items():
    from namm_mlx.eval.bootstrap import bootstrap_interval

    rng = np.random.default_rng(1)
    few, many = rng.integers(0, 2, 12).astype(float), rng.integers(0, 2, 400).astype(float)
    lo, hi = bootstrap_interval([few])
    assert lo <= few.mean() <= hi and 0.0 <= lo < hi <= 1.0
    lo2, hi2 = bootstrap_interval([many])
    assert lo2 <= many.mean() <= hi2 and (hi2 - lo2) < (hi - lo) / 2
    assert bootstrap_interval([few]) == (lo, hi)  # fixed seed: the same interval every time
    assert bootstrap_interval([[0.7] * 5]) == pytest.approx((0.7, 0.7))
    assert bootstrap_interval([]) is None
    # stratified: each task keeps its item count; the centre is the mean of the task means
    lo3, hi3 = bootstrap_interval([[1.0] * 3, [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    assert lo3 <= (1.0 + 1 / 3) / 2 <= hi3 and lo3 >= 0.5
