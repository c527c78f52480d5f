"""Hostile and careless input through the real ``namm`` command, as subprocesses.

Every case checks the same contract: no traceback, a non-zero exit with one
line of error, and the user's files byte-identical afterwards. Most cases fail
before any model loads (seconds each); the few that need the real model (a
chat that survives a failed ``/save``, a prompt cache reused under other NAMM
settings, the YaRN ceiling, the server) use the embedded default model.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from namm_mlx.checkpoint import writer as ckpt
from namm_mlx.config import NAMMConfig
from namm_mlx.integration import as_scorer
from namm_mlx.namm import NAMM, NAMMFormatError
from namm_mlx.session import SessionError, check_cache_path, namm_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NAMM = REPO_ROOT / "weights" / "default"
PROSE = Path(__file__).parent / "data" / "pride_and_prejudice.txt"


def namm_command() -> list[str]:
    script = Path(sys.executable).with_name("namm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def run_namm(*args: object, stdin: str | None = "", timeout: float = 600, cwd: Path | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*namm_command(), *map(str, args)], input=stdin, capture_output=True, text=True, timeout=timeout,
        env=env, cwd=cwd,
    )  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_refused(result: subprocess.CompletedProcess, needle: str) -> str:
    """Non-zero exit, exactly one line on stderr (``error: ...`` naming ``needle``), no traceback."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- NAMM folders


