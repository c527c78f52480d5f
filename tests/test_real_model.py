"""A real pretrained model evicting through stock mlx-lm generation.

SmolLM2-135M-Instruct (the embedded default, converted from its PyPI GGUF)
reads a ~2.3k-token real document through ``mlx_lm.stream_generate`` with a NAMM
attached: it answers a question about the document while its caches hold
fewer bytes than the full cache would.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import KVCache

import namm_mlx
from namm_mlx import EvictingKVCache

pytestmark = pytest.mark.real_model  # every test here loads the real SmolLM2

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def namm_dir(reference_namm, tmp_path_factory) -> Path:
    """The reference checkpoint's NAMM (a real evolved-format vector), as a folder."""
    return reference_namm.save(tmp_path_factory.mktemp("namm") / "reference")


def test_document_answer_with_bounded_cache(namm_dir):
    model, tokenizer = namm_mlx.load(namm=namm_dir, max_kv_size=768)
    text = (DATA / "pride_and_prejudice.txt").read_text()
    body = tokenizer.encode(text, add_special_tokens=False)[:2300]
    fact = "\n\nNote from the editor: the secret code of the library is 7314.\n\n"
    document = tokenizer.decode(body) + fact
    messages = [{"role": "user", "content": document + "What is the secret code of the library?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert 2300 < len(prompt) < 2600  # steps at 512, 1,024, 1,536 and 2,048

    cache = mlx_lm.models.cache.make_prompt_cache(model)
    assert all(isinstance(c, EvictingKVCache) for c in cache)
    answer = "".join(
        r.text
        for r in mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=24, prompt_cache=cache, prefill_step_size=512
        )
    )
    assert "7314" in answer, answer

    offset = cache[0].offset
    assert all(c.steps >= 4 and c.length <= 768 + 512 for c in cache), [(c.steps, c.length) for c in cache][:3]
    full = KVCache()
    k = mx.zeros((1, cache[0].keys.shape[1], offset, cache[0].keys.shape[3]), dtype=cache[0].keys.dtype)
    full.update_and_fetch(k, k)
    full_bytes = full.nbytes * len(cache)
    assert sum(c.nbytes for c in cache) < full_bytes
    print(f"cache {sum(c.nbytes for c in cache) / 1e6:.1f} MB vs full {full_bytes / 1e6:.1f} MB; answer {answer!r}")
