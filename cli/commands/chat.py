"""``namm chat`` and ``namm generate``: ask questions about a long document.

Both prefill the document once into a NAMM-evicted cache and answer with stock
mlx-lm generation; ``chat`` is interactive, ``generate`` answers one prompt
(and can reuse a prefilled document across invocations via
``--prompt-cache-file``). The logic lives in ``namm_mlx.session``.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import typer
from mlx_lm.sample_utils import make_sampler

from namm_mlx.documents import read_document
from namm_mlx.quantized import check_bits
from namm_mlx.session import (
    DEFAULT_MAX_ROPE_FACTOR,
    DocumentSession,
    SessionError,
    check_cache_path,
    check_document_source,
    namm_settings,
    open_session,
)

from ..errors import fail, user_errors


# Options shared by chat and generate, named as in mlx-lm.
MODEL = typer.Option(None, "--model", help="mlx-lm folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
NAMM_DIR = typer.Option(None, "--namm", help="NAMM folder or Hugging Face repo ORG/NAME (default: the one shipped in weights/)")
NO_NAMM = typer.Option(False, "--no-namm", help="plain mlx-lm cache, for comparison")
MAX_TOKENS = typer.Option(512, "--max-tokens", "-m", help="maximum tokens per answer")
TEMP = typer.Option(0.0, "--temp", help="sampling temperature (0 = greedy)")
TOP_P = typer.Option(1.0, "--top-p", help="nucleus sampling")
SEED = typer.Option(None, "--seed", help="random seed for sampling")
MAX_KV = typer.Option(None, "--max-kv-size", help="hard cap on cached tokens per layer after each NAMM step")
PREFILL = typer.Option(512, "--prefill-step-size", help="prefill chunk (512 or a divisor keeps the NAMM cadence exact)")
SYSTEM = typer.Option(None, "--system-prompt", help="system prompt")
ROPE = typer.Option("auto", "--rope-scaling", help="auto: stretch RoPE (YaRN) for documents past the model's context; off: refuse")
KV_BITS = typer.Option(None, "--kv-bits", help="store the NAMM cache's kept keys/values quantised to 4 or 8 bits")
KV_GROUP = typer.Option(64, "--kv-group-size", help="group size of the --kv-bits quantisation")
MAX_ROPE = typer.Option(
    DEFAULT_MAX_ROPE_FACTOR, "--max-rope-factor", min=1.0, help="largest YaRN stretch of the model's context to apply"
)


def _start(
    doc: str, model, namm, no_namm, max_kv_size, prefill_step_size, system_prompt, rope_scaling, seed, max_rope_factor,
    kv_bits=None, kv_group_size=64,
):  # fmt: skip
    _check_kv_bits(no_namm, kv_bits, kv_group_size)
    check_document_source(doc)
    document = read_document(doc)  # bad documents fail before any model loads
    if seed is not None:
        mx.random.seed(seed)
    session, notes = open_session(
        document,
        model=model,
        namm=namm,
        use_namm=not no_namm,
        max_kv_size=max_kv_size,
        system_prompt=system_prompt,
        prefill_step_size=prefill_step_size,
        rope_scaling=rope_scaling,
        max_rope_factor=max_rope_factor,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return session, document


def _check_kv_bits(no_namm: bool, kv_bits, kv_group_size: int) -> None:
    """``--kv-bits`` quantises the NAMM cache's kept tokens: one line if it cannot."""
    if kv_bits is None:
        return
    if no_namm:
        fail("--kv-bits quantises the NAMM cache's kept tokens; drop --no-namm or --kv-bits")
    try:
        check_bits(kv_bits, kv_group_size)
    except ValueError as err:
        fail(str(err))


