"""Adding a policy takes one class and one registry line (the checklist in
``namm_mlx.policies``): the class in ``tests/oldest_policy.py``, registered
here, then works in the cache, a saved prompt cache, ``namm eval``'s runner,
its CLI (``--help`` and ``--policy``, as subprocesses that register the same
class before running the ``namm`` entry point) and the plot, with no other edit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from oldest_policy import OldestScorer
from tiny_models import tiny_model

import namm_mlx
from namm_mlx.policies import make_scorer, policy_names, register, unregister

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PRIDE = TESTS / "data" / "pride_and_prejudice.txt"
#: The subprocess's registry line, then the ``namm`` entry point with the given arguments.
NAMM_WITH_OLDEST = (
    "from namm_mlx.policies import register; from oldest_policy import OldestScorer; register(OldestScorer); "
    "from cli.entry import main; main()"
)


@pytest.fixture
def oldest():
    register(OldestScorer)  # the one registry line
    yield OldestScorer
    unregister(OldestScorer.name)
    assert "oldest" not in policy_names()


def _namm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env_path = f"{TESTS}:{REPO}"
    return subprocess.run(
        [sys.executable, "-c", NAMM_WITH_OLDEST, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": env_path, "COLUMNS": "200"},
    )


def test_new_policy_runs_in_the_cache_and_a_saved_prompt_cache(oldest, tmp_path):
    assert policy_names()[-1] == "oldest"
    model = tiny_model("llama")
    namm_mlx.attach(model, make_scorer("oldest", interval=32), max_kv_size=24)
    cache = make_prompt_cache(model)
    tokens = np.random.default_rng(0).integers(0, 97, 80).tolist()
    import mlx.core as mx

    for start in range(0, 80, 16):  # steps at 32 and 64
        model(mx.array([tokens[start : start + 16]]), cache=cache)
    for c in cache:
        kept = c.kept_positions[0, 0].tolist()
        assert c.steps == 2 and kept[:23] == list(range(23)) and kept[23] == 63  # the oldest, and the newest slot
    path = str(tmp_path / "oldest.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert type(loaded[0].scorer) is OldestScorer and loaded[0].scorer.spec() == {"policy": "oldest", "interval": 32}


def test_new_policy_in_the_eval_runner_and_plot(oldest, tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from namm_mlx.eval import parse_budgets, plan_runs, read_predictions, run_eval
    from namm_mlx.eval.plot import score_vs_kept_figure
    from namm_mlx.models import default_model_path

    tokenizer = load_tokenizer(default_model_path())
    model = tiny_model("llama", seed=1, vocab_size=len(tokenizer.vocab))
    context = " ".join(f"Room {i} of the old house has a red door and {i + 2} windows." for i in range(40))
    items = [{"_id": "q0", "dataset": "needle", "context": context, "input": "What colour is the door of room 0?",
              "answers": ["red"], "length": 1024}]
    runs = plan_runs(["full", "oldest"], parse_budgets("0.3"))
    assert [r.label for r in runs] == ["full", "oldest@0.3"]  # it takes a budget, as its class says
    results = run_eval(model, tokenizer, items, runs, tmp_path, max_tokens=2, progress=False, log=lambda m: None)
    assert results["legend"]["oldest"] == "#00c8c8"
    record = {r["policy"]: r for r in read_predictions(tmp_path / "predictions.jsonl")}["oldest"]
    assert record["eviction"] == "online" and record["kept_fraction"] < 0.35

    fig = score_vs_kept_figure({"full": [(1.0, 0.5)], "oldest": [(0.3, 0.2)]})
    colors = {line.get_label(): line.get_color() for line in fig.axes[0].lines}
    assert colors["oldest"] == "#00c8c8"


def test_new_policy_in_the_cli_help_and_eval(tmp_path):
    """Real ``namm`` processes that register the class first (a subprocess
    cannot see a class registered in this one)."""
    help_text = _namm("eval", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "full,namm,streaming,h2o,snapkv,tova,knorm,random,oldest" in help_text.stdout
    assert "the oldest tokens (a test policy)" in help_text.stdout

    # namm eval --policy oldest on a tiny random model saved as an mlx-lm folder with the real tokenizer
    from mlx_lm.utils import save_config, save_model

    from namm_mlx.models import default_model_path
    from tiny_models import tiny_config

    tokenizer_dir = Path(default_model_path())
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    folder = tmp_path / "tiny"
    save_model(folder, tiny_model("llama", seed=1, vocab_size=vocab))
    save_config(tiny_config("llama", vocab_size=vocab), folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    out = tmp_path / "run"
    result = _namm("eval", "--model", str(folder), "--policy", "full,oldest", "--tasks", "passkey", "--lengths", "1024",
                   "--limit", "1", "--budget", "0.3", "--no-recall", "--max-tokens", "2", "--no-progress",
                   "--text", str(PRIDE), "--out", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [o["run"] for o in results["overall"]] == ["full", "oldest@0.3"]
    assert results["legend"]["oldest"] == "#00c8c8"
