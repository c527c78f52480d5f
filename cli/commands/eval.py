"""``namm eval``: score eviction policies on long-context tasks.

Synthetic tasks built from real public-domain texts (``--tasks``) or LongBench
JSONL files (``--data``), every policy at fixed budgets (fractions of the
document or tokens per layer) or at the NAMM's own measured budget
(``--match namm``). By default the document is compressed before the question
is seen, as in ``namm chat`` (``--query-aware`` puts the question in the
compressed prompt instead), and every pair also gets its future-attention
recall. Writes ``results.json``, ``predictions.jsonl`` (resumable) and
``score_vs_kept.png`` to ``--out``. The logic lives in ``namm_mlx.eval``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from namm_mlx.policies import REGISTRY, policy_names

from ..errors import fail, user_errors


def policy_help() -> str:
    """``--policy``'s help: every registered policy by name."""
    return f"comma-separated policies: {','.join(policy_names())} (default: all)"


def policies_epilog() -> str:
    """One line per registered policy (its class's ``help``), below the options."""
    width = max(len(name) for name in REGISTRY)
    lines = [f"  {name:<{width}}  {cls.help}" for name, cls in REGISTRY.items()]
    return "\b\nPolicies:\n" + "\n".join(lines)  # \b: click keeps these lines as they are


def _csv(text: Optional[str]) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _ints(text: Optional[str], what: str) -> list[int]:
    try:
        return [int(p) for p in _csv(text)]
    except ValueError:
        fail(f"{what} must be comma-separated integers, got {text!r}")


def _floats(text: Optional[str], what: str) -> list[float]:
    try:
        return [float(p) for p in _csv(text)]
    except ValueError:
        fail(f"{what} must be comma-separated numbers, got {text!r}")


def _namm_available(namm: Optional[str]) -> bool:
    from namm_mlx.integration import DEFAULT_NAMM_DIR

    return namm is not None or (DEFAULT_NAMM_DIR / "namm.safetensors").is_file()


