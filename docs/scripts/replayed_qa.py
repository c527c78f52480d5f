"""Replayed question answering: task scores for many items at the cost of one prefill each.

`namm eval` runs every policy's prefill through the model, so a 2,048-token item
costs a minute per policy on this CPU. Here each item's document (split as
`namm chat` splits it: query-agnostic) runs once through the full cache while
every layer's keys, values and queries are recorded. Each policy then replays
the recording through real evicting caches at a fixed budget (steps every 512
tokens and one at the document's end, as online; namm_mlx.eval.query_agnostic.
replay_kept_sets), and from the compressed caches the model

- answers the question greedily (the task score, as `namm eval` scores it),
- teacher-forces the reference answer (its mean log-probability, against the
  full cache's through the same path: a dense score in (0, ~1]),

and the kept sets say how much of the answer's own tokens in the document
survived (``fact_kept``: share over layers and KV heads; ``fact_whole``: share of
(layer, head) pairs that kept every answer token), and ``recall``: the share of
the later document's, the question's and the answer's attention (on the full
cache, every layer) that fell on the tokens the policy kept at each step
(namm_mlx.eval.recall; rows written before it was added have none).

The approximation is kvpress's: after a policy's first step, later tokens'
keys and queries come from the full cache, not from the evicted one. One-shot
policies are exact. Rows append to a JSONL file (resumable, item-major).

    python docs/scripts/replayed_qa.py OUT.jsonl [--namm NAME=DIR,...] [--tasks ...] [--lengths 2048] [--recordings DIR]
        [--limit 4] [--seed 0] [--budgets 0.25,0.5,1024,threshold] [--policies h2o,tova@0.5,...]
    python docs/scripts/replayed_qa.py OUT.jsonl [MORE.jsonl ...] --summary [--policies A,B,...] [--plot PNG --shipped NAME]
    python docs/scripts/replayed_qa.py OUT.jsonl [MORE.jsonl ...] --summary --gap A,B
"""

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx
import numpy as np

from namm_mlx.eval.facts import answer_positions

BASELINES = "h2o,tova,snapkv,knorm,streaming,random"
TASKS = "needle,multi_needle,passkey,kjv_verse,chapter"


def fact_survival(caches, positions: list[int]) -> tuple[float | None, float | None]:
    if not positions:
        return None, None
    wanted = np.asarray(positions)
    kept_share, whole = [], []
    for c in caches:
        pos = np.asarray(c.positions())[0]  # [H, L]
        for head in pos:
            hit = np.isin(wanted, head)
            kept_share.append(hit.mean())
            whole.append(float(hit.all()))
    return float(np.mean(kept_share)), float(np.mean(whole))


def pooled(scorer, kernel: int):
    """``scorer`` with every step's scores max-pooled over ``kernel`` neighbouring
    slots: a token is kept when any neighbour is, so whole numbers and words
    survive together (SnapKV pools its attention the same way)."""
    import dataclasses

    inner, half = scorer.score, kernel // 2

    def score(context):
        s = inner(context)
        x = s.scores
        pad = mx.full((*x.shape[:-1], half), -mx.inf, dtype=x.dtype)
        padded = mx.concatenate([pad, x, pad], axis=-1)
        n = x.shape[-1]
        out = x
        for shift in range(kernel):
            out = mx.maximum(out, padded[..., shift : shift + n])
        # ties broken towards the token's own score, so the pooled order is stable
        return dataclasses.replace(s, scores=out + 1e-6 * x)

    scorer.score = score
    return scorer


def recent_protected(scorer, window: int):
    """``scorer`` with the ``window`` newest tokens always kept (H2O's recent
    window, KVzap's last 128 tokens): a fact read just before the question has
    had too few later queries for any attention statistic to single it out."""
    import dataclasses

    from namm_mlx.selection import protect_recent

    inner = scorer.score

    def score(context):
        s = inner(context)
        lifted = protect_recent(s.scores.astype(mx.float32), context.positions, context.offset, window, float("-inf"))
        return dataclasses.replace(s, scores=lifted)

    scorer.score = score
    return scorer


