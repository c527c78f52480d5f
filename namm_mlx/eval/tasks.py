"""Synthetic long-context tasks built from real public-domain texts.

Every item is a dict in LongBench's JSONL shape, so one runner handles both::

    {"_id", "dataset" (the task), "context", "input" (the question),
     "answers" (list), "length" (target prompt tokens), "depth" (0..1), ...}

Tasks (all deterministic for a seed; ``depth`` is the position of the needle /
target as a fraction of the context's tokens):

``needle``        one "special magic number for <key>" sentence in prose; ask for it.
``multi_needle``  three such sentences with different keys, spread over the
                  context (at ``depth``, ``depth + 1/3``, ``depth + 2/3``, wrapped);
                  ask for all three (scored as the share recalled).
``passkey``       "The pass key is NNNNN. Remember it." in prose; ask for it.
``kjv_verse``     consecutive King James verses, one per line ("Ge1:3 And God
                  said..."); ask for the text of the verse at ``depth`` by reference.
``chapter``       the openings of k consecutive chapters of a novel, each under a
                  "Chapter N" heading; quote a sentence at ``depth`` and ask which
                  chapter holds it.

Texts come from a :class:`TextSource`: the cache filled by ``namm data fetch``
(:meth:`TextSource.from_cache`) or explicit files (:meth:`TextSource.from_files`;
the tests pass ``tests/data/``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import NammError
from .prompts import encode, prompt_tokens

TASK_NAMES = ("needle", "multi_needle", "passkey", "kjv_verse", "chapter")

#: Depth of item i is ``DEFAULT_DEPTHS[i % 5]`` unless depths are given: the first
#: n items of a task are the same whatever ``n`` is (like LongBench's ``--limit``).
DEFAULT_DEPTHS = (0.1, 0.5, 0.9, 0.3, 0.7)

#: Prose texts of the cache used for haystacks (all of them) and chapters.
DEFAULT_PROSE = (
    "pride_and_prejudice",
    "emma",
    "mansfield_park",
    "northanger_abbey",
    "persuasion",
    "sense_and_sensibility",
    "mobydick",
)

MULTI_NEEDLES = 3
_CHARS_PER_TOKEN = 6  # generous: English prose is ~4.3 chars per SmolLM2 token

_ADJECTIVES = (
    "amber azure brave calm crimson dusty eager faded gentle golden hollow icy jolly "
    "lucky misty noble quiet rapid rusty silent silver sleepy steady sunny tidy velvet "
    "wild windy young"
).split()
_NOUNS = (
    "anchor badger beacon candle castle comet falcon garden harbor island lantern "
    "meadow mirror orchard otter pebble pigeon river saddle spruce teapot thistle "
    "tower valley walnut willow"
).split()


class TaskError(NammError, ValueError):
    """A task cannot be built from the given texts; the message says why."""


_HEADING = re.compile(r"^[ \t]*(?:CHAPTER|Chapter)\s+([IVXLCDM]+|\d+)\b[^\n]*$", re.M)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Capt|Col)\.$")


def _sentence_ends(text: str, start: int = 0, end: int | None = None) -> list[int]:
    """Offsets just after sentence-ending punctuation (not after "Mr." and the like)."""
    return [
        m.end()
        for m in _SENTENCE_END.finditer(text, start, len(text) if end is None else end)
        if not _ABBREVIATION.search(text, max(0, m.start() - 6), m.start() + 1)
    ]
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}


def _roman(s: str) -> int:
    total = 0
    for a, b in zip(s, s[1:] + " "):
        v = _ROMAN[a]
        total += -v if b != " " and _ROMAN[b] > v else v
    return total


def parse_chapters(text: str, min_chars: int = 500) -> list[tuple[int, str]]:
    """``[(number, body), ...]`` for every "Chapter N"/"CHAPTER IV" heading whose
    body has at least ``min_chars`` characters (drops tables of contents)."""
    heads = list(_HEADING.finditer(text))
    chapters = []
    for m, nxt in zip(heads, heads[1:] + [None]):
        body = text[m.end() : nxt.start() if nxt else len(text)].strip()
        # Volume headings and similar end the chapter's text.
        body = re.split(r"\n\s*(?:VOLUME|Volume|BOOK|Book)\s+[IVXLC\d]+\b", body)[0].strip()
        if len(body) >= min_chars:
            num = m.group(1)
            chapters.append((int(num) if num.isdigit() else _roman(num), body))
    return chapters


@dataclass
class TextSource:
    """Texts for the tasks. prose: name -> text (haystacks, chapters); kjv: the
    King James Bible as ``Ref<TAB>verse`` lines (``namm_mlx.data.parse_kjv``)."""

    prose: dict[str, str] = field(default_factory=dict)
    kjv: str | None = None
    _verses: list[tuple[str, str]] | None = field(default=None, repr=False)
    _chapters: dict[str, list[tuple[int, str]]] | None = field(default=None, repr=False)

    @classmethod
    def from_cache(cls, prose: bool = True, kjv: bool = True, names: Iterable[str] = DEFAULT_PROSE) -> "TextSource":
        """Texts from ``namm data fetch``'s cache: the prose texts among ``names``
        that are there (at least one when ``prose``) and the KJV (when ``kjv``).
        Raises :class:`namm_mlx.data.DataError` saying how to fetch what is missing."""
        from ..data import DataError, available_texts, load_text

        source = cls()
        if prose:
            have = available_texts()
            source.prose = {name: load_text(name) for name in names if name in have}
            if not source.prose:
                raise DataError("no prose text is in the cache; run `namm data fetch austen` (or pass --text FILE)")
        if kjv:
            source.kjv = load_text("kjv")
        return source

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> "TextSource":
        """``.tsv`` files are KJV verse lists; anything else is prose (named by stem)."""
        source = cls()
        for path in map(Path, paths):
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as err:
                raise TaskError(f"cannot read text {path}: {err.strerror or err}") from None
            if path.suffix.lower() == ".tsv":
                source.kjv = text if source.kjv is None else source.kjv + "\n" + text
            else:
                source.prose[path.stem] = text
        return source

    def verses(self) -> list[tuple[str, str]]:
        if self._verses is None:
            from ..data import parse_kjv

            if not self.kjv:
                raise TaskError("the kjv_verse task needs the KJV (namm data fetch kjv, or a .tsv text)")
            self._verses = parse_kjv(self.kjv)
        return self._verses

    def chaptered(self) -> dict[str, list[tuple[int, str]]]:
        if self._chapters is None:
            self._chapters = {}
            for name in sorted(self.prose):
                chapters = parse_chapters(self.prose[name])
                if len(chapters) >= 2:
                    self._chapters[name] = chapters
        return self._chapters


# --------------------------------------------------------------------------- helpers


def _rng(seed: int, task: str, length: int, index: int) -> random.Random:
    return random.Random(f"namm-eval:{seed}:{task}:{length}:{index}")


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _cut_tokens(tokenizer: Any, text: str, n_tokens: int) -> str:
    """The first ~``n_tokens`` tokens of ``text``, ending on a word boundary."""
    ids = encode(tokenizer, text[: n_tokens * _CHARS_PER_TOKEN + 64])
    if len(ids) <= n_tokens:
        return text.rstrip()
    cut = tokenizer.decode(ids[:n_tokens])
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return (cut[:space] if space > len(cut) // 2 else cut).rstrip()


def _prose_span(rng: random.Random, source: TextSource, tokenizer: Any, n_tokens: int) -> str:
    """~``n_tokens`` tokens of prose from a random paragraph of a random text
    (running on into the next text if one ends)."""
    if not source.prose:
        raise TaskError("no prose texts: give some (namm data fetch austen, or a .txt text)")
    names = sorted(source.prose)
    i = rng.randrange(len(names))
    text = source.prose[names[i]]
    starts = [0] + [m.end() for m in re.finditer(r"\n[ \t]*\n", text)]
    start = rng.choice(starts)
    need = n_tokens * _CHARS_PER_TOKEN + 64
    piece = text[start : start + need].lstrip()
    while len(piece) < need:
        i = (i + 1) % len(names)
        piece += "\n\n" + source.prose[names[i]][: need - len(piece)]
    return _cut_tokens(tokenizer, piece, n_tokens)


def _char_at_depth(tokenizer: Any, text: str, depth: float) -> int:
    """Character offset where the token at fraction ``depth`` of ``text`` starts."""
    ids = encode(tokenizer, text)
    p = min(max(round(depth * len(ids)), 0), len(ids))
    return len(tokenizer.decode(ids[:p])) if p else 0


def _boundary_near(text: str, pos: int, window: int = 160) -> int:
    """The sentence boundary nearest ``pos`` (within ``window`` chars), else the
    nearest whitespace, else ``pos`` itself; 0 and len(text) are boundaries."""
    if pos <= 0:
        return 0
    if pos >= len(text):
        return len(text)
    ends = _sentence_ends(text, max(0, pos - window), min(len(text), pos + window))
    ends = [e for e in ends if abs(e - pos) <= window]
    if ends:
        return min(ends, key=lambda e: abs(e - pos))
    spaces = [m.end() for m in re.finditer(r"\s+", text[max(0, pos - window) : pos + window])]
    if spaces:
        return min((max(0, pos - window) + s for s in spaces), key=lambda e: abs(e - pos))
    return pos


def _insert(text: str, pieces: Sequence[tuple[int, str]]) -> str:
    """Insert ``(offset, sentence)`` pieces (offsets into the original ``text``)."""
    for pos, sentence in sorted(pieces, reverse=True):
        before, after = text[:pos], text[pos:]
        if before and not before[-1].isspace():
            before += " "
        text = before + sentence + (" " if after and not after[0].isspace() else "") + after
    return text


def _context_budget(tokenizer: Any, target: int, question: str, reserve: int = 0) -> int:
    """Tokens left for the context once the chat template and question are counted."""
    overhead = len(prompt_tokens(tokenizer, {"context": "", "input": question, "dataset": ""})[0])
    budget = target - overhead - reserve - 4
    if budget < 64:
        raise TaskError(f"length {target} leaves only {budget} tokens for the document; use a longer length")
    return budget


# --------------------------------------------------------------------------- tasks


def _needle_item(rng, source, tokenizer, target, depth, keys: int, passkey: bool = False) -> dict[str, Any]:
    taken: set[str] = set()
    if passkey:
        value = str(rng.randint(10_000, 99_999))
        needles = [f"The pass key is {value}. Remember it. {value} is the pass key."]
        question = "What is the pass key mentioned in the document? Answer with the number only."
        answers, names = [value], []
    else:
        names = [_key(rng, taken) for _ in range(keys)]
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in names]
        needles = [f"The special magic number for {k} is: {v}." for k, v in zip(names, values)]
        answers = values
        if keys == 1:
            question = f"What is the special magic number for {names[0]} mentioned in the document?"
        else:
            listed = ", ".join(names[:-1]) + f" and {names[-1]}"
            question = f"What are the special magic numbers for {listed} mentioned in the document?"
    needle_tokens = sum(len(encode(tokenizer, n)) + 1 for n in needles)
    budget = _context_budget(tokenizer, target, question, needle_tokens)
    haystack = _prose_span(rng, source, tokenizer, budget)
    depths = [(depth + j / len(needles)) % 1.0 if j else depth for j in range(len(needles))]
    offsets = [_boundary_near(haystack, _char_at_depth(tokenizer, haystack, d)) for d in depths]
    item = {
        "context": _insert(haystack, list(zip(offsets, needles))),
        "input": question,
        "answers": answers,
        "needles": needles,
        "depths": [round(d, 4) for d in depths],
    }
    if keys > 1:
        item["keys"] = names
        item["reference"] = ", ".join(answers)
    return item


def _kjv_item(rng, source, tokenizer, target, depth) -> dict[str, Any]:
    verses = source.verses()
    question_stub = "What is the text of verse Ge10:10 in the document? Quote it exactly."
    budget = _context_budget(tokenizer, target, question_stub)
    start = rng.randrange(len(verses))
    lines, used, i = [], 0, start
    while used < budget and len(lines) < len(verses):
        ref, text = verses[i % len(verses)]
        line = f"{ref} {text}"
        cost = len(encode(tokenizer, line + "\n"))
        if used + cost > budget and lines:
            break
        lines.append((ref, text, used))
        used += cost
        i += 1
    refs = [r for r, _, _ in lines]
    eligible = [
        (ref, text, pos)
        for ref, text, pos in lines
        if 4 <= len(text.split()) <= 40 and refs.count(ref) == 1
    ] or [(r, t, p) for r, t, p in lines if refs.count(r) == 1]
    if not eligible:
        raise TaskError("the KJV text has no usable verse for this length")
    ref, text, _ = min(eligible, key=lambda v: (abs(v[2] / max(used, 1) - depth), v[2]))
    return {
        "context": "\n".join(f"{r} {t}" for r, t, _ in lines),
        "input": f"What is the text of verse {ref} in the document? Quote it exactly.",
        "answers": [text],
        "reference_verse": ref,
    }


def _chapter_item(rng, source, tokenizer, target, depth) -> dict[str, Any]:
    stub = 'In which chapter of the document does this sentence appear: "' + "word " * 40 + '"? Answer with the chapter number.'
    budget = _context_budget(tokenizer, target, stub)
    k = max(2, min(8, budget // 1000 + 1))
    books = source.chaptered()
    options = []
    for name, chapters in books.items():
        nums = [n for n, _ in chapters]
        for s in range(len(chapters) - k + 1):
            if all(nums[s + j] == nums[s] + j for j in range(k)):
                options.append((name, s))
    if not options:
        raise TaskError(f"no text has {k} consecutive chapters (give an Austen novel or Moby Dick)")
    name, s = rng.choice(options)
    per = budget // k - 6
    parts, bodies = [], []
    offset = 0
    for number, body in books[name][s : s + k]:
        excerpt = _cut_tokens(tokenizer, body, per)
        ends = _sentence_ends(excerpt + " ")
        if ends and ends[-1] > len(excerpt) // 2:
            excerpt = excerpt[: ends[-1]].rstrip()
        heading = f"Chapter {number}\n\n"
        bodies.append((number, offset + len(heading), excerpt))
        parts.append(heading + excerpt)
        offset += len(parts[-1]) + 2
    context = "\n\n".join(parts)
    target_pos = _char_at_depth(tokenizer, context, depth)
    candidates = []
    for number, base, excerpt in bodies:
        bounds = [0] + _sentence_ends(excerpt) + [len(excerpt)]
        for a, b in zip(bounds, bounds[1:]):
            sentence = " ".join(excerpt[a:b].split())
            raw = excerpt[a:b].strip()
            starts_well = sentence[:1].isupper() or sentence[:1] in "\"'"
            if starts_well and 8 <= len(sentence.split()) <= 40 and context.count(raw) == 1 and '"' not in sentence[1:-1]:
                candidates.append((abs(base + a - target_pos), base + a, number, sentence))
    if not candidates:
        raise TaskError("no quotable sentence in the chosen chapters")
    _, _, number, sentence = min(candidates)
    return {
        "context": context,
        "input": f'In which chapter of the document does this sentence appear: "{sentence}"? Answer with the chapter number.',
        "answers": [str(number)],
        "source_text": name,
        "chapters": [n for n, _, _ in bodies],
        "sentence": sentence,
    }


def make_item(
    task: str,
    length: int,
    index: int,
    seed: int,
    source: TextSource,
    tokenizer: Any,
    depth: float | None = None,
    max_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """Item ``index`` of ``task`` at ``length`` prompt tokens (deterministic for ``seed``).

    max_prompt_tokens: cap on the prompt size (the model's context minus the
    generation length); ``length`` stays the item's label.
    """
    if task not in TASK_NAMES:
        raise TaskError(f"unknown task {task!r}; known: {', '.join(TASK_NAMES)}")
    if depth is None:
        depth = DEFAULT_DEPTHS[index % len(DEFAULT_DEPTHS)]
    if not 0.0 <= depth <= 1.0:
        raise TaskError(f"depth must be in [0, 1], got {depth}")
    target = min(length, max_prompt_tokens) if max_prompt_tokens else length
    rng = _rng(seed, task, length, index)
    if task in ("needle", "multi_needle", "passkey"):
        keys = MULTI_NEEDLES if task == "multi_needle" else 1
        body = _needle_item(rng, source, tokenizer, target, depth, keys, passkey=task == "passkey")
    elif task == "kjv_verse":
        body = _kjv_item(rng, source, tokenizer, target, depth)
    else:
        body = _chapter_item(rng, source, tokenizer, target, depth)
    return {
        "_id": f"{task}-{length}-{index:03d}-s{seed}",
        "dataset": task,
        "length": length,
        "depth": depth,
        **body,
    }


def make_items(
    tasks: Sequence[str],
    lengths: Sequence[int],
    n: int,
    seed: int,
    source: TextSource,
    tokenizer: Any,
    depths: Sequence[float] | None = None,
    max_prompt_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """``n`` items per task and length, task-major. Depth of item i: ``depths[i %
    len(depths)]`` (default :data:`DEFAULT_DEPTHS`)."""
    depths = tuple(depths) if depths else DEFAULT_DEPTHS
    return [
        make_item(task, length, i, seed, source, tokenizer, depths[i % len(depths)], max_prompt_tokens)
        for task in tasks
        for length in lengths
        for i in range(n)
    ]