def namm_folder(tmp_path: Path, name: str, tensors=None, config=None) -> Path:
    """A copy of the shipped NAMM with some tensors or config values replaced."""
    folder = tmp_path / name
    shutil.copytree(DEFAULT_NAMM, folder, ignore=shutil.ignore_patterns("training", "*.md", "*.png"))
    if tensors is not None:
        stored = dict(mx.load(str(folder / "namm.safetensors")))
        changed = tensors(stored)
        mx.save_safetensors(str(folder / "namm.safetensors"), changed)
    if config is not None:
        (folder / "namm_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def _only_vector(t: dict, vector: np.ndarray) -> dict:
    """Drop the named weights so the (edited) flat vector is what loads."""
    kept = {k: v for k, v in t.items() if not k.startswith("bam.")}
    kept["param_vector"] = mx.array(vector)
    return kept


def _poke(t: dict, index: int, value: float) -> dict:
    vector = np.asarray(t["param_vector"]).copy()
    vector[index] = value
    return _only_vector(t, vector)


BAD_WEIGHTS = {
    "nan": (lambda t: _poke(t, 5, np.nan), "nan"),
    "inf": (lambda t: _poke(t, 4171, np.inf), "inf"),
    "negative-variance": (lambda t: {**t, "norm.var": -t["norm.var"]}, "negative variance"),
    "nan-mean": (lambda t: {**t, "norm.mean": mx.full(t["norm.mean"].shape, float("nan"))}, "norm.mean"),
    "int-weights": (lambda t: {**t, "bam.mlp.bias": t["bam.mlp.bias"].astype(mx.int32)}, "dtype"),
}

#: The issue's cases, each through the CLI.
BAD_CONFIGS = {
    "interval-zero": ({"update_interval": 0}, "update_interval must be a positive integer"),
    "interval-float": ({"update_interval": 512.0}, "got 512.0"),
    "interval-negative": ({"update_interval": -512}, "got -512"),
    "ema-null": ({"ema_coeff": None}, "ema_coeff must be a number from 0 to 1, got null"),
    "threshold-text": ({"threshold": "high"}, 'threshold must be a finite number, got "high"'),
    "json-list": ([1, 2], "expected a JSON object"),
}

#: More of the schema, checked in-process (the CLI path is the same NAMM.load).
MORE_BAD_CONFIGS = [
    ({"update_interval": 500}, "update_interval must be a multiple of the hop (16), got 500"),
    ({"update_interval": True}, "update_interval must be a positive integer"),
    ({"ema_coeff": 1.5}, "ema_coeff must be a number from 0 to 1, got 1.5"),
    ({"ema_coeff": float("nan")}, "ema_coeff must be a number from 0 to 1, got NaN"),
    ({"norm_eps": -1e-7}, "norm_eps must be a positive number"),
    ({"attention_dtype": "int8"}, "attention_dtype must be 'bfloat16' or 'float32', got \"int8\""),
    ({"hidden_dim": 0}, "hidden_dim must be an integer from 1 to 4096, got 0"),
    ({"recency_dim": 7}, "recency_dim must be an even integer"),
    ({"param_size": 17}, "param_size must be 4172 for these settings, got 17"),
    ("{update_interval: 512", "is not a valid NAMM config"),
]


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    path.write_text("A short document about a library and its secret code.\n")
    return path


@pytest.mark.parametrize(
    "command, case",
    [("generate", "nan"), ("chat", "negative-variance"), ("serve", "int-weights"), ("evolve", "inf"), ("generate", "nan-mean")],
)
def test_bad_namm_weights_refused_by_every_command_before_the_model(tmp_path, doc, command, case):
    edit, needle = BAD_WEIGHTS[case]
    folder = namm_folder(tmp_path, case, tensors=edit)
    before = snapshot(tmp_path)
    args = {
        "generate": ["generate", "--doc", doc, "--prompt", "q", "--namm", folder],
        "chat": ["chat", "--doc", doc, "--namm", folder],
        "serve": ["serve", "--namm", folder, "--port", "1"],
        "evolve": ["evolve", "--out", tmp_path / "run", "--fitness", "synthetic", "-g", "1", "--init-from", folder],
    }[command]
    line = assert_refused(run_namm(*args), needle)
    assert "namm.safetensors" in line
    assert "document:" not in line and "serving" not in line
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_namm_config_gets_one_line_naming_the_field(tmp_path, doc, case):
    config, needle = BAD_CONFIGS[case]
    if isinstance(config, dict):
        config = {**json.loads((DEFAULT_NAMM / "namm_config.json").read_text()), **config}
    folder = namm_folder(tmp_path, case, config=config)
    before = snapshot(tmp_path)
    assert_refused(run_namm("generate", "--doc", doc, "--prompt", "q", "--namm", folder), needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("config, message", MORE_BAD_CONFIGS)
def test_namm_config_schema(tmp_path, config, message):
    if isinstance(config, dict):
        config = {**json.loads((DEFAULT_NAMM / "namm_config.json").read_text()), **config}
    folder = namm_folder(tmp_path, "namm", config=config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(NAMMFormatError) as excinfo:
        NAMM.load(folder)
    text = str(excinfo.value)
    assert message in text and "\n" not in text, text


def test_convert_refuses_non_finite_input(tmp_path):
    vector = np.zeros(4172, np.float32)
    vector[7] = np.nan
    source = tmp_path / "vector.safetensors"
    mx.save_safetensors(str(source), {"param_vector": mx.array(vector), "norm.mean": mx.zeros(17), "norm.var": mx.ones(17)})
    before = snapshot(tmp_path)
    assert_refused(run_namm("convert", source, "-o", tmp_path / "out"), "nan")
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    negative = tmp_path / "negative.safetensors"
    mx.save_safetensors(str(negative), {"param_vector": mx.zeros(4172), "norm.mean": mx.zeros(17), "norm.var": -mx.ones(17)})
    assert_refused(run_namm("convert", negative, "-o", tmp_path / "out"), "negative")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- zip bomb


def bomb_checkpoint(path: Path, inflated: int = (4 << 30) - 16) -> Path:
    """A torch-style zip of ~4 MB whose one storage inflates to ``inflated`` zero bytes.

    The deflate stream is one 1 MiB block of zeros repeated (each block ends
    with a full flush, so the compressed blocks are byte-identical), with its
    true CRC; the pickle asks for a float tensor filling the whole storage."""
    numel = inflated // 4
    pid = ckpt._Persistent(("storage", ckpt._Global("torch", "FloatStorage"), "0", "cpu", numel))
    tensor = ckpt._Reduce(
        ckpt._Global("torch._utils", "_rebuild_tensor_v2"), (pid, 0, (numel,), (1,), False, collections.OrderedDict())
    )
    pickled = ckpt._PickleEmitter().dumps({"evolution_state": collections.OrderedDict(mean=tensor), "iter_num": 1})
    mib = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    blocks, rest = divmod(inflated, len(mib))
    tail = deflate.compress(bytes(rest)) + deflate.flush()
    crc = 0
    for _ in range(blocks):
        crc = zlib.crc32(mib, crc)
    crc = zlib.crc32(bytes(rest), crc)
    members = [
        ("ckpt/data.pkl", 0, pickled, len(pickled), zlib.crc32(pickled)),
        ("ckpt/byteorder", 0, b"little", 6, zlib.crc32(b"little")),
        ("ckpt/data/0", 8, None, inflated, crc),
        ("ckpt/version", 0, b"3\n", 2, zlib.crc32(b"3\n")),
    ]
    central = []
    with open(path, "wb") as out:
        for name, method, data, size, crc32 in members:
            offset = out.tell()
            compressed = blocks * len(block) + len(tail) if data is None else len(data)
            fields = (method, 0, 0x21, crc32, compressed, size, len(name))
            out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, *fields, 0) + name.encode())
            if data is None:
                for _ in range(blocks):
                    out.write(block)
                out.write(tail)
            else:
                out.write(data)
            entry = struct.pack("<IHHH", 0x02014B50, 20, 20, 0) + struct.pack("<HHHIIIH", *fields)
            central.append(entry + struct.pack("<HHHHII", 0, 0, 0, 0, 0, offset) + name.encode())
        start = out.tell()
        out.write(b"".join(central))
        out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), out.tell() - start, start, 0))
    return path


