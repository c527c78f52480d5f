"""Peak memory of `namm serve` under a scripted sequence of requests.

One server process, one client, the sequence of issue 16:

1. short chat requests to the default model, alternating with requests to a
   second model (a small random llama written to a temporary folder, so the
   server swaps models back and forth);
2. a 2k-token prompt;
3. a long generation whose client hangs up after a few seconds;
4. a 12k-token prompt (past SmolLM2's 8k window: the NAMM keeps it bounded).

The server's resident memory is sampled every 0.2 s (``/proc`` on Linux,
``ps`` elsewhere) and printed after each request with the running peak, so a
growth shows where it happens. The last line is ``PEAK_RSS_MB N``.

Run:  python benchmarks/server_memory.py [--port 8765] [--prompt-tokens 12000] [-- extra serve flags]
(on Linux preload OpenBLAS as the README says).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "pride_and_prejudice.txt"


def write_second_model(folder: Path) -> Path:
    """A 2-layer random llama with the default model's tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from namm_mlx.models import resolve_model_path

    config = {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 49152,
        "max_position_embeddings": 16384, "rope_theta": 10000.0, "tie_word_embeddings": True,
    }  # fmt: skip
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    source = Path(resolve_model_path(None))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            (folder / name).write_bytes((source / name).read_bytes())
    return folder


class MemorySampler(threading.Thread):
    """Resident set size of one process, sampled until it exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.now_mb, self.peak_mb = pid, 0, 0

    def rss_mb(self) -> tuple[int, int]:
        """(now, peak so far); Linux keeps the exact peak (VmHWM), elsewhere it is sampled."""
        if sys.platform.startswith("linux"):
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
            return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(self.pid)], capture_output=True, text=True).stdout
        now = int(out.strip() or 0) // 1024
        return now, max(now, self.peak_mb)

    def run(self) -> None:
        while True:
            try:
                self.now_mb, self.peak_mb = self.rss_mb()
            except (OSError, ValueError, KeyError):
                return
            time.sleep(0.2)


def request_body(max_tokens: int, content: str, model: str | None = None) -> str:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0.0}
    if model:
        body["model"] = model
    return json.dumps(body)


def post(port: int, body: str, timeout: float = 3600) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        reply = json.loads(response.read())
    finally:
        connection.close()
    usage = reply.get("usage", {})
    return f"HTTP {response.status}, prompt {usage.get('prompt_tokens', '?')} tokens" if usage else f"HTTP {response.status}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--prompt-tokens", type=int, default=12000, help="size of the last prompt (about)")
    parser.add_argument("serve_args", nargs="*", help="extra `namm serve` flags (after --)")
    args = parser.parse_args()

    text = TEXT.read_text()
    chars_per_token = 4.2  # English prose in SmolLM2's tokenizer, roughly
    with tempfile.TemporaryDirectory() as tmp:
        second = write_second_model(Path(tmp) / "second-model")
        server = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(args.port), *args.serve_args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        sampler = MemorySampler(server.pid)
        sampler.start()
        start = time.time()

        def note(what: str, result: str = "") -> None:
            print(f"{time.time() - start:7.1f}s  {what:40s} rss {sampler.now_mb:6d} MB  peak {sampler.peak_mb:6d} MB  {result}",
                  flush=True)  # fmt: skip

        try:
            while True:
                try:
                    post(args.port, request_body(1, "hi"))
                    break
                except OSError:
                    if server.poll() is not None:
                        raise SystemExit("the server exited:\n" + server.communicate()[0][-2000:])
                    time.sleep(0.5)
            note("ready (default model loaded)")
            for i in range(2):
                note(f"short request #{i}", post(args.port, request_body(8, f"Say hello {i}.")))
                note(f"second model #{i}", post(args.port, request_body(8, "Say hello.", str(second))))
            note("2k-token prompt", post(args.port, request_body(8, text[:8600] + "\nSummarise.")))
            abandoned = socket.create_connection(("127.0.0.1", args.port))
            body = request_body(400, "Write a very long story about a dragon.").encode()
            abandoned.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            time.sleep(3)
            abandoned.close()
            note("long generation, client gone after 3 s")
            chars = int(args.prompt_tokens * chars_per_token)
            note(f"{args.prompt_tokens}-token prompt", post(args.port, request_body(16, text[:chars] + "\nWho is Mr. Bingley?")))
            time.sleep(2)
            note("end")
        finally:
            server.terminate()
            output = server.communicate(timeout=120)[0]
    if "Traceback" in output:
        print(output[-3000:])
    print("PEAK_RSS_MB", sampler.peak_mb)


if __name__ == "__main__":
    main()
