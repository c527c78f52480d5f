"""Document sessions: context limits and multi-turn prompts (real default model, no generation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from namm_mlx.session import ContextError, document_tokens, open_session, yarn_scaling

LONG = (Path(__file__).parent / "data" / "pride_and_prejudice.txt").read_text()[:48000]


def test_long_document_gets_yarn_scaling():
    session, notes = open_session(LONG, use_namm=False)
    needed = document_tokens(session.tokenizer, LONG) + 1024
    assert needed > 8192
    assert len(notes) == 1 and "YaRN" in notes[0] and "8,192" in notes[0]
    rope = session.model.model.layers[0].self_attn.rope
    assert type(rope).__name__ == "YarnRoPE"
    assert yarn_scaling(needed, 8192)["factor"] * 8192 >= needed


def test_long_document_refused_without_scaling():
    with pytest.raises(ContextError, match=r"trained on 8,192"):
        open_session(LONG, use_namm=False, rope_scaling="off")


def test_second_turn_feeds_only_the_new_turn():
    session, _ = open_session("A short document about a red fox.", use_namm=False)
    before, after = session.first_turn_parts("A short document about a red fox.")
    assert "red fox" in before and after.endswith("<|im_start|>assistant\n")
    session._question_suffix, session._document = after, "A short document about a red fox."
    session.messages = [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."}]
    session._eos_fed = True
    assert session._turn_text("Q2?") == "\n<|im_start|>user\nQ2?<|im_end|>\n<|im_start|>assistant\n"
    session._eos_fed = False
    assert session._turn_text("Q2?").startswith("<|im_end|>\n<|im_start|>user\nQ2?")
