"""Chat with one long document: prefill it once, then answer question after question.

The document is prefilled into the (evicting) cache before the first question
is known, in chunks aligned to 512 absolute tokens so NAMM steps fall where the
reference puts them. Each later turn only feeds the few tokens that close the
previous answer and open the next question: the document is never re-read.
Generation itself is stock ``mlx_lm.stream_generate`` on that cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

from .errors import NammError
from .files import atomic_path
from .cache import EvictingKVCache
from .prefill import prefill

# Documents are tokenised whole before they are measured against the model's
# context (and stretched or refused with both numbers); transformers' warning
# that the sequence is "longer than the specified maximum" would be a second,
# misleading line.
logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)

DOCUMENT_TEMPLATE = "Read the following document and answer questions about it.\n\n{document}\n\n{question}"
_SENTINEL = "\ue000QUESTION\ue000"

#: (tokens done, tokens total, session) -> None
ProgressFn = Callable[[int, int, "DocumentSession"], None]


class SessionError(NammError, ValueError):
    """A session cannot continue as asked; the message says why."""


@dataclass
class TurnStats:
    """Numbers for one turn (prefill of the new tokens, then generation)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    generation_tps: float = 0.0
    generation_seconds: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str | None = None

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0


@dataclass
class LayerStats:
    layer: int
    kept: int
    seen: int
    bytes: int
    full_bytes: int


