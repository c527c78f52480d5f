"""NAMMs on the Hugging Face Hub, through the real ``huggingface_hub`` library.

The machines that run these tests have no route to the Hub, so each test lays
out a real hub cache (``models--ORG--NAME/snapshots/<rev>/`` and
``refs/main``) under a temporary ``HF_HOME`` and runs with
``HF_HUB_OFFLINE=1``: ``snapshot_download`` then answers from that cache
exactly as it does for a user who downloaded the repo before. Uploading
itself (``HfApi.upload_folder``) needs the network and is not tested here;
``--dry-run`` builds everything it would send.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from huggingface_hub import ModelCard


REPO_ROOT = Path(__file__).resolve().parents[1]
REPO = "test-org/tiny-namm"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def namm_command() -> list[str]:
    script = Path(sys.executable).with_name("namm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def publish_to_cache(hf_home: Path, repo_id: str, files: Path, revision: str = REVISION) -> Path:
    """Lay ``files``' NAMM files out as huggingface_hub caches a downloaded model repo."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("namm.safetensors", "namm_config.json", "README.md"):
        if (files / name).is_file():
            shutil.copyfile(files / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="module")
def tiny_namm(reference_namm, reference_conversion, tmp_path_factory) -> tuple[Path, np.ndarray]:
    folder = reference_namm.save(tmp_path_factory.mktemp("namm") / "n")
    return folder, reference_conversion["param_vector"]


@pytest.fixture()
def hf_home(tmp_path, tiny_namm) -> Path:
    home = tmp_path / "hf"
    publish_to_cache(home, REPO, tiny_namm[0])
    return home


def offline_env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), NAMM_OPENBLAS="0")
    return env


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real mlx-lm llama folder (random weights) with the default model's tokenizer."""
    from mlx.utils import tree_flatten
    from tiny_models import tiny_config, tiny_model

    from namm_mlx.models import default_model_path

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    folder.mkdir()
    model = tiny_model("llama", vocab_size=49152)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(tiny_config("llama", vocab_size=49152)))
    default = default_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default / name).exists():
            shutil.copy(default / name, folder / name)
    return folder


# --------------------------------------------------------------------------- resolving ORG/NAME


