"""Tiny random mlx-lm models of each supported family, built in-test.

Real mlx-lm model classes with real configs, just small and randomly
initialised: they exercise every mechanical path (RoPE offsets, q/k norms,
fused qkv, sliding-window layers, GQA) without weights.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.utils import _get_classes

VOCAB = 97

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)

CONFIGS = {
    "llama": dict(model_type="llama", rope_theta=10000.0, head_dim=16),
    "mistral": dict(model_type="mistral", rope_theta=10000.0, head_dim=16),
    "qwen2": dict(model_type="qwen2", rope_theta=10000.0),
    "qwen3": dict(model_type="qwen3", rope_theta=10000.0, head_dim=16),
    "gemma3_text": dict(
        model_type="gemma3_text",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        sliding_window_pattern=2,
        rope_theta=10000.0,
        rope_local_base_freq=10000.0,
    ),
    "phi3": dict(model_type="phi3", rope_theta=10000.0, num_key_value_heads=4),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=16,
        rope_theta=10000.0,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
}

SUPPORTED = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]


def tiny_config(family: str, **overrides) -> dict:
    """The ``config.json`` dict of a tiny ``family`` model."""
    return {**_COMMON, **CONFIGS[family], **overrides}


def tiny_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised mlx-lm model of ``family`` (float32)."""
    config = tiny_config(family, **overrides)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Larger random weights than the default init give peaky, varied attention,
    # which makes eviction decisions (and mistakes) visible.
    model.update(tree_map(lambda p: p * 3.0 if p.ndim == 2 else p, model.parameters()))
    mx.eval(model.parameters())
    return model
