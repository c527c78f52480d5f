"""What an evaluation runs: the policies at their budgets (:class:`PolicyRun`),
and the budget each run gets on an item (fixed, or matched to the NAMM's)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence


from ..errors import NammError
from ..policies import NAMMScorer, policy_class, policy_names

#: Policies scored by a NAMM: the shipped (or ``--namm``) one and a second one.
NAMM_POLICIES = (NAMMScorer.name, "namm2")
#: Baseline schedules: at the 512 cadence, or compress once (after the document
#: or, question-aware, after the prompt).
BASELINE_EVICTION = ("online", "prompt")
#: Evaluation protocols: document compressed before the question, or question in context.
PROTOCOLS = ("agnostic", "aware")
#: Eviction cadence of every online policy (the NAMM's ``update_interval``).
INTERVAL = 512
#: Prompt queries kept through the shared prefill (SnapKV's window, TOVA's last).
SHARED_QUERY_ROWS = 32


class EvalError(NammError, ValueError):
    """The evaluation cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Budget:
    """How much a baseline may keep: a fraction, an absolute size, or the NAMM's."""

    keep_fraction: float | None = None
    max_kv_size: int | None = None
    match: str | None = None

    @property
    def label(self) -> str:
        if self.match:
            return f"match:{self.match}"
        if self.max_kv_size is not None:
            return f"kv{self.max_kv_size}"
        return f"{self.keep_fraction:g}"


def parse_budgets(text: str | None) -> list[Budget]:
    """``"0.25,0.5"`` -> fractions; integers above 1 (``"1024"``) -> ``max_kv_size``."""
    budgets = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise EvalError(f"bad budget {part!r}: give a kept fraction in (0, 1] or a token count") from None
        if 0.0 < value <= 1.0:
            budgets.append(Budget(keep_fraction=value))
        elif value > 1 and value == int(value):
            budgets.append(Budget(max_kv_size=int(value)))
        else:
            raise EvalError(f"bad budget {part!r}: give a kept fraction in (0, 1] or a token count")
    return budgets


@dataclass(frozen=True)
class PolicyRun:
    """One policy at one budget (``budget`` is None for full and namm)."""

    policy: str
    budget: Budget | None = None

    @property
    def budget_label(self) -> str:
        return self.budget.label if self.budget else "-"

    @property
    def label(self) -> str:
        return self.policy if self.budget is None else f"{self.policy}@{self.budget.label}"


def plan_runs(
    policies: Sequence[str], budgets: Sequence[Budget], match: str | None = None, budget_namm: bool = False
) -> list[PolicyRun]:
    """Every (policy, budget) run, the NAMMs' own runs first (``match`` needs them).

    ``match="namm"`` adds a matched budget for every baseline (and the NAMM run
    if it was not asked for). Baselines with neither budgets nor ``match`` fail.
    budget_namm: the NAMMs run at every budget too (ranked, the query-agnostic
    protocol), and at their own threshold only under ``match`` or without budgets.
    """
    known = (*policy_names(), *NAMM_POLICIES[1:])
    policies = list(dict.fromkeys(p.strip() for p in policies if p.strip()))
    unknown = [p for p in policies if p not in known]
    if unknown:
        raise EvalError(f"unknown polic{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; known: {', '.join(known)}")
    if match not in (None, "namm"):
        raise EvalError(f"--match only knows 'namm', got {match!r}")
    if match and "namm" not in policies:
        policies.insert(0, "namm")
    namms = [p for p in NAMM_POLICIES if p in policies]
    runs: list[PolicyRun] = []
    for policy in namms:
        if not budget_namm or not budgets or (match and policy == "namm"):
            runs.append(PolicyRun(policy))
    if "full" in policies:
        runs.append(PolicyRun("full"))
    budgeted = (namms if budget_namm else []) + [p for p in policies if takes_budget(p)]
    for policy in budgeted:
        chosen = list(budgets) + ([Budget(match=match)] if match and policy not in NAMM_POLICIES else [])
        if not chosen:
            if policy in NAMM_POLICIES:
                continue
            raise EvalError(f"policy {policy!r} needs a budget (--budget F or --match namm)")
        runs.extend(PolicyRun(policy, b) for b in chosen)
    return runs


MATCH_SCOPES = ("task_length", "task", "overall")


def match_key(dataset: str, length: int | None = None) -> str:
    """Key of a (task, prompt length) group in :func:`matched_budgets`."""
    return f"{dataset}@{length}" if length else dataset