@dataclass
class DocumentSession:
    """One conversation about one document, on one cache.

    model/tokenizer: an mlx-lm pair (attach a NAMM first for eviction).
    """

    model: nn.Module
    tokenizer: Any
    system_prompt: str | None = None
    max_kv_size: int | None = None
    prefill_step_size: int = 512
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = make_prompt_cache(self.model, self.max_kv_size)
        self.messages: list[dict[str, str]] = []
        self.document_tokens = 0
        self._question_suffix: str | None = None  # template text after the first question
        self._eos_fed = False
        self._snapshot: tuple[list[Any], dict[str, Any]] | None = None
        self.last_turn = TurnStats()

    # ----------------------------------------------------------- feeding
    @property
    def offset(self) -> int:
        """Tokens in the conversation so far (logical; evicted ones included)."""
        return self.cache[0].offset if self.cache else 0

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def feed(self, tokens: list[int], progress: ProgressFn | None = None) -> float:
        """Run ``tokens`` through the model into the cache, in chunks whose
        boundaries sit on multiples of ``prefill_step_size`` absolute tokens.
        Returns the seconds spent."""
        start = time.perf_counter()
        report = (lambda done, total: progress(done, total, self)) if progress else None
        prefill(self.model, self.cache, tokens, self.prefill_step_size, on_chunk=report)
        mx.clear_cache()
        return time.perf_counter() - start

    # ---------------------------------------------------------- document
    def first_turn_parts(self, document: str) -> tuple[str, str]:
        return first_turn_parts(self.tokenizer, document, self.system_prompt)

    def load_document(self, document: str, progress: ProgressFn | None = None, snapshot: bool = True) -> TurnStats:
        """Prefill the document (everything before the first question)."""
        if self.messages or self.offset:
            raise SessionError("this session already holds a document; start a new one")
        before, after = self.first_turn_parts(document)
        tokens = self._encode(before)
        seconds = self.feed(tokens, progress)
        self.document_tokens = len(tokens)
        self._question_suffix = after
        self._document = document
        self.metadata["document_sha256"] = hashlib.sha256(document.encode()).hexdigest()
        if snapshot:
            self._snapshot = (copy.deepcopy(self.cache), self._conversation_state())
        self.last_turn = TurnStats(prefill_tokens=len(tokens), prefill_seconds=seconds)
        return self.last_turn

    # -------------------------------------------------------------- turns
    def _turn_text(self, question: str) -> str:
        """Text to feed for ``question``, given what the cache already holds."""
        if self._question_suffix is None:
            raise SessionError("load a document before asking questions")
        if not self.messages:
            return question + self._question_suffix
        history = self._history()
        previous = self.tokenizer.apply_chat_template(history, tokenize=False)
        following = self.tokenizer.apply_chat_template(
            history + [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        reply = history[-1]["content"]
        closing = previous[previous.rfind(reply) + len(reply) :] if reply else ""
        eos = self.tokenizer.eos_token or ""
        if self._eos_fed and eos and closing.startswith(eos):
            closing = closing[len(eos) :]
        if following.startswith(previous):
            return closing + following[len(previous) :]
        # A template that rewrites history (e.g. drops old reasoning): open a new turn only.
        return closing + self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )

    def _history(self) -> list[dict[str, str]]:
        """The conversation with the document inside the first user message."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        history = []
        for i, message in enumerate(self.messages):
            if i == 0:
                content = DOCUMENT_TEMPLATE.format(document=self._document, question=message["content"])
                history.append({"role": "user", "content": content})
            else:
                history.append(message)
        return system + history

    def ask(self, question: str, max_tokens: int = 512, sampler: Any = None, **kwargs: Any) -> Iterator[str]:
        """Stream the answer to ``question``; statistics land in ``last_turn``."""
        question = question.strip()
        if not question:
            raise SessionError("empty question")
        tokens = self._encode(self._turn_text(question))
        stats = TurnStats(prefill_tokens=len(tokens))
        stats.prefill_seconds = self.feed(tokens[:-1])
        offset_before = self.offset
        reply, response = "", None
        start = time.perf_counter()
        for response in mlx_lm.stream_generate(
            self.model,
            self.tokenizer,
            tokens[-1:],
            max_tokens=max_tokens,
            sampler=sampler,
            prompt_cache=self.cache,
            prefill_step_size=self.prefill_step_size,
            **kwargs,
        ):
            reply += response.text
            yield response.text
        if response is not None:
            stats.prefill_seconds += response.prompt_tokens / response.prompt_tps if response.prompt_tps else 0.0
            stats.generated_tokens = response.generation_tokens
            stats.generation_tps = response.generation_tps
            stats.peak_memory_gb = response.peak_memory
            stats.finish_reason = response.finish_reason
        fed = self.offset - offset_before - 1  # generated tokens now in the cache
        self._eos_fed = stats.finish_reason == "stop" and fed >= stats.generated_tokens
        self.messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply.strip()}]
        stats.generation_seconds = time.perf_counter() - start
        self.last_turn = stats

    # -------------------------------------------------------------- state
    def layer_stats(self) -> list[LayerStats]:
        """Kept tokens and bytes per layer, next to what a full cache would hold."""
        rows = []
        for i, c in enumerate(self.cache):
            if isinstance(c, EvictingKVCache):
                per_token = c.kv_nbytes / c.length if c.length else 0
                rows.append(LayerStats(i, c.length, c.offset, c.nbytes, int(per_token * c.offset)))
            else:
                size = c.size() if hasattr(c, "size") else c.offset
                nbytes = c.nbytes if not c.empty() else 0
                full = int(nbytes / size * c.offset) if size else 0
                rows.append(LayerStats(i, size, c.offset, nbytes, max(full, nbytes)))
        return rows

    def kept_fraction(self) -> float:
        rows = [r for r in self.layer_stats() if r.seen]
        return sum(r.kept for r in rows) / sum(r.seen for r in rows) if rows else 1.0

    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache if not (hasattr(c, "empty") and c.empty()))

    def _conversation_state(self) -> dict[str, Any]:
        return {
            "messages": list(self.messages),
            "document_tokens": self.document_tokens,
            "question_suffix": self._question_suffix,
            "eos_fed": self._eos_fed,
            "system_prompt": self.system_prompt,
        }

    def reset(self) -> None:
        """Forget the questions and answers; keep the prefilled document."""
        if self._snapshot is None:
            raise SessionError("no document snapshot to return to")
        cache, state = self._snapshot
        self.cache = copy.deepcopy(cache)
        self._restore_conversation(state)

    def _restore_conversation(self, state: dict[str, Any]) -> None:
        self.messages = list(state["messages"])
        self.document_tokens = state["document_tokens"]
        self._question_suffix = state["question_suffix"]
        self._eos_fed = state["eos_fed"]
        self.system_prompt = state["system_prompt"]

    def save(self, path: str | Path) -> Path:
        """Write the cache and the conversation as an mlx-lm prompt-cache file.

        The file gets exactly the name given (it must end in ``.safetensors``,
        which mlx would otherwise append behind the user's back). It is written
        beside its target and renamed into place, so a failed save leaves any
        earlier file untouched."""
        path = check_cache_path(path)
        meta = dict(self.metadata)
        meta["namm_session"] = json.dumps({**self._conversation_state(), "document": self._document})
        with atomic_path(path, suffix=".safetensors", mode=0o600) as tmp:  # it holds the user's document
            save_prompt_cache(str(tmp), self.cache, meta)
        return path

    @classmethod
    def restore(cls, path: str | Path, model: nn.Module, tokenizer: Any, **kwargs: Any) -> "DocumentSession":
        """Continue a session saved by :meth:`save` (the document is not re-read)."""
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
        except Exception as err:  # corrupt or foreign file
            raise SessionError(f"cannot read prompt cache {path}: {err}") from None
        if "namm_session" not in meta:
            raise SessionError(f"{path} is a prompt cache but not a namm document session")
        state = json.loads(meta.pop("namm_session"))
        session = cls(model, tokenizer, metadata=meta, **kwargs)
        if len(cache) != len(session.cache):
            raise SessionError(f"{path} was saved for a model with {len(cache)} layers, not {len(session.cache)}")
        session.cache = cache
        session._document = state.pop("document")
        session._restore_conversation(state)
        return session


def check_cache_path(path: str | Path) -> Path:
    """``path`` if a prompt cache can be written there, else :class:`SessionError`.

    Checked before any prefill, so a typo costs nothing: the name must end in
    ``.safetensors`` and its folder must exist and be writable."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise SessionError(f"prompt cache files end in .safetensors; got {path} (try {path.name}.safetensors)")
    if path.is_dir():
        raise SessionError(f"{path} is a folder; give a file name ending in .safetensors")
    folder = path.parent
    if not folder.is_dir():
        raise SessionError(f"cannot save to {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SessionError(f"cannot save to {path}: the folder {folder} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise SessionError(f"cannot save to {path}: the file is read-only")
    return path


def namm_settings(scorer: Any, max_kv_size: int | None, kv_bits: int | None = None, kv_group_size: int = 64) -> str:
    """Fingerprint of what shapes a cache's eviction: the scorer's description
    and arrays (a NAMM's config, weights and statistics) plus the hard cap
    and the kept tokens' quantisation.
    ``none`` for plain mlx-lm caches. A prompt cache records it, so it is only
    reused under the same settings."""
    if scorer is None:
        return "none"
    digest = hashlib.sha256(json.dumps(scorer.spec(), sort_keys=True).encode())
    for name, array in sorted(scorer.arrays().items()):
        digest.update(name.encode())
        digest.update(np.asarray(array, dtype=np.float32).tobytes())
    digest.update(f"max_kv_size={max_kv_size}".encode())
    if kv_bits is not None:
        digest.update(f"kv_bits={kv_bits},kv_group_size={kv_group_size}".encode())
    return digest.hexdigest()[:16]


def first_turn_parts(tokenizer: Any, document: str, system_prompt: str | None = None) -> tuple[str, str]:
    """Chat-template text before and after the first question about ``document``."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": DOCUMENT_TEMPLATE.format(document=document, question=_SENTINEL)}
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if text.count(_SENTINEL) != 1:
        raise SessionError("the model's chat template does not keep the user message verbatim")
    before, after = text.split(_SENTINEL)
    return before, after


def document_tokens(tokenizer: Any, document: str, system_prompt: str | None = None) -> int:
    """Tokens the document occupies before the first question."""
    return len(tokenizer.encode(first_turn_parts(tokenizer, document, system_prompt)[0], add_special_tokens=False))


def context_limit(config: dict[str, Any]) -> int | None:
    """The trained context length from an mlx-lm ``config.json`` dict."""
    for key in ("max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def yarn_scaling(needed: int, trained: int) -> dict[str, Any]:
    """A YaRN ``rope_scaling`` entry that stretches ``trained`` to cover ``needed``."""
    factor = math.ceil(needed / trained * 4) / 4
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": trained}


class ContextError(NammError, ValueError):
    """The document does not fit the model's context and cannot be stretched."""


#: Families whose mlx-lm RoPE accepts a YaRN ``rope_scaling`` entry.
YARN_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}

#: Default ceiling on the YaRN stretch: past a few times the trained context
#: answers degrade badly and the prefill alone takes hours on a laptop.
DEFAULT_MAX_ROPE_FACTOR = 8.0

#: Upper bound on the UTF-8 bytes one token covers in real text (typical
#: English is ~4; long runs of whitespace or punctuation can merge more). A
#: document of ``bytes / 16`` tokens or more is certainly too long.
MAX_BYTES_PER_TOKEN = 16


def check_document_fits(
    document: str, config: dict[str, Any], rope_scaling: str = "auto", max_rope_factor: float = DEFAULT_MAX_ROPE_FACTOR
) -> None:
    """Refuse, before tokenising, a document far beyond what the model can read
    even stretched to ``max_rope_factor`` times its trained context (tokenising
    tens of megabytes takes minutes and gigabytes). The estimate is a lower
    bound on its tokens, from its bytes; documents near the limit are left to
    the exact count."""
    trained = context_limit(config)
    if not trained:
        return
    stretchable = rope_scaling != "off" and not config.get("rope_scaling") and config.get("model_type") in YARN_FAMILIES
    readable = int(trained * max_rope_factor) if stretchable else trained
    size = len(document.encode("utf-8", "replace"))
    at_least = size // MAX_BYTES_PER_TOKEN
    if at_least > readable:
        how = f"{trained:,} trained x{max_rope_factor:g} YaRN = {readable:,}" if stretchable else f"{trained:,}"
        raise ContextError(
            f"the document has {size:,} bytes, at least {at_least:,} tokens, but the model reads at most {how} tokens; "
            "shorten the document"
        )


#: Documents larger than this are refused before they are read at all (no
#: model reads a gigabyte; reading it would only fill memory).
MAX_DOCUMENT_BYTES = 1 << 30


def check_document_source(path: str | os.PathLike) -> None:
    """Refuse, before reading, a device (``/dev/zero`` never ends) or a file of
    more than :data:`MAX_DOCUMENT_BYTES`. ``-`` (stdin), pipes and missing
    files are left to the document reader."""
    if str(path) == "-":
        return
    try:
        info = Path(path).expanduser().stat()
    except OSError:
        return
    if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        raise ContextError(f"{path} is a device, not a document; give a text, Markdown, reST or HTML file")
    if stat.S_ISREG(info.st_mode) and info.st_size > MAX_DOCUMENT_BYTES:
        raise ContextError(
            f"{path} has {info.st_size:,} bytes, more than any model here can read "
            f"(the limit is {MAX_DOCUMENT_BYTES:,}); shorten the document"
        )


def local_model_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """``config.json`` of a local model folder (None for hub ids and GGUF files)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def open_session(
    document: str,
    model: str | None = None,
    namm: Any = None,
    use_namm: bool = True,
    max_kv_size: int | None = None,
    system_prompt: str | None = None,
    prefill_step_size: int = 512,
    rope_scaling: str = "auto",
    reserve: int = 1024,
    dtype: str = "float32",
    max_rope_factor: float = DEFAULT_MAX_ROPE_FACTOR,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
) -> tuple[DocumentSession, list[str]]:
    """Load the model (and NAMM) for ``document`` and return an empty session.

    If the document plus ``reserve`` tokens for the conversation exceeds the
    model's trained context, a YaRN RoPE scaling is applied where the family
    supports it (``rope_scaling="auto"``) up to ``max_rope_factor``; otherwise
    :class:`ContextError` gives both numbers. The NAMM is loaded (and
    validated) before the model. ``kv_bits``/``kv_group_size`` quantise the
    NAMM cache's kept tokens. Returns the session and notes for the user.
    """
    from .integration import as_scorer, attach
    from .models import resolve_model_path

    notes: list[str] = []
    scorer = as_scorer(namm) if use_namm else None
    path = resolve_model_path(model, dtype=dtype)
    config = local_model_config(path)
    if config is not None:
        check_document_fits(document, config, rope_scaling, max_rope_factor)
    loaded, tokenizer, config = load_mlx_model(path)
    check_document_fits(document, config, rope_scaling, max_rope_factor)
    needed = document_tokens(tokenizer, document, system_prompt) + reserve
    trained = context_limit(config)
    if trained and needed > trained:
        family = config.get("model_type", "?")
        why = f"the document needs {needed:,} tokens (incl. {reserve:,} for questions and answers) but the model was trained on {trained:,}"
        if rope_scaling == "off":
            raise ContextError(f"{why}; shorten the document or drop --rope-scaling off")
        if config.get("rope_scaling") or family not in YARN_FAMILIES:
            raise ContextError(f"{why}, and its family ({family}) cannot be stretched here; shorten the document")
        scaling = yarn_scaling(needed, trained)
        if scaling["factor"] > max_rope_factor:
            raise ContextError(
                f"{why}: YaRN would stretch it x{scaling['factor']:g}, past the ceiling x{max_rope_factor:g}; "
                "shorten the document or raise --max-rope-factor"
            )
        loaded, tokenizer, _ = load_mlx_model(path, {"rope_scaling": scaling, "max_position_embeddings": needed})
        notes.append(f"{why}: applied YaRN RoPE scaling x{scaling['factor']:g} (answers may degrade)")
    if scorer is not None:
        attach(loaded, scorer, max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
    session = DocumentSession(
        loaded, tokenizer, system_prompt=system_prompt, max_kv_size=max_kv_size, prefill_step_size=prefill_step_size
    )
    session.metadata["model"] = str(path)
    session.metadata["namm_settings"] = namm_settings(scorer, max_kv_size, kv_bits, kv_group_size)
    return session, notes


class ModelLoadError(NammError, ValueError):
    """The model could not be loaded; the message says what was tried."""


def load_mlx_model(
    path: str | os.PathLike, model_config: dict[str, Any] | None = None
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``mlx_lm.load`` returning the config too, with one-line errors."""
    path = os.fspath(path)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith(".gguf")
    if looks_local and not Path(path).expanduser().exists():
        raise ModelLoadError(f"no model at {path} (give a local mlx-lm folder, a .gguf file or a hub id)")
    try:
        return mlx_lm.load(path, model_config=model_config or {}, return_config=True)
    except Exception as err:  # mlx-lm raises many types for a bad path or hub id
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"cannot load model '{path}': {first} (give a local mlx-lm folder, a .gguf file or a hub id)"
        ) from None