def probe_protected(scorer, probe, span: int = 0):
    """``scorer`` with the tokens a key probe marks (and the ``span`` slots
    before each) kept first, as a NAMM with a key probe keeps them
    (``namm_mlx.key_probe``), so any rule can be given it."""
    import dataclasses

    from namm_mlx.key_probe import layer_marks, protect_marked

    inner = scorer.score

    def score(context):
        s = inner(context)
        marks = layer_marks(context.keys, probe[context.layer], span)
        return dataclasses.replace(s, scores=protect_marked(s.scores.astype(mx.float32), marks, float("-inf")))

    scorer.score = score
    return scorer


def answer_logprob(model, caches, question: list[int], answer: list[int]) -> float:
    """Mean log-probability of ``answer`` after ``question``, teacher-forced from
    forks of ``caches`` (the caches themselves stay as they are, for generation)."""
    from namm_mlx.eval.likelihood import target_logprob
    from namm_mlx.policies import FullScorer

    forks = [c.fork(FullScorer()) for c in caches]
    logits = model(mx.array([question + answer[:-1]]), cache=forks)[0, len(question) - 1 :].astype(mx.float32)
    return target_logprob(logits, answer).mean


def generate(model, tokenizer, caches, question: list[int], limit: int) -> str:
    import mlx_lm

    text = ""
    for response in mlx_lm.stream_generate(model, tokenizer, question, max_tokens=limit, prompt_cache=caches):
        text += response.text
    return text


def plot(by: dict, path: Path, shipped: str | None) -> None:
    """Score against kept share, one line per policy over its budgets, one
    figure per document length (``path`` gains ``-LENGTH`` before ``.png``);
    the full cache is each line's point at 1.0, and ``shipped`` is drawn as
    the highlighted NAMM."""
    from namm_mlx.eval.plot import score_vs_kept_figure

    for length in sorted({k[0] for k in by}):
        full = [100 * r["score"] for (ln, b, p), rs in by.items() if ln == length and p == "full" for r in rs
                if r["score"] is not None]
        series = defaultdict(list)
        for (ln, budget, policy), rs in by.items():
            scores = [100 * r["score"] for r in rs if r["score"] is not None]
            if ln != length or policy == "full" or not scores:
                continue
            name = "namm" if policy == shipped else policy
            series[name].append((float(np.mean([r["kept_fraction"] for r in rs])), float(np.mean(scores))))
        for points in series.values():
            if full:
                points.append((1.0, float(np.mean(full))))
        fig = score_vs_kept_figure(dict(series))
        fig.axes[0].set_title(f"score vs kept fraction, {length}-token documents")
        fig.savefig(path.with_name(f"{path.stem}-{length}{path.suffix}"), format="png")


