"""``namm serve``: mlx-lm's OpenAI-compatible server, with NAMM caches.

The server is mlx-lm's own (``mlx_lm.server``); we only make the model it
loads carry NAMM caches, so long chats and agent sessions stay within a memory
bound. NAMM caches are not batchable, so requests are served one at a time
(mlx-lm does this by itself for caches without ``merge``).
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from namm_mlx.cache import UnsupportedModelError
from namm_mlx.gguf import ModelError

from ..errors import fail, register, user_errors
from ..main import app

register(ModelError, UnsupportedModelError)

#: mlx-lm server options that cannot work with an evicting cache.
REFUSED = {
    "--draft-model": "speculative decoding rewinds the cache after rejected drafts, which eviction makes impossible",
    "--num-draft-tokens": "speculative decoding rewinds the cache after rejected drafts, which eviction makes impossible",
    "--kv-bits": "a quantized KV cache replaces the NAMM cache",
}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="mlx-lm folder, .gguf or hub id (default: SmolLM2-135M-Instruct)"),
    namm: Optional[str] = typer.Option(None, "--namm", help="NAMM folder (default: weights/)"),
    no_namm: bool = typer.Option(False, "--no-namm", help="serve with plain mlx-lm caches"),
    max_kv_size: Optional[int] = typer.Option(None, "--max-kv-size", help="hard cap on cached tokens per layer"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
    prefill_step_size: int = typer.Option(512, "--prefill-step-size"),
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
        import mlx_lm.server as server

        from namm_mlx.integration import as_scorer, attach
        from namm_mlx.models import resolve_model_path

        path = resolve_model_path(model)
        scorer = None if no_namm else as_scorer(namm)  # fail now, not on the first request
        original_load = server.load

        def load_with_namm(*args, **kwargs):
            loaded = original_load(*args, **kwargs)
            if scorer is not None:
                attach(loaded[0], scorer, max_kv_size=max_kv_size)
            return loaded

        server.load = load_with_namm
        sys.argv = [
            "mlx_lm.server",
            "--model", str(path),
            "--host", host,
            "--port", str(port),
            "--prefill-step-size", str(prefill_step_size),
            *extra,
        ]  # fmt: skip
        label = "plain caches" if scorer is None else f"NAMM caches (max_kv_size={max_kv_size})"
        print(f"serving {path} on http://{host}:{port}/v1 with {label}", file=sys.stderr, flush=True)
        server.main()


