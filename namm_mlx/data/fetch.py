"""Fetching the texts into the cache: the ``hub`` route (LongBench through
``huggingface_hub``, books over HTTPS from Project Gutenberg) and the choice
between it and the ``debian`` route (:mod:`namm_mlx.data.debian`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path

from ..files import atomic_write
from .catalogue import (
    DEFAULT_SOURCES,
    GUTENBERG_URL,
    LONGBENCH_REPO,
    ROUTES,
    SOURCES,
    TEXTS,
    KJV_BOOKS,
    DataError,
    Source,
    _source_of,
    _text_name,
    record_manifest,
    text_cache_dir,
)
from .debian import _from_debian, _join_lines, _strip_gutenberg

def fetch_texts(
    names: Iterable[str] | None = None,
    force: bool = False,
    deb_dir: str | os.PathLike | None = None,
    route: str = "auto",
) -> dict[str, Path]:
    """Fetch texts into :func:`text_cache_dir`; returns text (or LongBench dataset) name -> path.

    ``names``: sources (``austen``, ``mobydick``, ``kjv``, ``longbench``) or text names (a text
    brings its whole source); ``None`` means the books.  Sources already cached are skipped
    unless ``force``.  ``route``: ``hub`` (Hugging Face Hub + HTTPS), ``debian`` (Debian
    packages; ``deb_dir`` may hold pre-downloaded ``<package>_*.deb`` files) or ``auto``
    (``debian`` when ``deb_dir`` is given, else ``hub``, falling back to ``debian`` where
    ``apt-get`` exists and the network route fails).
    """
    if route not in ROUTES:
        raise DataError(f"unknown route {route!r}; use one of {', '.join(ROUTES)}")
    if isinstance(names, str):
        names = [names]
    wanted: list[Source] = []
    for name in DEFAULT_SOURCES if names is None else names:
        key = name.strip().lower()
        source = SOURCES.get(key) or _source_of(_text_name(key))
        if source not in wanted:
            wanted.append(source)

    root = text_cache_dir()
    result: dict[str, Path] = {}
    for source in wanted:
        if source.name == "longbench":
            if route == "debian":
                raise DataError("LongBench is only on the Hugging Face Hub; use --source hub")
            result.update(_fetch_longbench(root, force))
            continue
        paths = {t: root / TEXTS[t] for t in source.texts}
        if force or not all(p.is_file() for p in paths.values()):
            texts = _fetch_books(source, route, deb_dir)
            for text_name, content in texts.items():
                paths[text_name].parent.mkdir(parents=True, exist_ok=True)
                atomic_write(paths[text_name], content)
        result.update(paths)
    return result


def _fetch_books(source: Source, route: str, deb_dir) -> dict[str, str]:
    if route == "debian" or (route == "auto" and deb_dir is not None):
        return _from_debian(source, deb_dir)
    try:
        return _from_gutenberg(source)
    except DataError as err:
        if route == "hub" or shutil.which("apt-get") is None:
            raise
        print(f"note: {err}; trying the Debian package {source.package} instead", file=sys.stderr)
        return _from_debian(source, deb_dir)


# --------------------------------------------------------------------------- hub route


def _fetch_longbench(root: Path, force: bool) -> dict[str, Path]:
    """LongBench's ``data.zip`` through huggingface_hub, its JSONL files extracted."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        archive = hf_hub_download(LONGBENCH_REPO, "data.zip", repo_type="dataset", library_name="namm-mlx")
    except LocalEntryNotFoundError:
        raise DataError(
            f"{LONGBENCH_REPO} data.zip is not in the Hugging Face cache and the Hub is unreachable "
            "(HF_HUB_OFFLINE?); connect once to download it"
        ) from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot download {LONGBENCH_REPO} data.zip: {err}") from None
    folder = root / "longbench"
    out: dict[str, Path] = {}
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = Path(info.filename).name  # never a path from the archive
                if info.is_dir() or not name.endswith(".jsonl") or name.startswith("."):
                    continue
                target = folder / name
                if force or not target.is_file() or target.stat().st_size != info.file_size:
                    folder.mkdir(parents=True, exist_ok=True)
                    atomic_write(target, zf.read(info))
                out[f"longbench/{target.stem}"] = target
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive} is not a readable zip ({err}); delete it from the Hugging Face cache") from None
    if not out:
        raise DataError(f"{LONGBENCH_REPO} data.zip holds no .jsonl files")
    record_manifest(root, "longbench", {"repo": LONGBENCH_REPO, "archive": str(archive), "files": len(out)})
    return out


def _download(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "namm-mlx"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(f"cannot download {url}: {reason}") from None


def _from_gutenberg(source: Source) -> dict[str, str]:
    """The source's books as plain text from Project Gutenberg (HTTPS)."""
    base = os.environ.get("NAMM_GUTENBERG_URL", GUTENBERG_URL).rstrip("/")
    texts: dict[str, str] = {}
    for text, number in zip(source.texts, source.gutenberg):
        url = f"{base}/cache/epub/{number}/pg{number}.txt"
        raw = _download(url).decode("utf-8", "replace").lstrip("\ufeff")
        book = _strip_gutenberg(raw.replace("\r\n", "\n").replace("\r", "\n"))
        texts[text] = _kjv_from_gutenberg(book) if text == "kjv" else _join_lines(book.split("\n"))
    record_manifest(text_cache_dir(), source.name, {"route": "gutenberg", "ebooks": list(source.gutenberg)})
    return texts


_GUTENBERG_VERSE = re.compile(r"^(\d+):(\d+)\s+(.*)$")


def _kjv_from_gutenberg(book: str) -> str:
    """Gutenberg's KJV (``C:V text`` verses, wrapped, separated by blank lines, under book
    titles) as ``Ref<TAB>verse`` lines with ``bible-kjv``'s references; a book starts
    wherever verse 1:1 does, so the titles' wording does not matter."""
    verses: list[list[str]] = []
    book_index, current = -1, None
    for line in book.split("\n"):
        m = _GUTENBERG_VERSE.match(line.strip())
        if m:
            chapter, verse = int(m.group(1)), int(m.group(2))
            if chapter == 1 and verse == 1:
                book_index += 1
            if book_index < 0 or book_index >= len(KJV_BOOKS):
                raise DataError("the Gutenberg KJV does not have the expected 66 books")
            current = [f"{KJV_BOOKS[book_index]}{chapter}:{verse}", m.group(3).strip()]
            verses.append(current)
        elif current is not None and line.strip():
            current[1] = f"{current[1]} {line.strip()}".strip()  # a wrapped verse goes on
        else:
            current = None  # a blank line ends the verse; book titles follow one
    if book_index != len(KJV_BOOKS) - 1:
        raise DataError(f"the Gutenberg KJV has {book_index + 1} books, expected {len(KJV_BOOKS)}")
    return "".join(f"{ref}\t{text}\n" for ref, text in verses)