def _progress(done: int, total: int, session: DocumentSession, start: list[float]) -> None:
    """One self-rewriting stderr line: tokens, tok/s, kept fraction, memory."""
    elapsed = max(time.perf_counter() - start[0], 1e-9)
    rate = done / elapsed
    eta = (total - done) / rate if rate else 0.0
    bar = "#" * int(24 * done / total) + "-" * (24 - int(24 * done / total))
    end = "\n" if done == total else ""
    print(
        f"\rprefill [{bar}] {done:,}/{total:,} tokens  {rate:6.1f} tok/s  kept {session.kept_fraction():.2f}  "
        f"mem {mx.get_peak_memory() / 1e9:.2f} GB  eta {eta:4.0f}s",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def _prefill(session: DocumentSession, document: str, snapshot: bool) -> None:
    start = [time.perf_counter()]
    stats = session.load_document(document, progress=lambda d, t, s: _progress(d, t, s, start), snapshot=snapshot)
    print(
        f"document: {stats.prefill_tokens:,} tokens prefilled in {stats.prefill_seconds:.1f}s "
        f"({stats.prefill_tps:.1f} tok/s), kept fraction {session.kept_fraction():.2f}",
        file=sys.stderr,
    )


def _answer(
    session: DocumentSession, question: str, max_tokens: int, temp: float, top_p: float, stats: bool = True
) -> None:
    """Stream the answer to stdout, then (with ``stats``) one statistics line to stderr."""
    sampler = make_sampler(temp=temp, top_p=top_p)
    for text in session.ask(question, max_tokens=max_tokens, sampler=sampler):
        print(text, end="", flush=True)
    print()
    if not stats:
        return
    t = session.last_turn
    print(
        f"[turn: {t.prefill_tokens} new prompt tokens, {t.generated_tokens} generated at {t.generation_tps:.1f} tok/s; "
        f"kept fraction {session.kept_fraction():.2f}; peak {t.peak_memory_gb:.2f} GB]",
        file=sys.stderr,
    )


def _print_stats(session: DocumentSession) -> None:
    rows = session.layer_stats()
    print("layer  kept/seen  bytes  (full cache)")
    for r in rows:
        print(f"{r.layer:5d}  {r.kept:,}/{r.seen:,}  {r.bytes / 1e6:.2f} MB  ({r.full_bytes / 1e6:.2f} MB)")
    total, full = sum(r.bytes for r in rows), sum(r.full_bytes for r in rows)
    t = session.last_turn
    print(
        f"total: kept fraction {session.kept_fraction():.3f}; cache {total / 1e6:.1f} MB vs full {full / 1e6:.1f} MB; "
        f"last turn {t.prefill_tps:.1f} prefill tok/s, {t.generation_tps:.1f} decode tok/s"
    )


HELP = "commands: /stats  /save FILE  /reset  /quit  (anything else is a question)"


def chat(
    doc: str = typer.Option(..., "--doc", help="document (txt, md, rst, html; - for stdin)"),
    model: Optional[str] = MODEL,
    namm: Optional[str] = NAMM_DIR,
    no_namm: bool = NO_NAMM,
    max_tokens: int = MAX_TOKENS,
    temp: float = TEMP,
    top_p: float = TOP_P,
    seed: Optional[int] = SEED,
    max_kv_size: Optional[int] = MAX_KV,
    prefill_step_size: int = PREFILL,
    system_prompt: Optional[str] = SYSTEM,
    rope_scaling: str = ROPE,
    max_rope_factor: float = MAX_ROPE,
    kv_bits: Optional[int] = KV_BITS,
    kv_group_size: int = KV_GROUP,
) -> None:
    """Chat with a long document: prefill it once, then ask as many questions as you like."""
    with user_errors():
        session, document = _start(
            doc, model, namm, no_namm, max_kv_size, prefill_step_size, system_prompt, rope_scaling, seed, max_rope_factor,
            kv_bits, kv_group_size,
        )  # fmt: skip
        _prefill(session, document, snapshot=True)
        # With the document on stdin, questions come from the terminal if there is one.
        questions = sys.stdin if doc != "-" else _terminal()
        print(HELP, file=sys.stderr)
        while True:
            print(">> ", end="", file=sys.stderr, flush=True)
            line = questions.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit", "/q"):
                break
            if line == "/stats":
                _print_stats(session)
            elif line.startswith("/save"):
                target = line[len("/save") :].strip()
                if not target:
                    print("usage: /save FILE", file=sys.stderr)
                    continue
                _save(session, target)
            elif line == "/reset":
                session.reset()
                print("conversation reset (document kept)", file=sys.stderr)
            elif line.startswith("/"):
                print(HELP, file=sys.stderr)
            else:
                _answer(session, line, max_tokens, temp, top_p)


def _save(session: DocumentSession, target: str) -> None:
    """``/save``: a failure is one line and the chat goes on (the conversation is not lost)."""
    try:
        print(f"saved {session.save(target)}", file=sys.stderr)
    except (OSError, SessionError, ValueError) as err:
        print(f"error: not saved: {' '.join(str(err).split())}", file=sys.stderr)


def _terminal():
    try:
        return open("/dev/tty")
    except OSError:
        fail("the document came on stdin and there is no terminal for questions; use --doc FILE")


def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="the question (- for stdin)"),
    doc: Optional[str] = typer.Option(None, "--doc", help="document (txt, md, rst, html; - for stdin)"),
    prompt_cache_file: Optional[Path] = typer.Option(
        None, "--prompt-cache-file", help="reuse the prefilled document from this file (written if absent)"
    ),
    model: Optional[str] = MODEL,
    namm: Optional[str] = NAMM_DIR,
    no_namm: bool = NO_NAMM,
    max_tokens: int = MAX_TOKENS,
    temp: float = TEMP,
    top_p: float = TOP_P,
    seed: Optional[int] = SEED,
    max_kv_size: Optional[int] = MAX_KV,
    prefill_step_size: int = PREFILL,
    system_prompt: Optional[str] = SYSTEM,
    rope_scaling: str = ROPE,
    max_rope_factor: float = MAX_ROPE,
    kv_bits: Optional[int] = KV_BITS,
    kv_group_size: int = KV_GROUP,
    verbose: bool = typer.Option(False, "--verbose", help="print statistics to stderr"),
) -> None:
    """Answer one question about a document (for scripts)."""
    with user_errors():
        if prompt == "-" and doc == "-":
            fail("only one of --doc and --prompt can read stdin")
        if prompt_cache_file:
            prompt_cache_file = check_cache_path(prompt_cache_file)  # before any prefill
        question = sys.stdin.read() if prompt == "-" else prompt
        if prompt_cache_file and prompt_cache_file.exists():
            _check_kv_bits(no_namm, kv_bits, kv_group_size)
            session = _resume(
                prompt_cache_file, doc, model, namm, no_namm, max_kv_size, prefill_step_size, kv_bits, kv_group_size
            )
        else:
            if doc is None:
                fail("give --doc (or an existing --prompt-cache-file)")
            session, document = _start(
                doc, model, namm, no_namm, max_kv_size, prefill_step_size, system_prompt, rope_scaling, seed,
                max_rope_factor, kv_bits, kv_group_size,
            )  # fmt: skip
            _prefill(session, document, snapshot=False)
            if prompt_cache_file:
                print(f"saved prefilled document to {session.save(prompt_cache_file)}", file=sys.stderr)
        _answer(session, question, max_tokens, temp, top_p, stats=verbose)