def eval_command(
    out: Path = typer.Option(..., "--out", help="output folder (results.json, predictions.jsonl, score_vs_kept.png)"),
    model: Optional[str] = typer.Option(None, "--model", help="mlx-lm folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)"),
    policy: Optional[str] = typer.Option(None, "--policy", help=policy_help()),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="synthetic tasks: needle,multi_needle,passkey,kjv_verse,chapter (default: all)"),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="LongBench JSONL file (repeatable); replaces --tasks"),
    budget: Optional[str] = typer.Option(
        None, "--budget",
        help="budgets: fractions of the document (0.25,0.5: ceil(f x document tokens) per layer; with --query-aware, "
        "a cap on the share of tokens seen) and/or tokens per layer (1024); default 0.5 unless --match",
    ),
    match: Optional[str] = typer.Option(
        None, "--match",
        help="'namm': also run the NAMM at its own threshold and each baseline at the NAMM's mean kept fraction per task and length",
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="items per task and length (default 5); with --data, the first N per dataset"),
    lengths: str = typer.Option("2048,4096", "--lengths", help="synthetic prompt lengths in tokens"),
    depths: Optional[str] = typer.Option(None, "--depths", help="needle depths in [0,1] cycled over items (default 0.1,0.5,0.9,0.3,0.7)"),
    seed: int = typer.Option(0, "--seed", help="seed for the synthetic items (and the random policy)"),
    namm: Optional[str] = typer.Option(None, "--namm", help="NAMM folder (default: the one shipped in weights/)"),
    namm2: Optional[str] = typer.Option(None, "--namm2", help="a second NAMM folder, evaluated as policy 'namm2' (e.g. a distilled one)"),
    text: Optional[List[Path]] = typer.Option(None, "--text", help="text file for the tasks (.txt prose, .tsv KJV; repeatable; default: the `namm data fetch` cache)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="answer length for every item (default: per task / LongBench dataset)"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="prompt + answer token budget (default: the model's context)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="LongBench's config/dataset2prompt.json, for its official prompt templates"),
    baseline_eviction: str = typer.Option(
        "online", "--baseline-eviction",
        help="'online': baselines evict every 512 tokens like the NAMM; 'prompt': they compress once, after the "
        "document (with --query-aware: after the prompt, kvpress-style, one shared prefill per item)",
    ),
    query_aware: bool = typer.Option(
        False, "--query-aware", "--question-in-context",
        help="question-aware one-shot protocol: compress the prompt with the question in it (default: the document "
        "is read and compressed before the question, as in namm chat)",
    ),
    recall_only: bool = typer.Option(False, "--recall-only", help="only measure future-attention recall (no answers): cheap, for many items"),
    no_recall: bool = typer.Option(False, "--no-recall", help="skip the future-attention recall (one full-cache pass per item)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress line on stderr"),
) -> None:
    """Evaluate eviction policies: a task x policy table, results.json, predictions.jsonl and a plot."""
    from namm_mlx.eval import (
        TextSource,
        format_table,
        load_jsonl,
        make_items,
        parse_budgets,
        plan_runs,
        run_eval,
    )
    from namm_mlx.eval.metrics import TASK_METRICS
    from namm_mlx.eval.prompts import context_limit_of, load_prompt_templates
    from namm_mlx.eval.tasks import TASK_NAMES

    protocol = "aware" if query_aware else "agnostic"
    with user_errors():
        if recall_only and (query_aware or no_recall):
            fail("--recall-only measures recall under the query-agnostic protocol: drop --query-aware / --no-recall")
        if data and tasks:
            fail("give either --tasks (synthetic) or --data (LongBench JSONL), not both")
        if limit is not None and limit < 1:
            fail("--limit must be at least 1")
        if baseline_eviction not in ("prompt", "online"):
            fail(f"--baseline-eviction must be 'prompt' or 'online', got {baseline_eviction!r}")
        if policy:
            policies = _csv(policy)
        else:
            policies = list(policy_names())
            if not _namm_available(namm) and not match:
                policies.remove("namm")
                print("note: no NAMM installed in weights/default; skipping the namm policy (give --namm DIR)", file=sys.stderr)
        if namm2 and "namm2" not in policies:
            policies.insert(policies.index("namm") + 1 if "namm" in policies else 0, "namm2")
        if "namm2" in policies and not namm2:
            fail("the namm2 policy needs a second NAMM folder: give --namm2 DIR")
        budgets = parse_budgets(budget if budget is not None else (None if match else "0.5"))
        runs = plan_runs(policies, budgets, match, budget_namm=not query_aware)
        if any(r.policy == "namm" for r in runs) and not _namm_available(namm):
            fail("the namm policy needs a NAMM: give --namm DIR (none is installed in weights/default)")
        task_names = _csv(tasks) or list(TASK_NAMES)
        unknown = [t for t in task_names if t not in TASK_NAMES]
        if unknown and not data:
            fail(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASK_NAMES)}")
        length_list = _ints(lengths, "--lengths")
        depth_list = _floats(depths, "--depths")
        if any(not 0 <= d <= 1 for d in depth_list):
            fail("--depths must lie in [0, 1]")
        templates = load_prompt_templates(prompts) if prompts else None
        if data:
            items = [item for path in data for item in load_jsonl(path, limit)]
        elif text:
            source = TextSource.from_files(text)
        else:
            need_kjv = "kjv_verse" in task_names
            source = TextSource.from_cache(prose=any(t != "kjv_verse" for t in task_names), kjv=need_kjv)

        from namm_mlx.models import resolve_model_path
        from namm_mlx.session import load_mlx_model

        path = resolve_model_path(model)
        loaded, tokenizer, config = load_mlx_model(path)
        context = max_length or context_limit_of(loaded, config)
        if not data:
            longest = max(TASK_METRICS[t][1] for t in task_names)
            if context and max(length_list) + (max_tokens or longest) > context:
                print(
                    f"note: lengths above {context - (max_tokens or longest)} are capped to fit the model's "
                    f"{context}-token context with room for the answer",
                    file=sys.stderr,
                )
            items = make_items(
                task_names, length_list, limit or 5, seed, source, tokenizer,
                depths=depth_list or None,
                max_prompt_tokens=context - (max_tokens or longest) if context else None,
            )
        config_out = {
            "model": str(path),
            "policies": [r.label for r in runs],
            "tasks": None if data else task_names,
            "data": [str(p) for p in data] if data else None,
            "lengths": None if data else length_list,
            "limit": limit,
            "seed": seed,
            "budgets": [b.label for b in budgets],
            "match": match,
            "match_scope": "task_length" if match else None,
            "protocol": protocol,
            "baseline_eviction": baseline_eviction,
            "recall": not no_recall and not query_aware,
            "recall_only": recall_only,
            "namm": namm,
            "namm2": namm2,
            "context_limit": context,
            "items": len(items),
            "command": "namm eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else None,
        }
        try:
            results = run_eval(
                loaded, tokenizer, items, runs, out,
                namm=namm, namm2=namm2, seed=seed, context_limit=context, max_tokens=max_tokens,
                templates=templates, config=config_out, progress=not no_progress,
                baseline_eviction=baseline_eviction, protocol=protocol,
                recall=not no_recall, recall_only=recall_only,
            )
        except KeyboardInterrupt:
            print(f"\ninterrupted: finished pairs are in {out / 'predictions.jsonl'}; rerun the same command to resume", file=sys.stderr)
            raise typer.Exit(130)
        print(format_table(results))
        if results.get("matched_budgets"):
            for task, m in results["matched_budgets"].items():
                if protocol == "agnostic":
                    print(f"matched budget on {task}: {m['kept_fraction']:.3f} of the document from {m['n']} NAMM items")
                elif baseline_eviction == "prompt":
                    print(f"matched budget on {task}: keep_fraction {m['kept_fraction']:.3f} from {m['n']} NAMM items")
                else:
                    print(f"matched budget on {task}: keep_fraction {m['step_kept_fraction']:.3f} "
                          f"(snapkv {m['kept_fraction']:.3f}) from {m['n']} NAMM items")
        done = results["pairs"]
        print(f"wrote {out / 'results.json'}, {out / 'predictions.jsonl'} ({done['done']}/{done['planned']} pairs)"
              + (f", {out / results['plot']}" if results.get("plot") else ""))
