"""LongBench's answer metrics, re-implemented without third-party packages.

Each metric takes ``(prediction, ground_truth, all_classes=None)`` and returns a
float in [0, 1]; :func:`score_prediction` applies LongBench's protocol (per
dataset post-processing, then the max over the reference answers).

Fidelity notes (LongBench's ``metrics.py`` depends on ``rouge``, ``fuzzywuzzy``
and ``jieba``; none is needed here):

* :func:`rouge_l_score` reproduces the ``rouge`` package (1.0.x) that LongBench
  calls: sentences split on ``"."``, words split on single spaces, the
  summary-level union-LCS with *set* semantics (``exclusive=True``: unique
  words), ``F = 2PR / (P + R + 1e-8)``, and 0 when either side has no sentence.
* :func:`fuzz_ratio` is the python-Levenshtein ratio that ``fuzz.ratio`` uses
  when that package is installed: ``2 * LCS / (len(a) + len(b))`` over
  characters (the indel similarity), rounded to an integer percentage.
* Chinese metrics split into characters instead of jieba words (a documented
  approximation: char-level F1 / Rouge-L).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Callable, Sequence

Metric = Callable[..., float]

_PUNCT = set(string.punctuation)
_ZH_PUNCT = set(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


# --------------------------------------------------------------------------- normalisation


def normalize_answer(s: str) -> str:
    """LongBench/SQuAD normalisation: lower case, drop ASCII punctuation, drop the
    articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lower case, drop ASCII and CJK punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in s.lower() if ch not in _ZH_PUNCT).split())


# --------------------------------------------------------------------------- token F1


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str], **_: Any) -> float:
    """Bag-of-tokens F1 between two token lists."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Token F1 after :func:`normalize_answer` (narrativeqa, qasper, hotpotqa, ...)."""
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(text: str) -> list[str]:
    """Characters (jieba words in LongBench), normalised, empties dropped."""
    return [t for t in (normalize_zh_answer(ch) for ch in text) if t]


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Char-level F1 for Chinese (LongBench segments with jieba)."""
    return f1_score(_zh_tokens(prediction), _zh_tokens(ground_truth))


# --------------------------------------------------------------------------- Rouge-L


def _sentences(text: str) -> list[str]:
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """One longest common subsequence of ``x`` and ``y`` (the ``rouge`` package's
    back-tracking order: diagonal on a match, else up when strictly longer, else left)."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, xi = table[i], table[i - 1], x[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out: list[str] = []
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Summary-level Rouge-L F (gov_report, qmsum, multi_news, samsum)."""
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    ref_words = {w for s in ref for w in s.split(" ")}
    hyp_words = {w for s in hyp for w in s.split(" ")}
    union: set[str] = set()
    for r in ref:
        r_words = r.split(" ")
        for h in hyp:
            union.update(_lcs_words(r_words, h.split(" ")))
    recall, precision = len(union) / len(ref_words), len(union) / len(hyp_words)
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def rouge_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Rouge-L over characters (LongBench: over jieba words) for dureader, vcsum."""
    return rouge_l_score(" ".join(prediction), " ".join(ground_truth))


# --------------------------------------------------------------------------- others


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None, **_: Any) -> float:
    """trec, lsht: the class names found in the prediction, minus those that are
    strict substrings of the answer; 1/len(found) when the answer is among them.

    Matches LongBench's loop, which removes from the list it iterates (so of two
    consecutive removable names only the first goes)."""
    if not all_classes:
        raise ValueError("classification_score needs all_classes (the item's 'all_classes')")
    matched = [c for c in all_classes if c in prediction]
    for term in matched:  # noqa: B038 - mutation during iteration is LongBench's behaviour
        if term in ground_truth and term != ground_truth:
            matched.remove(term)
    return 1.0 / len(matched) if ground_truth in matched else 0.0


