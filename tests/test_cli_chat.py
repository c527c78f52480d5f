"""End to end: the real ``namm`` process answering questions about documents.

``generate`` finds a planted fact in a ~1.7k-token document, ``chat`` answers
two questions from piped stdin without re-reading the document, ``serve``
answers a chat-completions request from a real HTTP client, and every kind of
bad input gets one line and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import pytest


DATA = Path(__file__).parent / "data"
FACT = "\n\nNote from the editor: the secret code of the library is 7314.\n\n"


def namm_command() -> list[str]:
    script = Path(sys.executable).with_name("namm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def run_namm(*args: str, stdin: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*namm_command(), *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def namm_dir(reference_namm, tmp_path_factory) -> Path:
    return reference_namm.save(tmp_path_factory.mktemp("namm") / "n")


def document(tmp_path: Path, chars: int) -> Path:
    """Real prose of about ``chars`` characters with the fact planted near the end."""
    text = (DATA / "pride_and_prejudice.txt").read_text()[:chars]
    path = tmp_path / "doc.txt"
    path.write_text(text + FACT)
    return path


@pytest.mark.real_model
def test_generate_finds_planted_fact(tmp_path, namm_dir):
    doc = document(tmp_path, 6000)  # ~1.7k tokens: steps at 512, 1,024, 1,536 and the end; the cap binds from 1,024
    cache_file = tmp_path / "doc-cache.safetensors"
    args = ["--doc", str(doc), "--namm", str(namm_dir), "--max-kv-size", "768", "--max-tokens", "24"]
    first = run_namm("generate", *args, "--prompt", "What is the secret code of the library?",
                     "--prompt-cache-file", str(cache_file), "--verbose")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "7314" in first.stdout, first.stdout
    prefilled = re.search(r"document: ([\d,]+) tokens prefilled", first.stderr)
    assert prefilled and 1500 < int(prefilled.group(1).replace(",", "")) < 1900, first.stderr
    assert cache_file.exists()
    # Second invocation reuses the prefilled document: no "document:" prefill line.
    second = run_namm("generate", *args, "--prompt", "-", "--prompt-cache-file", str(cache_file),
                      stdin="Repeat the secret code of the library.")  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "reusing prefilled document" in second.stderr and "document:" not in second.stderr
    assert "7314" in second.stdout, second.stdout


@pytest.mark.real_model
def test_chat_answers_two_questions_without_rereading(tmp_path):
    doc = document(tmp_path, 4200)  # ~1.15k tokens: steps at 512, 1,024 and the end
    saved = tmp_path / "session.safetensors"
    questions = f"What is the secret code of the library?\n/stats\nWho is the author of the passage?\n/save {saved}\n/quit\n"
    result = run_namm("chat", "--doc", str(doc), "--max-tokens", "24", stdin=questions)  # embedded defaults
    assert result.returncode == 0, result.stderr
    assert "7314" in result.stdout
    turns = [int(n) for n in re.findall(r"\[turn: (\d+) new prompt tokens", result.stderr)]
    document_tokens = int(re.search(r"document: ([\d,]+) tokens", result.stderr).group(1).replace(",", ""))
    assert len(turns) == 2 and document_tokens > 1000
    assert all(t < 60 for t in turns), f"turns re-read the document: {turns}"
    assert "kept/seen" in result.stdout and "vs full" in result.stdout
    assert saved.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.real_model
def test_serve_answers_chat_completions(namm_dir):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [*namm_command(), "serve", "--namm", str(namm_dir), "--port", str(port), "--max-kv-size", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
            "max_tokens": 20,
            "temperature": 0.0,
        }
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    reply = json.loads(response.read())
                break
            except (ConnectionError, urllib.error.URLError):
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        assert "Paris" in reply["choices"][0]["message"]["content"]
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert "with NAMM caches" in output


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--doc", "missing.txt", "--prompt", "q"], "document not found"),
        (["generate", "--doc", "{binary}", "--prompt", "q"], "binary"),
        (["generate", "--doc", "{empty}", "--prompt", "q"], "empty"),
        (["generate", "--doc", "{text}", "--prompt", "q", "--model", "./no-such-model"], "no model at"),
        (["generate", "--doc", "{text}", "--prompt", "q", "--model", "nobody/no-such-model-xyz"], "cannot load model"),
        (["generate", "--doc", "{text}", "--prompt", "q", "--model", "{gemma2}", "--namm", "{namm}"], "not supported"),
        (["generate", "--doc", "{text}", "--prompt", "q", "--namm", "{bad_namm}"], "namm"),
        (["chat", "--doc", "{long}", "--rope-scaling", "off", "--no-namm"], "trained on 8,192"),
        (["serve", "--draft-model", "x"], "speculative decoding"),
    ],
)
def test_bad_input_gets_one_line(tmp_path, namm_dir, args, message):
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "text.txt").write_text("A short document.")
    (tmp_path / "long.txt").write_text((DATA / "pride_and_prejudice.txt").read_text()[:60000])
    bad = tmp_path / "bad_namm"
    bad.mkdir()
    (bad / "namm_config.json").write_text("{}")
    (bad / "namm.safetensors").write_bytes(b"not a safetensors file")
    gemma2 = tmp_path / "gemma2"
    if "{gemma2}" in args:
        tiny_gemma2_folder(gemma2)
    paths = {
        "{binary}": tmp_path / "binary.bin",
        "{empty}": tmp_path / "empty.txt",
        "{text}": tmp_path / "text.txt",
        "{long}": tmp_path / "long.txt",
        "{bad_namm}": bad,
        "{gemma2}": gemma2,
        "{namm}": namm_dir,
    }
    result = run_namm(*[str(paths.get(a, a)) for a in args], stdin="")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and message.lower() in lines[-1].lower(), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def tiny_gemma2_folder(folder: Path) -> None:
    """A real mlx-lm model folder of an unsupported family (random weights),
    with the default model's tokenizer."""
    import shutil

    from mlx.utils import tree_flatten
    from tiny_models import tiny_config, tiny_model

    from namm_mlx.models import default_model_path

    model = tiny_model("gemma2", vocab_size=49152)
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(tiny_config("gemma2", vocab_size=49152)))
    default = default_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default / name).exists():
            shutil.copy(default / name, folder / name)