def read_rows(paths: list[Path]) -> list[dict]:
    """The rows of every file, one per item, policy and budget (the first:
    files may repeat the full cache)."""
    rows, seen = [], set()
    for row in (json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()):
        key = (row["item"], row["policy"], str(row["budget"]))
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def summary(paths: list[Path], policies: list[str] | None = None, plot_to: Path | None = None,
            shipped: str | None = None) -> None:
    """Table per length, budget and policy; with ``policies``, only those and
    only on the items every one of them (and the full cache) was run on."""
    from namm_mlx.eval.bootstrap import bootstrap_interval

    rows = read_rows(paths)
    if policies:
        rows = [r for r in rows if r["policy"] in policies or r["policy"] == "full"]
        has: dict[tuple[str, str], set[str]] = defaultdict(set)
        for r in rows:
            has[(r["item"], str(r["budget"]))].add(r["policy"])
        common = {
            b: {i for (i, bb), ran in has.items() if bb == b and set(policies) <= ran}
            for b in {str(r["budget"]) for r in rows} - {"-"}
        }
        common = {b: items for b, items in common.items() if items}
        every = set().union(*common.values()) if common else set()
        rows = [r for r in rows if r["item"] in (every if r["budget"] == "-" else common.get(str(r["budget"]), set()))]
        for b, items in sorted(common.items()):
            print(f"budget {b}: {len(items)} items run with every policy: {', '.join(sorted(items))}")
        print()
    by = defaultdict(list)
    for r in rows:
        by[(r["length"], str(r["budget"]), r["policy"])].append(r)
    if plot_to:
        plot(by, plot_to, shipped)
    print("| length | budget | policy | items | kept | score (95% interval) | answer likelihood vs full | fact tokens kept | fact whole | recall (items) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    order = lambda kv: (kv[0][0], kv[0][1], -np.mean([r["score"] or 0 for r in kv[1]]), -np.mean([r["ratio"] for r in kv[1]]))
    for (length, budget, policy), rs in sorted(by.items(), key=order):
        scores = [100 * r["score"] for r in rs if r["score"] is not None] or [float("nan")]
        low, high = bootstrap_interval([scores]) if len(scores) > 1 else (scores[0], scores[0])
        facts = [r["fact_kept"] for r in rs if r["fact_kept"] is not None]
        whole = [r["fact_whole"] for r in rs if r["fact_whole"] is not None]
        recall = [r["recall"] for r in rs if r.get("recall") is not None]
        print(
            f"| {length} | {budget} | {policy} | {len(rs)} | {np.mean([r['kept_fraction'] for r in rs]):.3f} | "
            f"{np.mean(scores):.1f} ({low:.1f}-{high:.1f}) | "
            f"{np.mean([r['ratio'] for r in rs]):.3f} | {np.mean(facts) if facts else float('nan'):.3f} | "
            f"{np.mean(whole) if whole else float('nan'):.3f} | "
            f"{f'{np.mean(recall):.3f} ({len(recall)})' if recall else '-'} |"
        )


def gap(paths: list[Path], pair: list[str], band: int = 3) -> None:
    """Where ``pair[1]`` keeps attention that ``pair[0]`` loses: per length and
    budget, on the items both were run on with per-layer recall, the mean
    recall by band of ``band`` layers and by step (the document's 512-token
    steps, then the final one), and the difference; first the per-item
    difference of the two recalls with its bootstrap interval."""
    from namm_mlx.eval.bootstrap import bootstrap_interval

    rows = [r for r in read_rows(paths) if r["policy"] in pair and r.get("recall_step_layer")]
    groups, offsets = defaultdict(dict), {}
    for r in rows:
        groups[(r["length"], str(r["budget"]))].setdefault(r["item"], {})[r["policy"]] = np.asarray(r["recall_step_layer"])
        offsets[(r["length"], r["item"])] = r["recall_offsets"]
    a, b = pair
    for (length, budget), items in sorted(groups.items()):
        both = {i: v for i, v in items.items() if a in v and b in v and v[a].shape == v[b].shape}
        if not both:
            continue
        print(f"\n{length} tokens, budget {budget}: {len(both)} items ({', '.join(sorted(both))})")
        # the recall column of --summary, per item and paired, so the sign of a small difference has an interval
        means = {p: np.array([both[i][p].mean() for i in sorted(both)]) for p in pair}
        diff = means[b] - means[a]
        low, high = bootstrap_interval([diff])
        print(f"recall {a} {means[a].mean():.4f}, {b} {means[b].mean():.4f}; {b} - {a} {diff.mean():+.4f} "
              f"(95% interval {low:+.4f} to {high:+.4f}; {b} ahead on {int((diff > 0).sum())} of {len(diff)} items)\n")
        by_layer = {p: np.mean([v[p].mean(axis=0) for v in both.values()], axis=0) for p in pair}
        print(f"| layers | {a} | {b} | {b} - {a} |\n|---|---|---|---|")
        for l0 in range(0, len(by_layer[a]), band):
            x, y = by_layer[a][l0 : l0 + band].mean(), by_layer[b][l0 : l0 + band].mean()
            print(f"| {l0}-{min(l0 + band, len(by_layer[a])) - 1} | {x:.4f} | {y:.4f} | {y - x:+.4f} |")
        steps = min(v[a].shape[0] for v in both.values())  # the last ones, if document lengths differ
        by_step = {p: np.mean([v[p][-steps:].mean(axis=1) for v in both.values()], axis=0) for p in pair}
        at = offsets[(length, sorted(both)[0])][-steps:]
        print(f"\n| cached tokens at the step | {a} | {b} | {b} - {a} |\n|---|---|---|---|")
        for offset, x, y in zip(at, by_step[a], by_step[b]):
            print(f"| {offset} | {x:.4f} | {y:.4f} | {y - x:+.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, nargs="+", help="results JSONL (several with --summary)")
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--plot", type=Path, help="with --summary: draw score vs kept share to PNG (one file per length)")
    parser.add_argument("--shipped", help="with --plot: the policy drawn as the highlighted NAMM")
    parser.add_argument("--gap", help="with --summary: A,B prints B's recall minus A's (paired over items, with a 95%% interval), by layers and by step")
    parser.add_argument("--namm", default="default=weights/default", help="NAME=DIR,... (each a ranked NAMM policy; it runs when --policies names it, or with the default --policies)")
    parser.add_argument("--policies", default=BASELINES, help="baselines and NAMM names; NAME+pK max-pools its scores over K slots, NAME+rW always keeps the W newest tokens, NAME+kS keeps --probe's marked tokens (and S tokens before each; +k: none) first")
    parser.add_argument("--probe", help="a NAMM folder whose key probe NAME+k policies use")
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indices", help="only these item indices per task (comma-separated; default: all below --limit)")
    parser.add_argument("--budgets", default="0.25,0.5,1024",
                        help="fractions of the document, token counts, or 'threshold' (a NAMM at its own threshold, no budget); "
                             "POLICY@B1/B2 in --policies gives that policy its own")
    parser.add_argument("--recordings", type=Path, help="folder that keeps each item's full-cache recording, so a later run with other policies skips the model's pass (about 0.5 GB per 4,096-token item)")
    parser.add_argument("--no-generate", action="store_true", help="likelihood and fact survival only (score: null)")
    args = parser.parse_args()
    if (args.plot or args.shipped) and not args.summary:
        parser.error("--plot and --shipped draw the --summary's table; add --summary")
    if args.gap and not args.summary:
        parser.error("--gap reads the results; add --summary")
    if args.gap and len(args.gap.split(",")) != 2:
        parser.error("--gap takes two policies: A,B")
    if args.summary and args.gap:
        return gap(args.out, args.gap.split(","))
    if args.summary:
        return summary(args.out, [p.split("@")[0] for p in args.policies.split(",") if p] if args.policies != BASELINES else None,
                       args.plot, args.shipped)
    if any(p.split("@")[0] == "full" for p in args.policies.split(",")):
        parser.error("the full cache runs on every item by itself; leave 'full' out of --policies")
    args.out = args.out[0]

    from namm_mlx.cache import EvictingKVCache
    from namm_mlx.eval.likelihood import reference_answer
    from namm_mlx.eval.metrics import max_new_tokens, score_prediction
    from namm_mlx.eval.prompts import encode
    from namm_mlx.eval.query_agnostic import replay_kept_sets, split_prompt
    from namm_mlx.eval.recall import future_attention_from_caches, future_attention_recall, load_recording, save_recording
    from namm_mlx.eval.tasks import TextSource, make_items
    from namm_mlx.hook import install_hook
    from namm_mlx.models import load_model
    from namm_mlx.namm import NAMM
    from namm_mlx.policies import FullScorer, make_scorer
    from namm_mlx.recording import record_full_cache, recorded_layers

    namms = {k: NAMM.load(v) for k, v in (a.split("=", 1) for a in args.namm.split(",") if a)}
    policies = [p for p in args.policies.split(",") if p]
    if any("+k" in p for p in policies) and not args.probe:
        parser.error("a NAME+kS policy needs --probe DIR (a NAMM folder with a key probe)")
    probe = NAMM.load(args.probe).key_probe if args.probe else None
    if args.policies == BASELINES:  # named --policies run as named; the default runs every --namm NAMM with the rules
        policies += list(namms)

    def parse(bs: list[str]) -> list:
        """Budgets: 'threshold', a fraction of the document (0 < f <= 1, with a
        dot) or a token count (a positive integer)."""
        out = []
        for b in bs:
            try:
                value = b if b == "threshold" else float(b) if "." in b else int(b)
            except ValueError:
                value = None
            if value is None or (value != "threshold" and not (0 < value <= 1 if isinstance(value, float) else value > 0)):
                parser.error(f"bad budget {b!r}: give a fraction such as 0.5, a token count such as 1024, or 'threshold'")
            out.append(value)
        return out

    budgets = parse(args.budgets.split(","))
    runs = [(p.split("@")[0], parse(p.split("@")[1].split("/")) if "@" in p else budgets) for p in policies]
    if any(b == "threshold" and p.split("+")[0] not in namms for p, bs in runs for b in bs):
        parser.error("only a --namm policy has a threshold of its own: give the others a budget (POLICY@0.5)")
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["item"], r["policy"], str(r["budget"])))
    model, tok = load_model(None, dtype="float32")
    items = make_items(args.tasks.split(","), [int(x) for x in args.lengths.split(",")], args.limit, args.seed,
                       TextSource.from_cache(), tok)
    if args.indices:
        wanted = {int(i) for i in args.indices.split(",")}
        items = [it for it in items if int(it["_id"].split("-")[-2]) in wanted]
    install_hook()
    for item in items:
        todo = [("full", "-")] + [(p, b) for p, bs in runs for b in bs]
        todo = [(p, b) for p, b in todo if (item["_id"], p, str(b)) not in done]
        if not todo:
            continue
        split = split_prompt(tok, item)
        doc_len = len(split.document)
        answer = encode(tok, reference_answer(item))
        facts = answer_positions(tok, split.document, [str(a) for a in item["answers"]])
        start = time.time()
        cached = args.recordings / f"{item['_id']}.npz" if args.recordings else None
        if cached is not None and cached.exists():
            layers, scale, future = load_recording(cached)
        else:
            # question and answer are recorded too (never replayed): their queries
            # are the last rows of the future attention that recall is measured on
            recorded = record_full_cache(model, split.document + split.question + answer, 512, split=doc_len)
            layers, scale = recorded_layers(recorded), recorded[0].scale
            future = future_attention_from_caches(recorded, doc_len, 512)
            del recorded
            if cached is not None:
                save_recording(cached, layers, scale, future)
        limit = max_new_tokens(item["dataset"])

        def run(scorer, size):
            trace, caches = replay_kept_sets(layers, scale, lambda: EvictingKVCache(scorer, max_kv_size=size), doc_len)
            return caches, future_attention_recall(future, trace)

        full, _ = run(FullScorer(), None)
        full_lp = answer_logprob(model, full, split.question, answer)
        print(f"{item['_id']}: doc {doc_len} tokens, facts at {len(facts)} positions, recorded in "
              f"{time.time() - start:.0f}s, full answer log-prob {full_lp:.3f}", flush=True)
        for policy, budget in todo:
            base, options = policy.split("+")[0], {o[0]: int(o[1:] or 0) for o in policy.split("+")[1:]}
            t0 = time.time()
            if policy == "full":
                caches, recall = full, None  # already replayed for the reference likelihood; answering consumes it
            else:
                size = None if budget == "threshold" else int(budget if budget > 1 else math.ceil(budget * doc_len))
                if base in namms:
                    scorer = make_scorer("namm", namm=namms[base], ranked=size is not None)
                else:
                    scorer = make_scorer(base, interval=512, **({"seed": args.seed} if base == "random" else {}))
                if "p" in options:
                    scorer = pooled(scorer, options["p"])
                if "r" in options:
                    scorer = recent_protected(scorer, options["r"])
                if "k" in options:
                    scorer = probe_protected(scorer, probe, options["k"])
                caches, recall = run(scorer, size)
            replay_seconds = time.time() - t0
            kept, whole = fact_survival(caches, facts)
            kept_fraction = float(np.mean([c.length / c.offset for c in caches]))
            lp = answer_logprob(model, caches, split.question, answer)
            if args.no_generate:
                text, score = None, None
            else:
                text = generate(model, tok, caches, split.question, limit)
                score = score_prediction(item["dataset"], text, item["answers"], item.get("all_classes"))
            row = {
                "item": item["_id"], "task": item["dataset"], "length": item["length"], "doc_tokens": doc_len,
                "policy": policy, "budget": budget, "kept_fraction": kept_fraction, "score": score,
                "prediction": text, "logprob": lp, "full_logprob": full_lp, "ratio": math.exp(min(lp - full_lp, 50.0)),
                "fact_kept": kept, "fact_whole": whole, "replay_seconds": round(replay_seconds, 2),
                "recall": None if recall is None else recall.mean, "recall_final": None if recall is None else recall.final,
                # [step][layer], to say where a policy loses attention that another keeps (--gap)
                "recall_step_layer": None if recall is None else np.round(recall.per_step_layer, 5).tolist(),
                "recall_offsets": None if recall is None else [int(o) for o in recall.offsets],
                "seconds": round(time.time() - t0, 2),
            }
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"  {policy:10s} {str(budget):5s} score {score} ratio {row['ratio']:.3f} recall {'-' if recall is None else f'{recall.mean:.3f}'} facts "
                  f"{kept if kept is None else round(kept, 3)} / {whole if whole is None else round(whole, 3)} "
                  f"({row['seconds']:.0f}s) {(text or '')[:40]!r}", flush=True)
            del caches
        del layers, full, future
        mx.clear_cache()


if __name__ == "__main__":
    main()
