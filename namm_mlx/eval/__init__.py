"""Evaluation: synthetic long-context tasks from real texts, LongBench JSONL
files, LongBench's metrics, every eviction policy at fixed or matched budgets
(query-agnostic by default: the document is compressed before the question),
future-attention recall, bootstrap intervals, and an answer-likelihood score
for cheap evolution fitness.

Entry points: ``namm eval`` (``cli/commands/eval.py``), :func:`run_eval`,
:func:`make_items`, :func:`load_jsonl`, :func:`score_prediction`,
:func:`split_prompt`, :func:`bootstrap_interval`,
:func:`answer_logprob` / :func:`answer_logprobs`.
"""

from ..prefill import prefill
from .bootstrap import bootstrap_interval
from .likelihood import LogProb, answer_logprob, answer_logprobs, full_cache_factory, reference_answer
from .longbench import DataFileError, load_jsonl
from .metrics import (
    DATASET2MAXLEN,
    DATASET2METRIC,
    TASK_METRICS,
    classification_score,
    code_sim_score,
    count_score,
    fuzz_ratio,
    max_new_tokens,
    metric_for,
    normalize_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_l_score,
    rouge_zh_score,
    score_prediction,
    substring_match,
)
from .prompts import middle_truncate, prompt_tokens
from .query_agnostic import QueryAgnosticError, SplitPrompt, read_document, split_prompt
from .plan import (
    PROTOCOLS,
    Budget,
    EvalError,
    PolicyRun,
    document_budget,
    effective_budget,
    matched_budgets,
    parse_budgets,
    plan_runs,
)
from .report import format_table, summarize, write_results
from .runner import run_eval
from .store import pending_pairs, read_predictions
from .tasks import DEFAULT_DEPTHS, TASK_NAMES, TaskError, TextSource, make_item, make_items

__all__ = [
    "Budget",
    "PROTOCOLS",
    "QueryAgnosticError",
    "SplitPrompt",
    "DATASET2MAXLEN",
    "DATASET2METRIC",
    "DEFAULT_DEPTHS",
    "DataFileError",
    "EvalError",
    "LogProb",
    "PolicyRun",
    "TASK_METRICS",
    "TASK_NAMES",
    "TaskError",
    "TextSource",
    "answer_logprob",
    "answer_logprobs",
    "bootstrap_interval",
    "classification_score",
    "code_sim_score",
    "count_score",
    "document_budget",
    "effective_budget",
    "format_table",
    "full_cache_factory",
    "fuzz_ratio",
    "load_jsonl",
    "make_item",
    "make_items",
    "matched_budgets",
    "max_new_tokens",
    "metric_for",
    "middle_truncate",
    "normalize_answer",
    "parse_budgets",
    "pending_pairs",
    "plan_runs",
    "prefill",
    "prompt_tokens",
    "qa_f1_score",
    "qa_f1_zh_score",
    "read_document",
    "read_predictions",
    "reference_answer",
    "retrieval_score",
    "retrieval_zh_score",
    "rouge_l_score",
    "rouge_zh_score",
    "run_eval",
    "score_prediction",
    "split_prompt",
    "substring_match",
    "summarize",
    "write_results",
]