# Peak RSS in KiB of this process image only: Linux's ru_maxrss survives exec, so a
# child forked from a pytest that holds a model would report the parent's size;
# VmHWM belongs to the new image. (macOS has no /proc; its ru_maxrss is in bytes.)
MEASURE = """
import resource, sys, time
from namm_mlx.convert import ConversionError, convert_checkpoint
from namm_mlx.checkpoint import CheckpointError

def peak_kib():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss

start = time.perf_counter()
try:
    convert_checkpoint(sys.argv[1], sys.argv[2])
except (CheckpointError, ConversionError) as err:
    print(time.perf_counter() - start, peak_kib(), str(err))
"""


def test_zip_bomb_is_refused_fast_and_small(tmp_path):
    bomb = bomb_checkpoint(tmp_path / "ckpt.pt")
    assert bomb.stat().st_size < 5e6
    import zipfile

    with zipfile.ZipFile(bomb) as archive:  # a well-formed archive declaring 4 GiB
        assert archive.getinfo("ckpt/data/0").file_size >= 4 * 2**30 - 16
    before = snapshot(tmp_path)
    result = run_namm("convert", bomb, "-o", tmp_path / "out")
    assert_refused(result, "zip bomb")
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    # measured around the conversion call itself, in a fresh process (RSS includes the interpreter)
    measured = subprocess.run(
        [sys.executable, "-c", MEASURE, str(bomb), str(tmp_path / "out")], capture_output=True, text=True,
        cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    seconds, max_rss_kb, message = measured.stdout.split(" ", 2)
    assert "zip bomb" in message, measured.stdout + measured.stderr
    assert float(seconds) < 1.0, seconds
    assert int(max_rss_kb) < 200 * 1024, max_rss_kb


# ----------------------------------------------------------------------------- documents


def test_huge_document_is_refused_before_tokenising(tmp_path):
    big = tmp_path / "big.txt"
    line = "The quick brown fox jumps over the lazy dog near the riverbank. " * 16 + "\n"
    with open(big, "w") as out:
        for _ in range(20_000_000 // len(line)):
            out.write(line)
    before = snapshot(tmp_path)
    for extra in ([], ["--rope-scaling", "off"]):
        start = time.perf_counter()
        result = run_namm("generate", "--doc", big, "--prompt", "q", *extra)
        assert_refused(result, "shorten the document")
        assert "bytes" in result.stderr and time.perf_counter() - start < 60
    assert snapshot(tmp_path) == before


@pytest.mark.real_model
def test_one_stray_byte_is_replaced_not_mojibake(tmp_path):
    """The document helper's decoding, through the CLI: the stray byte is
    replaced and counted, the rest stays UTF-8 ("café", not "cafÃ©")."""
    stray = tmp_path / "cafe.txt"
    stray.write_bytes("Le café était fermé le lundi. ".encode() * 20 + b"\xff" + "Fin.".encode())
    before = snapshot(tmp_path)
    result = run_namm("generate", "--doc", stray, "--prompt", "Where is the café?", "--max-tokens", "1", "--verbose")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    notes = [line for line in result.stderr.splitlines() if "not valid UTF-8" in line]
    assert len(notes) == 1 and "1 byte" in notes[0], result.stderr
    assert snapshot(tmp_path) == before


def test_device_is_not_a_document():
    assert_refused(run_namm("generate", "--doc", "/dev/zero", "--prompt", "q", timeout=60), "device")


def test_yarn_factor_has_a_ceiling(tmp_path):
    """~110k tokens: past the byte pre-check, but x14 YaRN for an 8k model (ceiling x8)."""
    long = tmp_path / "long.txt"
    long.write_text(PROSE.read_text() * 4)
    before = snapshot(tmp_path)
    line = assert_refused(run_namm("generate", "--doc", long, "--prompt", "q"), "ceiling x8")
    assert "trained on 8,192" in line and "--max-rope-factor" in line
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- prompt caches


@pytest.mark.parametrize(
    "target, needle",
    [("missing/dir/x.safetensors", "does not exist"), ("x", "end in .safetensors")],
)
def test_prompt_cache_path_checked_before_prefill(tmp_path, doc, target, needle):
    before = snapshot(tmp_path)
    result = run_namm("generate", "--doc", doc, "--prompt", "q", "--prompt-cache-file", target, cwd=tmp_path)
    assert_refused(result, needle)
    assert "document:" not in result.stderr  # nothing was prefilled
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["x.npz", "x.safetensors.tmp", "."])
def test_cache_path_needs_the_exact_suffix(tmp_path, name):
    with pytest.raises(SessionError, match="end in .safetensors"):
        check_cache_path(tmp_path / name)
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(SessionError, match="is a folder"):
        check_cache_path(tmp_path / "folder.safetensors")
    assert check_cache_path(tmp_path / "ok.safetensors") == tmp_path / "ok.safetensors"


def test_namm_settings_fingerprint_covers_weights_config_and_cap():
    base = NAMM.load(DEFAULT_NAMM)
    scorer = as_scorer(base)
    prints = {
        namm_settings(None, None),
        namm_settings(scorer, None),
        namm_settings(scorer, 64),
        namm_settings(as_scorer(NAMM.from_flat(base.to_flat() + 0.5, base.norm_mean, base.norm_var)), None),
        namm_settings(
            as_scorer(NAMM.from_flat(base.to_flat(), base.norm_mean, base.norm_var, NAMMConfig(threshold=0.1))), None
        ),
    }
    assert len(prints) == 5
    assert namm_settings(scorer, None) == namm_settings(as_scorer(NAMM.load(DEFAULT_NAMM)), None)


@pytest.mark.real_model
def test_prompt_cache_is_reused_only_with_the_same_namm_settings(tmp_path, doc):
    cache = tmp_path / "doc.safetensors"
    first = run_namm("generate", "--doc", doc, "--prompt", "Say yes.", "--max-tokens", "2", "--prompt-cache-file", cache)
    assert first.returncode == 0, first.stderr
    assert cache.is_file() and not (tmp_path / "doc.safetensors.safetensors").exists()
    other = namm_folder(tmp_path, "other", tensors=lambda t: _poke(t, 0, 0.5))
    before = snapshot(tmp_path)
    for flags in (["--no-namm"], ["--namm", other]):
        result = run_namm("generate", "--prompt", "q", "--prompt-cache-file", cache, *flags)
        assert_refused(result, "other NAMM settings")
    same = run_namm("generate", "--prompt", "Say yes.", "--max-tokens", "2", "--prompt-cache-file", cache)
    assert same.returncode == 0 and "reusing prefilled document" in same.stderr, same.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.real_model
def test_prompt_cache_with_a_damaged_namm_is_refused(tmp_path, doc):
    """The NAMM stored inside a prompt cache goes through the same validation."""
    cache = tmp_path / "doc.safetensors"
    first = run_namm("generate", "--doc", doc, "--prompt", "Say yes.", "--max-tokens", "1", "--prompt-cache-file", cache)
    assert first.returncode == 0, first.stderr
    arrays, meta = mx.load(str(cache), return_metadata=True)
    vectors = [k for k, v in arrays.items() if v.size == 17]
    assert vectors, sorted(arrays)[:10]
    arrays = {k: (-mx.abs(v) - 1 if k in vectors else v) for k, v in arrays.items()}
    mx.save_safetensors(str(cache), arrays, metadata=meta)
    before = snapshot(tmp_path)
    assert_refused(run_namm("generate", "--prompt", "q", "--prompt-cache-file", cache), "negative variance")
    assert snapshot(tmp_path) == before


@pytest.mark.real_model
def test_chat_survives_a_failed_save(tmp_path, doc):
    good = tmp_path / "kept.safetensors"
    questions = "\n".join(
        [
            "/save /missing/dir/x.safetensors",
            f"/save {tmp_path / 'no-suffix'}",
            "What is the document about? Answer in three words.",
            f"/save {good}",
            "/quit",
        ]
    )
    result = run_namm("chat", "--doc", doc, "--max-tokens", "12", stdin=questions + "\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line.split("error:", 1)[1] for line in result.stderr.splitlines() if "error: not saved:" in line]
    assert len(errors) == 2 and "does not exist" in errors[0] and ".safetensors" in errors[1], errors
    assert result.stdout.strip(), "the question after the failed /save got no answer"
    assert "[turn:" in result.stderr  # the answer was generated after the failures
    assert good.is_file() and not (tmp_path / "no-suffix").exists() and not (tmp_path / "no-suffix.safetensors").exists()


# ----------------------------------------------------------------------------- evolve run folders


SYNTHETIC = ("--fitness", "synthetic", "--pop-size", "8", "--separable", "--seed", "4", "-q")


def test_second_run_on_one_folder_is_refused_and_temps_are_cleaned(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen(
        [*namm_command(), "evolve", "--out", str(run), "-g", "400", *SYNTHETIC, "--fitness-arg", "delay=0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / "log.jsonl").is_file() or not (run / "log.jsonl").read_text().strip():
            assert first.poll() is None, first.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.1)
        second = run_namm("evolve", "--out", run, "--resume", "-q")
        assert_refused(second, "in use by another evolve run")
    finally:
        first.kill()
        first.wait(timeout=30)
    lines = (run / "log.jsonl").read_text().splitlines()
    generations = [json.loads(line)["generation"] for line in lines if line.strip()]
    assert len(generations) == len(set(generations)), "two runs wrote to one log"
    # the kill left the lock file behind; the kernel released the lock, so a resume runs,
    # and it removes temp files a killed writer left
    stale = [run / ".fitness.png-abc123.tmp", run / ".state.npz-def456.tmp", run / "namm" / ".namm-x1.safetensors"]
    for path in stale:
        path.write_bytes(b"partial")
    done = len(generations)
    resumed = run_namm("evolve", "--out", run, "--resume", "-g", str(done + 1), "-q", "--fitness-arg", "delay=0")
    assert resumed.returncode == 0, resumed.stderr
    assert not any(p.exists() for p in stale)


# ----------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request_bytes(max_tokens: int, content: str, stream: bool = False) -> bytes:
    body = json.dumps(
        {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0.0,
         **({"stream": True} if stream else {})}
    ).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _post(port: int, max_tokens: int, content: str, timeout: float = 300) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = json.loads(_request_bytes(max_tokens, content).split(b"\r\n\r\n", 1)[1])
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _answered(port: int, max_tokens: int, content: str, deadline: float) -> float:
    """Seconds until a 200 answer, retrying 503 (busy) until ``deadline``."""
    start = time.monotonic()
    while True:
        status, reply = _post(port, max_tokens, content)
        if status == 200:
            return time.monotonic() - start
        assert status == 503 and time.monotonic() < deadline, (status, reply)
        time.sleep(0.05)


def _started_server(port: int, *flags: str) -> tuple[subprocess.Popen, float]:
    """A `namm serve` process answering on ``port``, and its warm answer time
    for a 2-token reply (the model loads on the first request)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [*namm_command(), "serve", "--port", str(port), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                idle = _answered(port, 2, "Say hi.", deadline)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        return server, min(idle, _answered(port, 2, "Say hi.", time.monotonic() + 60))
    except BaseException:
        server.terminate()
        server.communicate(timeout=60)
        raise


@pytest.mark.real_model
def test_server_stops_on_disconnect_caps_tokens_and_queues(tmp_path):
    port = free_port()
    server, idle = _started_server(port, "--queue-size", "2", "--max-tokens-cap", "4000", "--prompt-cache-bytes", "1")
    try:
        status, reply = _post(port, 10**8, "Count forever.")
        assert status == 400 and "cap of 4000" in reply["error"]
        # a long non-streaming request whose client goes away
        abandoned = socket.create_connection(("127.0.0.1", port))
        abandoned.sendall(_request_bytes(4000, "Write a very long story about a dragon."))
        time.sleep(1.0)
        waiting = socket.create_connection(("127.0.0.1", port))  # queued behind it: the queue is now full
        waiting.sendall(_request_bytes(2, "Say hi."))
        time.sleep(0.5)
        status, reply = _post(port, 2, "Say hi.")
        assert status == 503 and "busy" in reply["error"], (status, reply)
        abandoned.close()
        closed = time.monotonic()
        waiting.settimeout(60)
        head = waiting.recv(65536)
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head[:200]
        # the queued request was answered within 2 s of the disconnect plus its own time
        assert time.monotonic() - closed < 2.0 + 2 * idle, (time.monotonic() - closed, idle)
        waiting.close()
        answered = _answered(port, 2, "Say hi.", time.monotonic() + 10)
        assert answered < 2.0 + 2 * idle, (answered, idle)
    finally:
        server.terminate()
        output = server.communicate(timeout=60)[0]
    assert "client disconnected: generation stopped" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    # the byte limit reaches the store of earlier requests' caches (sequential serving):
    # with 1 byte allowed, no cache is ever kept
    held = [int(n) for n in re.findall(r"Prompt Cache: (\d+) sequences", output)]
    assert len(held) >= 4 and not any(held), held


@pytest.mark.real_model
def test_server_stops_a_long_prefill_when_its_client_goes(tmp_path):
    """A client that hangs up during its prompt's prefill frees the server at the
    next 512-token chunk, not after the whole prompt."""
    port = free_port()
    long_prompt = " ".join(f"Line {i}: the lighthouse keeper counted {i * 7} gulls." for i in range(500))
    server, idle = _started_server(port, "--prompt-cache-bytes", "1")
    try:
        # streamed, so that the server reports each prefill chunk: hang up after the first
        abandoned = socket.create_connection(("127.0.0.1", port))
        abandoned.settimeout(120)
        abandoned.sendall(_request_bytes(8, long_prompt, stream=True))
        received = b""
        while b"keepalive" not in received:
            chunk = abandoned.recv(4096)
            assert chunk, received
            received += chunk
        abandoned.close()
        closed = time.monotonic()
        answered = _answered(port, 2, "Say hi.", time.monotonic() + 120)
        waited = time.monotonic() - closed
    finally:
        server.terminate()
        output = server.communicate(timeout=60)[0]
    assert "Traceback" not in output, output[-3000:]
    assert "client disconnected: generation stopped" in output, output[-3000:]
    progress = [(int(a), int(b)) for a, b in re.findall(r"Prompt processing progress: (\d+)/(\d+)", output)]
    total = max(b for _, b in progress)
    assert total > 3000, progress
    # the generation thread itself stopped the long prompt's prefill before its end
    stopped = re.findall(r"prefill stopped at (\d+) of (\d+) prompt tokens", output)
    assert stopped and int(stopped[0][0]) < int(stopped[0][1]) == total, (stopped, progress)
    assert waited < 60, (waited, answered, idle)