def _number_match(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(target) for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_count (and our ``chapter`` task): the share of the numbers in the
    prediction that equal the answer."""
    return _number_match(prediction, ground_truth)


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_retrieval_en: the answer is "Paragraph N"; the share of numbers equal to N."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    return _number_match(prediction, found[0]) if found else 0.0


def retrieval_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_retrieval_zh: the answer is "段落N"."""
    found = re.findall(r"段落(\d+)", ground_truth)
    return _number_match(prediction, found[0]) if found else 0.0


def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` with python-Levenshtein: ``round(100 * 2*LCS/(|a|+|b|))``
    over characters; 0 when either string is empty."""
    if not a or not b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if ca == cb else max(prev[j], cur[j - 1]))
        prev = cur
    return int(round(100 * 2 * prev[-1] / (len(a) + len(b))))


def code_sim_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """lcc, repobench-p: the first prediction line without a backtick, ``#`` or
    ``//``, compared with :func:`fuzz_ratio`."""
    line = next(
        (l for l in prediction.lstrip("\n").split("\n") if "`" not in l and "#" not in l and "//" not in l), ""
    )
    return fuzz_ratio(line, ground_truth) / 100


def substring_match(prediction: str, ground_truth: str, **_: Any) -> float:
    """Needle tasks: 1 when the answer occurs in the prediction (case-insensitive)."""
    return float(ground_truth.strip().lower() in prediction.lower())


# --------------------------------------------------------------------------- registry

#: LongBench dataset -> metric (spec §8.1).
DATASET2METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_l_score,
    "qmsum": rouge_l_score,
    "multi_news": rouge_l_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_l_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

#: LongBench dataset -> max new tokens (``dataset2maxlen.json``, spec §8.1).
DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}

#: Datasets whose prediction is cut to its first line before scoring.
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

#: Synthetic tasks (namm_mlx.eval.tasks) -> (metric, max new tokens, aggregation).
#: aggregation "max": best over the answers (LongBench); "all": mean over the
#: answers (every needle must be recalled).
TASK_METRICS: dict[str, tuple[Metric, int, str]] = {
    "needle": (substring_match, 32, "max"),
    "multi_needle": (substring_match, 64, "all"),
    "passkey": (substring_match, 32, "max"),
    "kjv_verse": (qa_f1_score, 64, "max"),
    "chapter": (count_score, 32, "max"),
}

DEFAULT_MAX_TOKENS = 64


def base_dataset(dataset: str) -> str:
    """LongBench-E files name datasets ``qasper_e``; the metric is ``qasper``'s."""
    return dataset[:-2] if dataset.endswith("_e") and dataset[:-2] in DATASET2METRIC else dataset


def metric_for(dataset: str) -> tuple[Metric, str]:
    """``(metric, aggregation)`` for a dataset or task name; unknown names get qa-F1."""
    dataset = base_dataset(dataset)
    if dataset in TASK_METRICS:
        metric, _, how = TASK_METRICS[dataset]
        return metric, how
    return DATASET2METRIC.get(dataset, qa_f1_score), "max"


def metric_name(dataset: str) -> str:
    return metric_for(dataset)[0].__name__


def max_new_tokens(dataset: str, default: int = DEFAULT_MAX_TOKENS) -> int:
    """Generation length: LongBench's per-dataset value, the task's, else ``default``."""
    dataset = base_dataset(dataset)
    if dataset in TASK_METRICS:
        return TASK_METRICS[dataset][1]
    return DATASET2MAXLEN.get(dataset, default)


def postprocess(dataset: str, prediction: str) -> str:
    """LongBench scores only the first line for trec, triviaqa, samsum and lsht."""
    if base_dataset(dataset) in FIRST_LINE_DATASETS:
        return prediction.lstrip("\n").split("\n")[0]
    return prediction


def score_prediction(
    dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None
) -> float:
    """One item's score in [0, 1]: LongBench's max over the reference answers
    (mean over them for multi-needle recall)."""
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError(f"item of {dataset!r} has no reference answers")
    metric, how = metric_for(dataset)
    prediction = postprocess(dataset, prediction)
    scores = [float(metric(prediction, a, all_classes=all_classes)) for a in answers]
    return sum(scores) / len(scores) if how == "all" else max(scores)
