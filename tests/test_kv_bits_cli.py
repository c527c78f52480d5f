"""End to end: ``namm generate --kv-bits 8`` on the real SmolLM2 finds a planted
fact with a NAMM cache whose kept tokens are quantised, and the prompt cache it
saved (quantised triples and all) gives the same answer in a second process."""

from __future__ import annotations

import re

import pytest

from test_cli_chat import document, namm_dir, run_namm  # noqa: F401  (namm_dir is a fixture)

from mlx_lm.models.cache import load_prompt_cache


@pytest.mark.real_model
def test_generate_with_kv_bits_answers_and_round_trips(tmp_path, namm_dir):  # noqa: F811
    doc = document(tmp_path, 4000)  # ~1.1k tokens: NAMM steps at 512, 1,024 and the end
    cache_file = tmp_path / "doc-q8.safetensors"
    args = ["--doc", str(doc), "--namm", str(namm_dir), "--kv-bits", "8", "--max-tokens", "16",
            "--prompt-cache-file", str(cache_file)]  # fmt: skip
    first = run_namm("generate", *args, "--prompt", "What is the secret code of the library?", "--verbose")
    assert first.returncode == 0, first.stderr
    assert "7314" in first.stdout, first.stdout
    assert re.search(r"document: [\d,]+ tokens prefilled", first.stderr), first.stderr

    saved = load_prompt_cache(str(cache_file))
    assert all(c.kv_bits == 8 and isinstance(c.keys, tuple) and c.steps >= 2 for c in saved)
    assert all(c.length < c.offset for c in saved), "the NAMM evicted as well as quantised"

    # The same question on the reloaded cache: the same greedy answer.
    second = run_namm("generate", *args, "--prompt", "What is the secret code of the library?")
    assert second.returncode == 0, second.stderr
    assert "reusing prefilled document" in second.stderr and second.stdout == first.stdout, second.stdout
    other = run_namm("generate", *args[:4], "--prompt-cache-file", str(cache_file), "--prompt", "q")
    assert other.returncode != 0 and "other NAMM settings" in other.stderr  # resumed without --kv-bits


def test_bad_kv_bits_and_context_get_one_line(tmp_path):
    doc = tmp_path / "d.txt"
    doc.write_text("A short document.")
    for args, message in [
        (["generate", "--doc", str(doc), "--prompt", "q", "--kv-bits", "3"], "must be 4 or 8"),
        (["generate", "--doc", str(doc), "--prompt", "q", "--kv-bits", "8", "--no-namm"], "drop --no-namm"),
        (["serve", "--kv-bits", "5"], "must be 4 or 8"),
        (["serve", "--max-context", "100000"], "past x8"),  # YaRN would stretch 8k x12.25
    ]:
        result = run_namm(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and lines[-1].startswith("error:") and message in lines[-1], result.stderr
        assert "Traceback" not in result.stderr