def test_load_resolves_org_name_from_the_offline_cache(hf_home, tiny_namm, tiny_model_dir, tmp_path):
    code = (
        "import sys, numpy as np, namm_mlx\n"
        f"model, tok = namm_mlx.load({str(tiny_model_dir)!r}, namm={REPO!r})\n"
        "np.save(sys.argv[1], np.asarray(model.namm_scorer.namm.to_flat()))\n"
        f"pinned = namm_mlx.integration.as_scorer({REPO + '@' + REVISION!r})\n"
        "print(np.array_equal(pinned.namm.to_flat(), model.namm_scorer.namm.to_flat()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "v.npy")], env=offline_env(hf_home),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), tiny_namm[1])


def test_cli_namm_org_name_offline(hf_home, tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text((REPO_ROOT / "tests" / "data" / "pride_and_prejudice.txt").read_text()[:3000])
    base = [*namm_command(), "generate", "--doc", str(doc), "--prompt", "Who?", "--model", str(tiny_model_dir),
            "--max-tokens", "2"]
    env = offline_env(hf_home)
    ok = subprocess.run([*base, "--namm", REPO], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr

    missing = subprocess.run([*base, "--namm", "test-org/not-downloaded"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "test-org/not-downloaded" in last and "cache" in last
    assert "Traceback" not in missing.stderr


def test_a_repo_without_namm_files_is_refused(tmp_path):
    home = tmp_path / "hf"
    other = tmp_path / "files"
    other.mkdir()
    (other / "README.md").write_text("# just a card\n")
    publish_to_cache(home, "test-org/empty", other)
    code = "from namm_mlx.hub import resolve_namm; resolve_namm('test-org/empty')"
    out = subprocess.run([sys.executable, "-c", code], env=offline_env(home), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "is not a NAMM" in out.stderr


def test_local_paths_win_over_hub_ids(tmp_path, monkeypatch, tiny_namm):
    from namm_mlx.hub import is_hub_id, resolve_namm

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    shutil.copytree(tiny_namm[0], tmp_path / "runs" / "mine")
    assert not is_hub_id("runs/mine") and resolve_namm("runs/mine") == Path("runs/mine")
    assert is_hub_id("org/name") and is_hub_id("org/name@v1.0")
    assert not is_hub_id("/abs/path") and not is_hub_id("a/b/c") and not is_hub_id("./x")


# --------------------------------------------------------------------------- namm upload


def test_upload_dry_run_writes_a_card_model_card_parses(tmp_path, tiny_namm, hf_home):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({
        "config": {"command": "namm eval --tasks passkey --out r"},
        "overall": [
            {"policy": "namm", "score": 61.5, "kept_fraction": 0.42, "peak_memory_gb": 0.91, "n": 8},
            {"policy": "full", "score": 70.0, "kept_fraction": 1.0, "peak_memory_gb": 1.2, "n": 8},
            {"policy": "h2o", "score": 50.0, "kept_fraction": 0.42, "peak_memory_gb": 0.9, "n": 8},
        ],
    }))
    stage = tmp_path / "stage"
    out = subprocess.run(
        [*namm_command(), "upload", str(tiny_namm[0]), "test-org/shared", "--dry-run", "--out", str(stage),
         "--base-model", "mlx-community/Llama-3.2-3B-Instruct-4bit", "--results", str(results)],
        env=offline_env(hf_home), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "nothing uploaded" in out.stderr
    card = ModelCard.load(stage / "README.md")
    assert card.data.library_name == "namm-mlx" and "namm" in card.data.tags
    assert card.data.base_model == "mlx-community/Llama-3.2-3B-Instruct-4bit"
    assert "| namm | 61.5 | 0.42 | 0.91 | 8 |" in card.text and "| full | 70.0 |" in card.text
    assert "h2o" not in card.text
    usage = card.text.split("```python\n")[1].split("```")[0].strip().splitlines()
    assert len(usage) == 5 and 'namm_mlx.attach(model, "test-org/shared")' in usage[2]
    assert sorted(p.name for p in stage.iterdir()) == ["README.md", "namm.safetensors", "namm_config.json"]

    # What would be uploaded is what a user downloads: resolve it back through the hub cache.
    publish_to_cache(hf_home, "test-org/shared", stage)
    code = "import numpy as np; from namm_mlx.integration import as_scorer; print(as_scorer('test-org/shared').namm.to_flat().sum())"
    back = subprocess.run([sys.executable, "-c", code], env=offline_env(hf_home), capture_output=True, text=True,
                          timeout=120)
    assert back.returncode == 0, back.stderr
    assert abs(float(back.stdout) - float(tiny_namm[1].sum())) < 1e-3


def test_upload_never_overwrites_other_files_and_refuses_non_namm(tmp_path, tiny_namm):
    from namm_mlx.hub import HubError, stage_upload
    from namm_mlx.namm import NAMMFormatError

    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "notes.txt").write_text("mine")
    out = subprocess.run([*namm_command(), "upload", str(tiny_namm[0]), "test-org/x", "--dry-run", "--out", str(stage)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, NAMM_OPENBLAS="0"))
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "holds other files" in lines[0], out.stderr
    assert (stage / "notes.txt").read_text() == "mine" and sorted(p.name for p in stage.iterdir()) == ["notes.txt"]

    bad = tmp_path / "not-a-namm"
    bad.mkdir()
    with pytest.raises(NAMMFormatError, match="not a NAMM folder"):
        stage_upload(bad, "test-org/x", tmp_path / "s2")
    with pytest.raises(HubError, match="not a Hugging Face repo id"):
        stage_upload(tiny_namm[0], "not an id", tmp_path / "s3")
    assert not (tmp_path / "s2").exists() and not (tmp_path / "s3").exists()