def _resume(
    path: Path, doc, model, namm, no_namm, max_kv_size, prefill_step_size, kv_bits=None, kv_group_size=64
) -> DocumentSession:
    """Load a session saved by an earlier ``generate``; the document is not re-read."""
    from mlx_lm.models.cache import load_prompt_cache

    from namm_mlx.integration import as_scorer, attach
    from namm_mlx.session import load_mlx_model

    scorer = None if no_namm else as_scorer(namm)  # a bad NAMM fails before the cache or model is read
    try:
        _, meta = load_prompt_cache(str(path), return_metadata=True)
    except Exception as err:
        fail(f"cannot read prompt cache {path}: {' '.join(str(err).split())[:200]}")
    wanted, saved = namm_settings(scorer, max_kv_size, kv_bits, kv_group_size), meta.get("namm_settings")
    if saved is None:
        fail(f"{path} does not record its NAMM settings (an older file); delete it to prefill again")
    if saved != wanted:
        fail(
            f"{path} was prefilled with other NAMM settings (fingerprint {saved}, now {wanted}: another NAMM, "
            "--no-namm, --max-kv-size or --kv-bits); delete it or pass the same settings"
        )
    saved_model = model or meta.get("model")
    if not saved_model:
        fail(f"{path} does not say which model wrote it; pass --model")
    if doc is not None:
        digest = hashlib.sha256(read_document(doc).encode()).hexdigest()
        if digest != meta.get("document_sha256"):
            fail(f"{path} holds a different document than {doc}; delete it or drop --prompt-cache-file")
    loaded, tokenizer, _ = load_mlx_model(saved_model)
    if scorer is not None:
        attach(loaded, scorer, max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
    session = DocumentSession.restore(path, loaded, tokenizer, max_kv_size=max_kv_size, prefill_step_size=prefill_step_size)
    print(f"reusing prefilled document from {path} ({session.offset:,} tokens)", file=sys.stderr)
    return session
