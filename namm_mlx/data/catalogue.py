"""The texts ``namm eval`` builds tasks from: what exists, where it is cached, how to read it.

The books (and LongBench's files) are fetched by :mod:`namm_mlx.data.fetch`;
this module only names them and reads the cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import NammError
from ..files import atomic_write
from ..paths import cache_dir

ROUTES = ("auto", "hub", "debian")
LONGBENCH_REPO = "THUDM/LongBench"
#: Base URL of Project Gutenberg's plain-text files (``NAMM_GUTENBERG_URL`` overrides it, e.g. for a mirror).
GUTENBERG_URL = "https://www.gutenberg.org"


class DataError(NammError, RuntimeError):
    """A text could not be fetched, decoded or found; the message is one line."""


@dataclass(frozen=True)
class Source:
    """One group of texts: its Debian package and, per text, its Gutenberg ebook number."""

    name: str
    package: str | None
    texts: tuple[str, ...]
    description: str
    gutenberg: tuple[int, ...] = ()


#: text name -> path relative to :func:`text_cache_dir`
TEXTS: dict[str, str] = {
    "emma": "austen/emma.txt",
    "mansfield_park": "austen/mansfield_park.txt",
    "northanger_abbey": "austen/northanger_abbey.txt",
    "persuasion": "austen/persuasion.txt",
    "pride_and_prejudice": "austen/pride_and_prejudice.txt",
    "sense_and_sensibility": "austen/sense_and_sensibility.txt",
    "mobydick": "mobydick.txt",
    "kjv": "kjv.tsv",
}

# R object name (janeaustenr) -> text name
_AUSTEN_OBJECTS = {
    "emma": "emma",
    "mansfieldpark": "mansfield_park",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
    "prideprejudice": "pride_and_prejudice",
    "sensesensibility": "sense_and_sensibility",
}

SOURCES: dict[str, Source] = {
    "austen": Source(
        "austen", "r-cran-janeaustenr", tuple(_AUSTEN_OBJECTS.values()), "Jane Austen's six novels",
        gutenberg=(158, 141, 121, 105, 1342, 161),
    ),
    "mobydick": Source("mobydick", "r-cran-tokenizers", ("mobydick",), "Moby Dick", gutenberg=(2701,)),
    "kjv": Source("kjv", "bible-kjv-text", ("kjv",), "King James Bible, one verse a line", gutenberg=(10,)),
    "longbench": Source("longbench", None, (), "LongBench JSONL files (for namm eval --data)"),
}
#: What ``fetch_texts()`` fetches when no name is given (LongBench is ~114 MB: asked for by name).
DEFAULT_SOURCES = ("austen", "mobydick", "kjv")

# aliases accepted by load_text / fetch_texts
_ALIASES = {
    **{r: t for r, t in _AUSTEN_OBJECTS.items()},
    "moby_dick": "mobydick",
    "bible": "kjv",
    "kjv_bible": "kjv",
}

#: Book abbreviations of ``bible-kjv`` references, in canonical order (Genesis ... Revelation).
KJV_BOOKS = (
    "Ge Exo Lev Num Deu Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est Job Psa Prv Eccl SSol Isa Jer "
    "Lam Eze Dan Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal Mat Mark Luke John Acts Rom 1Cor 2Cor "
    "Gal Eph Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev"
).split()


def text_cache_dir() -> Path:
    """``<cache>/texts``; the cache root is ``$NAMM_MLX_CACHE``, else ``$XDG_CACHE_HOME/namm-mlx``,
    else ``~/.cache/namm-mlx``."""
    return cache_dir() / "texts"


def _text_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    for suffix in (".txt", ".tsv"):
        key = key.removesuffix(suffix)
    key = key.removeprefix("austen/")
    key = _ALIASES.get(key, key)
    if key not in TEXTS:
        raise DataError(
            f"unknown text {name!r}; known texts: {', '.join(TEXTS)} (sources: {', '.join(SOURCES)})"
        )
    return key


def _source_of(text: str) -> Source:
    return next(s for s in SOURCES.values() if text in s.texts)


def available_texts() -> dict[str, Path]:
    """The texts already in the cache: name -> path (empty until :func:`fetch_texts` ran)."""
    root = text_cache_dir()
    return {name: root / rel for name, rel in TEXTS.items() if (root / rel).is_file()}


def longbench_files() -> dict[str, Path]:
    """LongBench JSONL files in the cache: dataset name -> path (``namm eval --data PATH``)."""
    folder = text_cache_dir() / "longbench"
    return {p.stem: p for p in sorted(folder.glob("*.jsonl"))} if folder.is_dir() else {}


def load_text(name: str) -> str:
    """The full text of ``name`` (see :data:`TEXTS`) from the cache.

    ``kjv`` is returned as its TSV (``Ref<TAB>verse`` lines; see :func:`parse_kjv`).
    Raises :class:`DataError` if the text has not been fetched yet.
    """
    key = _text_name(name)
    path = text_cache_dir() / TEXTS[key]
    if not path.is_file():
        source = _source_of(key).name
        raise DataError(
            f"text {key!r} is not in the cache ({path}); fetch it first with "
            f"`namm data fetch {source}` (or namm_mlx.data.fetch_texts([{source!r}]))"
        )
    return path.read_text(encoding="utf-8")


_KJV_REF = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+)$")


def parse_kjv_ref(ref: str) -> tuple[str, int, int]:
    """``"Ge1:1"`` -> ``("Ge", 1, 1)``; ``"1Sm3:4"`` -> ``("1Sm", 3, 4)``."""
    m = _KJV_REF.match(ref)
    if not m:
        raise DataError(f"not a KJV verse reference: {ref!r} (expected e.g. 'Ge1:1')")
    return m.group(1), int(m.group(2)), int(m.group(3))


def parse_kjv(tsv: str) -> list[tuple[str, str]]:
    """``Ref<TAB>verse`` lines -> ``[(ref, verse), ...]`` (blank lines skipped)."""
    verses = []
    for lineno, line in enumerate(tsv.splitlines(), 1):
        if not line.strip():
            continue
        ref, sep, verse = line.partition("\t")
        if not sep:
            raise DataError(f"KJV line {lineno} has no TAB: {line[:40]!r}")
        parse_kjv_ref(ref)
        verses.append((ref, verse))
    return verses


def record_manifest(root: Path, name: str, entry: dict) -> None:
    """Note in ``root/manifest.json`` where source ``name``'s texts came from."""
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    manifest[name] = entry
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
