"""``namm serve``: mlx-lm's OpenAI-compatible server, with NAMM caches.

The server is mlx-lm's own (``mlx_lm.server``); we make the model it loads
carry NAMM caches, so long chats and agent sessions stay within a memory
bound. NAMM caches are not batchable, so requests are served one at a time
(mlx-lm does this by itself for caches without ``merge``).

Serving one request at a time makes every unbounded request everybody's
problem, so the handler adds three bounds mlx-lm lacks: a cap on
``max_tokens``, a limit on requests waiting or running (503 past it), and a
request whose client hung up stops, in its prompt's prefill as in generation
(mlx-lm notices only when a streamed write fails, and only between tokens).

Memory: mlx-lm keeps the caches of up to ``--prompt-cache-size`` (10) earlier
requests for prompt reuse, but its byte limit (``--prompt-cache-bytes``) only
reaches its batched path; sequential serving, which NAMM caches always get,
kept all ten whatever their size, and a NAMM cache carries per-token scorer
state beside its keys and values. The byte limit is applied to that store
here, with a default, and mlx's pool of freed buffers is capped.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import sys
import threading
import time
from queue import Queue
from typing import Any, List, Optional

import typer


from ..errors import fail, user_errors


#: mlx-lm server options that cannot work with an evicting cache.
REFUSED = {
    "--draft-model": "speculative decoding rewinds the cache after rejected drafts, which eviction makes impossible",
    "--num-draft-tokens": "speculative decoding rewinds the cache after rejected drafts, which eviction makes impossible",
}

#: How often (seconds) a non-streaming generation checks that its client is still there.
DISCONNECT_POLL_S = 0.1
#: Bytes of freed buffers mlx may keep for reuse between requests (its default is
#: the whole memory limit, so one long prompt's transient attention blocks stay
#: resident for good).
MLX_CACHE_LIMIT = 1 << 30
#: Default ceiling on the bytes of KV caches kept for prompt reuse across requests.
PROMPT_CACHE_BYTES = "2GB"


def _size(text: str) -> int:
    """``2GB``, ``500MB``, ``123`` -> bytes, as mlx-lm parses ``--prompt-cache-bytes``."""
    from mlx_lm.utils import _parse_size

    try:
        return _parse_size(text)
    except (KeyError, ValueError, ArithmeticError):
        fail(f"--prompt-cache-bytes expects a size such as 2GB or 500MB, got {text!r}")


def serve(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="mlx-lm folder, .gguf or hub id (default: SmolLM2-135M-Instruct)"),
    namm: Optional[str] = typer.Option(None, "--namm", help="NAMM folder (default: weights/)"),
    no_namm: bool = typer.Option(False, "--no-namm", help="serve with plain mlx-lm caches"),
    max_kv_size: Optional[int] = typer.Option(None, "--max-kv-size", help="hard cap on cached tokens per layer"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
    prefill_step_size: int = typer.Option(512, "--prefill-step-size"),
    max_tokens_cap: int = typer.Option(
        8192, "--max-tokens-cap", min=1, help="largest max_tokens a request may ask for (larger ones get HTTP 400)"
    ),
    queue_size: int = typer.Option(
        8, "--queue-size", min=1, help="requests waiting or running at once; more get HTTP 503"
    ),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="quantise the kept keys/values to 4 or 8 bits"),
    kv_group_size: int = typer.Option(64, "--kv-group-size", help="group size of the --kv-bits quantisation"),
    max_context: Optional[int] = typer.Option(
        None, "--max-context", min=1,
        help="longest conversation in tokens; past the model's trained context its RoPE is stretched with YaRN",
    ),
    prompt_cache_bytes: str = typer.Option(
        PROMPT_CACHE_BYTES, "--prompt-cache-bytes", help="bytes of earlier requests' caches kept for prompt reuse"
    ),
) -> None:
    """Serve the OpenAI-compatible API (mlx-lm's server) with NAMM eviction.

    Other mlx_lm.server options (--max-tokens, --temp, --prompt-cache-size, ...)
    are passed through unchanged.
    """
    extra: List[str] = list(ctx.args)
    with user_errors():
        for arg in extra:
            name = arg.split("=", 1)[0]
            if name in REFUSED:
                fail(f"{name} cannot be used with NAMM eviction: {REFUSED[name]}")
        store_bytes = _size(prompt_cache_bytes)
        from namm_mlx.quantized import check_bits

        try:
            check_bits(kv_bits, kv_group_size)
        except ValueError as err:
            fail(str(err))
        if no_namm and kv_bits is not None:  # stock mlx-lm quantised caches
            extra += ["--kv-bits", str(kv_bits), "--kv-group-size", str(kv_group_size)]
        import mlx.core as mx
        import mlx_lm.server as server

        from namm_mlx.integration import as_scorer, attach
        from namm_mlx.models import resolve_model_path

        scorer = None if no_namm else as_scorer(namm)  # fail now, before any model loads
        path = resolve_model_path(model)
        rope = _rope_override(path, max_context)
        original_load = server.load

        def load_with_namm(*args, **kwargs):
            if rope:
                kwargs["model_config"] = {**kwargs.get("model_config", {}), **rope}
            loaded = original_load(*args, **kwargs)
            if scorer is not None:
                attach(loaded[0], scorer, max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
            return loaded

        server.load = load_with_namm
        handler = guarded_handler(server.APIHandler, max_tokens_cap, queue_size)
        original_http = server._run_http_server
        server._run_http_server = lambda host, port, generator, **_: original_http(
            host, port, generator, handler_class=handler
        )
        lru = server.LRUPromptCache
        server.LRUPromptCache = lambda max_size: lru(max_size, max_bytes=store_bytes)
        mx.set_cache_limit(MLX_CACHE_LIMIT)
        sys.argv = [
            "mlx_lm.server",
            "--model", str(path),
            "--host", host,
            "--port", str(port),
            "--prefill-step-size", str(prefill_step_size),
            "--prompt-cache-bytes", str(store_bytes),
            *extra,
        ]  # fmt: skip
        label = "plain caches" if scorer is None else f"NAMM caches (max_kv_size={max_kv_size}, kv_bits={kv_bits})"
        print(f"serving {path} on http://{host}:{port}/v1 with {label}", file=sys.stderr, flush=True)
        server.main()


def _rope_override(path: Any, max_context: Optional[int]) -> dict:
    """The YaRN ``model_config`` for conversations up to ``max_context`` tokens
    (empty when the model's trained context covers them), as ``namm chat``
    applies for long documents; one line when the family cannot be stretched."""
    from pathlib import Path

    from namm_mlx.session import DEFAULT_MAX_ROPE_FACTOR, YARN_FAMILIES, context_limit, yarn_scaling

    if max_context is None:
        return {}
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        fail(f"--max-context needs a local model folder with a config.json ({path})")
    trained = context_limit(config)
    if not trained or max_context <= trained:
        return {}
    family = config.get("model_type", "?")
    if config.get("rope_scaling") or family not in YARN_FAMILIES:
        fail(f"--max-context {max_context:,} is past the model's {trained:,} tokens and its family ({family}) cannot be stretched here")
    scaling = yarn_scaling(max_context, trained)
    if scaling["factor"] > DEFAULT_MAX_ROPE_FACTOR:
        fail(f"--max-context {max_context:,} would stretch the model's {trained:,} tokens x{scaling['factor']:g}, past x{DEFAULT_MAX_ROPE_FACTOR:g}")
    print(f"note: YaRN RoPE scaling x{scaling['factor']:g} for conversations up to {max_context:,} tokens", file=sys.stderr)
    return {"rope_scaling": scaling, "max_position_embeddings": max_context}


class ClientGone(Exception):
    """The client of a request closed its connection while it was generating."""


def guarded_handler(base: type, max_tokens_cap: int, queue_size: int) -> type:
    """mlx-lm's request handler with a ``max_tokens`` cap, a bounded queue and
    disconnect detection (all requests share one generation thread)."""
    slots = threading.BoundedSemaphore(queue_size)

    class GuardedHandler(base):
        def validate_model_parameters(self) -> None:
            super().validate_model_parameters()
            if self.max_tokens > max_tokens_cap:
                raise ValueError(
                    f"max_tokens {self.max_tokens} is above this server's cap of {max_tokens_cap} "
                    "(namm serve --max-tokens-cap)"
                )

        def handle_completion(self, request: Any, stop_words: List[str]) -> None:
            if not slots.acquire(blocking=False):
                body = json.dumps(
                    {"error": f"server busy: {queue_size} requests are already waiting or running; retry later"}
                ).encode()
                self._set_completion_headers(503)
                self.send_header("Retry-After", "1")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            generator = self.response_generator
            self.response_generator = _Watched(generator, self.connection)
            try:
                super().handle_completion(request, stop_words)
            except (ClientGone, BrokenPipeError, ConnectionResetError):
                logging.info("client disconnected: generation stopped")
                self.close_connection = True
            finally:
                self.response_generator = generator
                slots.release()

    return GuardedHandler


class _AbortableQueue(Queue):
    """A request's response queue that refuses prefill progress once its
    client has gone: the refusal is raised inside the generation thread's
    prefill (its progress callback puts on this queue), which ends the prompt's
    processing at the next chunk instead of after the whole prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.client_gone = threading.Event()

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        if isinstance(item, tuple) and self.client_gone.is_set():
            logging.info("client disconnected: prefill stopped at %d of %d prompt tokens", *item)
            raise ClientGone()
        super().put(item, block, timeout)


class _Watched:
    """A response generator whose request stops (prefill or generation) once the
    request's client has closed its connection.

    mlx-lm checks a request's stop flag only between generated tokens, so a
    long prompt would be processed to its end for nobody. ``generate`` therefore
    enqueues the request itself, as mlx-lm's ``ResponseGenerator.generate``
    does, but with a queue that can refuse the prefill's progress reports."""

    def __init__(self, generator: Any, connection: socket.socket) -> None:
        self._generator = generator
        self._connection = connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._generator, name)

    def generate(self, request: Any, args: Any, progress_callback: Any = None):
        generator, responses = self._generator, _AbortableQueue()
        if not generator.generation_available():
            raise RuntimeError("generation thread died")
        generator.requests.put((responses, request, args))
        ctx = generator._await_response(responses)
        if isinstance(ctx, Exception):
            raise ctx
        return ctx, self._watch(ctx, responses, progress_callback)

    def _watch(self, ctx: Any, responses: _AbortableQueue, progress_callback: Any):
        checked, finished = time.monotonic(), False
        try:
            while True:
                response = self._generator._await_response(responses)
                if response is None:
                    finished = True
                    return
                if isinstance(response, Exception):
                    raise response
                if isinstance(response, tuple):  # the prompt's prefill progress
                    if peer_closed(self._connection):
                        raise ClientGone()
                    if progress_callback is not None:
                        progress_callback(*response)
                    continue
                yield response
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if peer_closed(self._connection):
                        raise ClientGone()
        finally:
            if not finished:  # nobody reads on: stop the prefill at its next chunk, or generation at its next token
                responses.client_gone.set()
                ctx.stop()


def peer_closed(connection: socket.socket) -> bool:
    """True once the other end has closed: the socket reads as end-of-file
    (a pipelined next request would read as data instead)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True
