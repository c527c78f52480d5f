"""The likelihood fitness on the real default model (short items to stay fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from namm_mlx.evolve.fitness import FitnessError, make_fitness

TEXT = str(Path(__file__).parent / "data" / "pride_and_prejudice.txt")


@pytest.fixture(scope="module")
def fitness():
    options = {"text": TEXT, "length": "640", "pool": "2", "items": "1", "calibration_items": "1", "tasks": "passkey"}
    return make_fitness("likelihood", 4172, options=options)


@pytest.mark.real_model
def test_calibration_pools_ema_statistics(fitness):
    mean, var, count = fitness.calibrate()
    assert mean.shape == var.shape == (17,) and (var > 0).all() and np.isfinite(mean).all()
    # One NAMM step at 512 tokens: 30 layers x 3 KV heads x 512 slots.
    assert count[0] == 30 * 3 * 512


@pytest.mark.real_model
def test_zero_namm_matches_full_cache_and_penalty_applies(fitness):
    items = fitness.items_for(1)
    assert items == fitness.items_for(1) and len(items) == 1
    zero = fitness.evaluate(np.zeros(4172), items)
    assert zero["quality"] == pytest.approx(1.0, abs=1e-6) and zero["kept_fraction"] == 1.0
    assert zero["fitness"] == pytest.approx(1.0 - fitness.memory_penalty)
    member = np.random.default_rng(0).normal(0, 0.065, 4172)
    first, second = fitness.evaluate(member, items), fitness.evaluate(member, items)
    assert first == second, "a member's fitness is deterministic"
    assert first["kept_fraction"] < 1.0
    assert first["fitness"] == pytest.approx(first["quality"] - fitness.memory_penalty * first["kept_fraction"])


@pytest.mark.real_model
def test_an_adopted_namm_scores_members_with_its_settings_and_probe(fitness):
    """A run started from a NAMM folder scores every member as that NAMM with the
    member's weights: the shipped default's BAM window, newest-query mix and key
    probe stay on (its probe needs each cache's layer index to run at all)."""
    from namm_mlx.namm import NAMM

    shipped = NAMM.load(Path(__file__).parent.parent / "weights" / "default")
    saved = fitness.norm, fitness.config, fitness.key_probe
    try:
        fitness.adopt((np.asarray(shipped.norm_mean), np.asarray(shipped.norm_var)), shipped.config,
                      np.asarray(shipped.key_probe))
        member = fitness.namm_for(shipped.to_flat())
        assert member.config == shipped.config and member.config.bam_window == 128
        assert np.array_equal(np.array(member.key_probe), np.array(shipped.key_probe))
        assert np.array_equal(member.to_flat(), shipped.to_flat())
        assert np.array_equal(np.array(member.norm_mean), np.array(shipped.norm_mean))
        result = fitness.evaluate(shipped.to_flat(), fitness.items_for(1))
        assert 0.0 < result["kept_fraction"] < 1.0 and np.isfinite(result["quality"])
    finally:
        fitness.norm, fitness.config, fitness.key_probe = saved


def test_bad_options_are_one_line():
    with pytest.raises(FitnessError, match="unknown option"):
        make_fitness("likelihood", 4172, options={"bogus": "1"})
    with pytest.raises(FitnessError, match="unknown task"):
        make_fitness("likelihood", 4172, options={"tasks": "nope"})


# --------------------------------------------------------------------------- generation fitness


@pytest.fixture(scope="module")
def generation():
    options = {"text": TEXT, "length": "640", "pool": "2", "items": "1", "calibration_items": "1", "tasks": "passkey",
               "max_tokens": "12"}
    return make_fitness("generation", 4172, options=options)


@pytest.mark.real_model
def test_generation_fitness_normalises_by_the_full_cache(generation):
    items = generation.items_for(3)
    assert len(items) == 1 and generation.max_tokens == 12
    full = generation.full_score(items[0])
    zero = generation.evaluate(np.zeros(4172), items)
    # an all-zero NAMM evicts nothing, so it answers exactly as the full cache
    assert zero["kept_fraction"] == 1.0
    assert zero["quality"] == (1.0 if full > 0 else full) and zero["tasks_scored"] == (1 if full > 0 else 0)
    assert zero["fitness"] == pytest.approx(zero["quality"] - generation.memory_penalty)
    member = np.random.default_rng(1).normal(0, 0.065, 4172)
    first = generation.evaluate(member, items)
    assert first["kept_fraction"] < 1.0
    assert first["fitness"] == pytest.approx(first["quality"] - generation.memory_penalty * first["kept_fraction"])
    # the population call scores each member on the generation's items, as
    # evaluate did: a member's fitness is deterministic
    from namm_mlx.evolve import EvalContext

    rows = generation(np.stack([np.zeros(4172), member]), [0, 1], context=EvalContext(3, "main", 0, 0, 1))
    assert rows == [zero, first]


# --------------------------------------------------------------------------- replay fitness


@pytest.mark.real_model
def test_replay_fitness_agrees_with_the_online_likelihood(fitness):
    # the online likelihood fitness keeps the question in the prompt; so does protocol=aware
    options = {"text": TEXT, "length": "640", "pool": "2", "items": "1", "calibration_items": "1", "tasks": "passkey",
               "protocol": "aware"}
    replay = make_fitness("replay", 4172, options=options)
    replay.norm = fitness.norm if fitness.norm is not None else fitness.calibrate()
    items = replay.items_for(1)
    assert items == fitness.items_for(1)
    # the full cache through the replay path = the online full-cache likelihood
    assert replay.full_logprob(items[0]).mean == pytest.approx(fitness.full_logprob(items[0]).mean, abs=2e-3)
    zero = replay.evaluate(np.zeros(4172), items)
    assert zero["quality"] == 1.0 and zero["kept_fraction"] == 1.0
    member = np.random.default_rng(0).normal(0, 0.065, 4172)
    online, replayed = fitness.evaluate(member, items), replay.evaluate(member, items)
    # 640 tokens: one eviction step, at 512, made from identical inputs -> the
    # same tokens kept; only the 128 tokens after it see different hidden states
    assert replayed["kept_fraction"] == online["kept_fraction"] < 1.0
    # The tokens after the step attended to everything in the recording, so the
    # replay reads the answer at least as well (measured: 1.07 vs 0.89 here);
    # the bias is bounded, not zero.
    assert online["quality"] - 0.05 <= replayed["quality"] <= online["quality"] + 0.5
    assert replay.evaluate(member, items) == replayed, "deterministic, recordings reused"


@pytest.mark.real_model
def test_a_fixed_budget_makes_every_member_keep_the_same_share(fitness):
    options = {"text": TEXT, "length": "640", "pool": "2", "items": "1", "calibration_items": "1",
               "tasks": "passkey", "budget": "0.5"}
    budgeted = make_fitness("replay", 4172, options=options)
    budgeted.norm = fitness.norm if fitness.norm is not None else fitness.calibrate()
    items = budgeted.items_for(1)
    rng = np.random.default_rng(1)
    results = [budgeted.evaluate(rng.normal(0, 0.065, 4172), items) for _ in range(2)]
    results.append(budgeted.evaluate(np.zeros(4172), items))  # would keep everything under its threshold
    kept = {round(r["kept_fraction"], 6) for r in results}
    assert len(kept) == 1 and kept.pop() < 0.75, results
    # the members differ only in which tokens they keep
    assert results[0]["quality"] != results[1]["quality"]


def test_the_agnostic_replay_never_lets_a_step_see_the_question(fitness):
    from namm_mlx.eval.query_agnostic import split_prompt
    from namm_mlx.evolve.replay import replay_caches

    options = {"text": TEXT, "length": "640", "pool": "2", "items": "1", "calibration_items": "1",
               "tasks": "passkey", "budget": "0.5"}
    agnostic = make_fitness("replay", 4172, options=options)  # protocol=agnostic is the default
    agnostic.norm = fitness.norm if fitness.norm is not None else fitness.calibrate()
    item = agnostic.items_for(1)[0]
    other = {**item, "_id": item["_id"] + "-other-question", "input": "Which city is named first in the document?"}
    split = split_prompt(agnostic.tokenizer, item)
    recording = agnostic.recording(item)
    assert recording.length == len(split.document) == recording.document_length
    assert recording.tail[: len(split.question)] == split.question
    scorer = agnostic.scorer_for(np.random.default_rng(2).normal(0, 0.065, 4172))
    kept = []
    for it in (item, other):
        rec = agnostic.recording(it)
        caches = replay_caches(rec, scorer, max_kv_size=agnostic.max_kv_size(rec.length))
        kept.append([np.asarray(c.positions()) for c in caches])
    assert all(np.array_equal(a, b) for a, b in zip(*kept)), "the kept set depends on the question"
    assert max(k.shape[-1] for k in kept[0]) <= agnostic.max_kv_size(recording.length)
    result = agnostic.evaluate(np.zeros(4172), [item])
    assert 0.0 < result["quality"] <= 1.5 and result["kept_fraction"] <= 0.5 + 1 / 16
