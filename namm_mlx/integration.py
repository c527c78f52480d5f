"""Give an mlx-lm model evicting caches, so stock mlx-lm generation evicts.

After :func:`attach`, ``model.make_cache()`` returns :class:`EvictingKVCache`
layers in place of plain ``KVCache`` ones (sliding-window and other special
layers are left as they are), so ``mlx_lm.generate``, ``stream_generate``,
``generate_step``, ``mlx_lm.chat`` and the server's single-request path all
build NAMM caches without any change to mlx-lm.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from .cache import EvictingKVCache, Scorer, UnsupportedModelError
from .hook import install_hook
from .key_probe import probe_misfit
from .namm import NAMM, NAMMFormatError
from .quantized import check_bits
from .policies import NAMMScorer

#: Why some families fail the probe (their attention bypasses mlx-lm's function).
KNOWN_UNSUPPORTED = {
    "gemma2": "it computes attention inline, with logit soft-capping",
    "olmo": "it computes attention inline",
    "plamo2": "it calls mx.fast attention directly",
    "deepseek_v41": "it calls mx.fast attention directly",
    "muse_spark": "it calls mx.fast attention directly",
    "deepseek_v2": "it uses latent attention",
    "deepseek_v3": "it uses latent attention",
}

#: Families tested end to end (tiny random models in tests/test_cache.py).
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")

DEFAULT_NAMM_DIR = Path(__file__).resolve().parents[1] / "weights" / "default"


def model_type(model: nn.Module) -> str:
    """The model's family name as mlx-lm knows it."""
    args = getattr(model, "args", None)
    return getattr(model, "model_type", None) or getattr(args, "model_type", None) or type(model).__module__


def as_scorer(namm: NAMM | Scorer | str | os.PathLike | None) -> Scorer:
    """Accept a NAMM, a folder holding one, a ready scorer, or None (the shipped default)."""
    if namm is None:
        if not (DEFAULT_NAMM_DIR / "namm.safetensors").is_file():
            raise NAMMFormatError(
                f"no default NAMM is installed at {DEFAULT_NAMM_DIR}; pass a NAMM folder (--namm) "
                "or run without eviction (--no-namm)"
            )
        namm = DEFAULT_NAMM_DIR
    if isinstance(namm, (str, os.PathLike)):
        from .hub import resolve_namm  # a folder, or a Hugging Face repo ORG/NAME

        namm = NAMM.load(resolve_namm(namm))
    if isinstance(namm, NAMM):
        return NAMMScorer(namm)
    if not hasattr(namm, "score"):
        raise TypeError(f"expected a NAMM, a NAMM folder or a scorer, got {type(namm).__name__}")
    return namm


def attach(
    model: nn.Module,
    namm: NAMM | Scorer | str | os.PathLike | None = None,
    max_kv_size: int | None = None,
    keep_fraction: float | None = None,
    probe: bool = True,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
) -> nn.Module:
    """Make ``model.make_cache()`` return evicting caches driven by ``namm``.

    max_kv_size: hard cap on tokens per head after each eviction step (honoured
    for every family, unlike stock mlx-lm's ``--max-kv-size``).
    keep_fraction: cap on the kept fraction of tokens seen (for baselines).
    probe: run one token through fresh caches to prove the family's attention
    reaches the hook; raises :class:`UnsupportedModelError` otherwise.
    kv_bits, kv_group_size: quantise the kept keys/values (mlx-lm's
    ``--kv-bits``/``--kv-group-size``), so eviction and quantisation multiply.
    """
    check_bits(kv_bits, kv_group_size)
    family = model_type(model)
    scorer = as_scorer(namm)
    base_make_cache = getattr(type(model), "make_cache", None)
    scorer = _without_unfit_key_probe(model, scorer, base_make_cache)

    def make_cache() -> list[Any]:
        install_hook()
        caches = base_make_cache(model) if base_make_cache else [KVCache() for _ in model.layers]
        return [
            EvictingKVCache(
                scorer, max_kv_size=max_kv_size, keep_fraction=keep_fraction,
                kv_bits=kv_bits, kv_group_size=kv_group_size, layer=layer,
            )  # fmt: skip
            if type(c) is KVCache
            else c
            for layer, c in enumerate(caches)
        ]

    model.make_cache = make_cache
    model.namm_scorer = scorer
    if probe:
        _probe(model, family)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Restore the model's own caches."""
    for name in ("make_cache", "namm_scorer"):
        if name in model.__dict__:
            del model.__dict__[name]
    return model


def _without_unfit_key_probe(model: nn.Module, scorer: Scorer, base_make_cache: Any) -> Scorer:
    """``scorer``, or its NAMM without the key probe (with a warning) when the
    probe was fitted to keys of other shapes: a probe reads one model's keys,
    while the BAM works on any model's attention, so the NAMM still runs."""
    namm = getattr(scorer, "namm", None)
    probe = getattr(namm, "key_probe", None)
    if probe is None:
        return scorer
    caches = base_make_cache(model) if base_make_cache else [KVCache() for _ in model.layers]
    mx.eval(model(mx.array([[0]]), cache=caches))
    shapes = {(c.keys.shape[1], c.keys.shape[3]) for c in caches if type(c) is KVCache and c.keys is not None}
    misfit = probe_misfit(probe, shapes, len(caches) == probe.shape[0])
    if misfit is None:
        return scorer
    found = ", ".join(f"{h} KV heads of dimension {d}" for h, d in sorted(shapes))
    warnings.warn(f"{misfit}; this model has {len(caches)} layers with {found}: running without the probe", stacklevel=3)
    return type(scorer)(namm.without_key_probe(), ranked=getattr(scorer, "ranked", False))


def _probe(model: nn.Module, family: str) -> None:
    """One token through fresh caches: every evicting layer must see its attention."""
    caches = model.make_cache()
    evicting = [c for c in caches if isinstance(c, EvictingKVCache)]
    if not evicting:
        raise UnsupportedModelError(
            f"model family '{family}' has no full-attention KV-cache layers a NAMM could evict"
        )
    reason = KNOWN_UNSUPPORTED.get(family, "its attention bypasses mlx-lm's scaled_dot_product_attention")
    try:
        mx.eval(model(mx.array([[0]]), cache=caches))
    except UnsupportedModelError as err:
        reason = str(err)
    else:
        if not any(c._awaiting_attention for c in evicting):
            return
    model.__dict__.pop("make_cache", None)
    model.__dict__.pop("namm_scorer", None)
    raise UnsupportedModelError(
        f"model family '{family}' is not supported: a NAMM cannot see its attention ({reason}; "
        f"tested families: {', '.join(TESTED_FAMILIES)})"
    )


def load(
    model: str | os.PathLike | None = None,
    namm: NAMM | Scorer | str | os.PathLike | None = None,
    max_kv_size: int | None = None,
    dtype: str = "float32",
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    **load_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """``mlx_lm.load`` plus :func:`attach`: returns ``(model, tokenizer)``.

    model: None (the embedded SmolLM2-135M-Instruct), a local mlx-lm folder, a
    ``.gguf`` file or a Hugging Face hub id.
    """
    from .models import load_model

    loaded, tokenizer = load_model(model, dtype=dtype, **load_kwargs)
    attach(loaded, namm, max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
    return loaded, tokenizer