def matched_budgets(records: Iterable[Mapping[str, Any]], scope: str = "task_length") -> dict[str, dict[str, float]]:
    """The NAMM's mean kept fractions per task and prompt length (keys
    ``"needle@4096"``, ``scope="task_length"``: the NAMM keeps a smaller share of
    longer prompts, so each length is matched on its own), per dataset
    (``scope="task"``) or over all items (key ``"*"``, ``scope="overall"``).
    Items without a length (LongBench files) group by dataset.

    Each entry: ``kept_fraction`` (mean at the end of the prompt; under the
    query-agnostic protocol, at the end of the document),
    ``step_kept_fraction`` (mean at the NAMM's last eviction step; the end-of-prompt
    value for items where it never stepped) and ``n``.
    """
    if scope not in MATCH_SCOPES:
        raise EvalError(f"match scope must be one of {', '.join(MATCH_SCOPES)}, got {scope!r}")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get("policy") == "namm" and r.get("budget", "-") == "-":
            key = {"task_length": match_key(r["dataset"], r.get("length")), "task": r["dataset"], "overall": "*"}[scope]
            groups.setdefault(key, []).append(r)
    out = {}
    for key, rows in groups.items():
        kept = [float(r["kept_fraction"]) for r in rows]
        step = [float(r["step_kept_fraction"] if r.get("step_kept_fraction") is not None else r["kept_fraction"]) for r in rows]
        out[key] = {"kept_fraction": sum(kept) / len(kept), "step_kept_fraction": sum(step) / len(step), "n": len(rows)}
    return out


def policy_of(policy: str) -> type:
    """The registered class behind an evaluated policy (``namm2`` is a second NAMM)."""
    return policy_class(NAMMScorer.name if policy in NAMM_POLICIES else policy)


def takes_budget(policy: str) -> bool:
    """Whether ``policy`` runs at each budget (the NAMMs do only with ``budget_namm``)."""
    return policy_of(policy).takes_budget


def is_one_shot(policy: str, baseline_eviction: str = "prompt") -> bool:
    """Whether ``policy`` compresses once after the prompt under this schedule
    (question-aware ``"online"``: only the policies one-shot by default)."""
    if not takes_budget(policy):
        return False
    return baseline_eviction == "prompt" or policy_of(policy).one_shot_default


def effective_budget(
    run: PolicyRun,
    dataset: str,
    matched: Mapping[str, Mapping[str, float]] | None = None,
    baseline_eviction: str = "prompt",
    length: int | None = None,
) -> tuple[float | None, int | None]:
    """``(keep_fraction, max_kv_size)`` for ``run`` on an item of ``dataset``
    (and ``length``: a matched budget is looked up per task and length, then per
    task, then overall)."""
    if run.budget is None:
        return None, None
    if run.budget.match:
        table = matched or {}
        m = table.get(match_key(dataset, length)) or table.get(dataset) or table.get("*")
        if m is None:
            raise EvalError(f"no NAMM results on {dataset!r} to match {run.policy}'s budget to")
        one_shot = is_one_shot(run.policy, baseline_eviction)
        value = m["kept_fraction"] if one_shot else m["step_kept_fraction"]
        return min(1.0, max(value, 1e-6)), None
    return run.budget.keep_fraction, run.budget.max_kv_size


def document_budget(
    run: PolicyRun,
    dataset: str,
    document_tokens: int,
    matched: Mapping[str, Mapping[str, float]] | None = None,
    length: int | None = None,
) -> int | None:
    """Tokens per layer (``max_kv_size``) ``run`` may keep under the query-agnostic
    protocol, for an item whose document part has ``document_tokens`` tokens.

    A fraction ``f`` (or the NAMM's matched kept fraction of the document) is
    ``ceil(f * document_tokens)``: a fixed budget that holds after every step,
    unlike the question-aware protocol's ``keep_fraction``, which caps the share
    of the tokens seen so far. None: no budget (full, the NAMM's own threshold).
    """
    if run.budget is None:
        return None
    if run.budget.max_kv_size is not None:
        return run.budget.max_kv_size
    if run.budget.match:
        table = matched or {}
        m = table.get(match_key(dataset, length)) or table.get(dataset) or table.get("*")
        if m is None:
            raise EvalError(f"no NAMM results on {dataset!r} to match {run.policy}'s budget to")
        fraction = min(1.0, max(m["kept_fraction"], 1e-6))
    else:
        fraction = run.budget.keep_fraction
    return max(1, math.ceil(fraction * document_tokens))
