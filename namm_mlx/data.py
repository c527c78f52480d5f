"""Long texts for evaluation: public-domain books and LongBench, on any OS.

Two routes fill the same cache (:func:`text_cache_dir`):

* ``hub`` (the default, works on macOS and Linux): LongBench's JSONL files from
  the ``THUDM/LongBench`` dataset repo through ``huggingface_hub`` (its cache,
  tokens and ``HF_HUB_OFFLINE`` apply), and the books over plain HTTPS from
  Project Gutenberg.
* ``debian`` (offline fallback on Debian-like systems, or with pre-downloaded
  ``.deb`` files anywhere): the same books from the Debian packages
  ``r-cran-janeaustenr``, ``r-cran-tokenizers`` and ``bible-kjv-text``, read
  with ``rdata`` (R lazy-load databases) and ``unlzw3`` (the Unix ``compress``
  windows of ``bible.data``), the ``[debian]`` extra. Nothing is installed:
  ``apt-get download`` fetches the ``.deb`` and ``dpkg-deb -x`` (or a small
  ``ar``/``tar`` reader) unpacks it.

========== ===================================== ===========================================
source     what is extracted                     from
========== ===================================== ===========================================
austen     ``austen/<novel>.txt``, six novels    Gutenberg 1342 158 161 141 121 105 / Debian
mobydick   ``mobydick.txt``                      Gutenberg 2701 / Debian
kjv        ``kjv.tsv``: ``Ref<TAB>verse`` lines  Gutenberg 10 / Debian ``bible.data``
           with references like ``Ge1:1``
longbench  ``longbench/<dataset>.jsonl``         ``THUDM/LongBench`` ``data.zip`` (hub only)
========== ===================================== ===========================================
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from namm_mlx.models import cache_dir

__all__ = [
    "ROUTES",
    "SOURCES",
    "TEXTS",
    "DataError",
    "available_texts",
    "decode_bible_data",
    "fetch_texts",
    "load_text",
    "longbench_files",
    "parse_kjv",
    "parse_kjv_ref",
    "text_cache_dir",
]

ROUTES = ("auto", "hub", "debian")
LONGBENCH_REPO = "THUDM/LongBench"
#: Base URL of Project Gutenberg's plain-text files (``NAMM_GUTENBERG_URL`` overrides it, e.g. for a mirror).
GUTENBERG_URL = "https://www.gutenberg.org"


class DataError(RuntimeError):
    """A text could not be fetched, decoded or found; the message is one line."""


# --------------------------------------------------------------------------- catalogue


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


# --------------------------------------------------------------------------- fetching


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
                _atomic_write(paths[text_name], content)
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


def _atomic_write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def _record_manifest(root: Path, name: str, entry: dict) -> None:
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    manifest[name] = entry
    _atomic_write(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


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
                    _atomic_write(target, zf.read(info))
                out[f"longbench/{target.stem}"] = target
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive} is not a readable zip ({err}); delete it from the Hugging Face cache") from None
    if not out:
        raise DataError(f"{LONGBENCH_REPO} data.zip holds no .jsonl files")
    _record_manifest(root, "longbench", {"repo": LONGBENCH_REPO, "archive": str(archive), "files": len(out)})
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
    _record_manifest(text_cache_dir(), source.name, {"route": "gutenberg", "ebooks": list(source.gutenberg)})
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


# --------------------------------------------------------------------------- Debian route


def _from_debian(source: Source, deb_dir) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix=f"namm-{source.name}-") as tmp:
        tmp_path = Path(tmp)
        deb = _find_or_download_deb(source.package, tmp_path, deb_dir)
        unpacked = tmp_path / "root"
        _extract_deb(deb, unpacked)
        texts = _EXTRACTORS[source.name](unpacked)
    parts = deb.name[: -len(".deb")].split("_")
    version = parts[1].replace("%3a", ":") if len(parts) >= 2 else "unknown"
    _record_manifest(text_cache_dir(), source.name, {
        "route": "debian", "package": source.package, "version": version, "deb": deb.name,
        "texts": {t: TEXTS[t] for t in source.texts},
    })
    return texts


def _find_or_download_deb(package: str, workdir: Path, deb_dir) -> Path:
    if deb_dir is not None:
        found = sorted(Path(deb_dir).expanduser().glob(f"{package}_*.deb"))
        if found:
            return found[-1]
    if shutil.which("apt-get") is None:
        where = f" and no {package}_*.deb in {deb_dir}" if deb_dir is not None else ""
        raise DataError(
            f"apt-get not found{where}: download {package}_*.deb from packages.debian.org "
            "and pass its folder as deb_dir"
        )
    cmd = ["apt-get", "download", "-q"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # as root apt drops privileges to _apt, which cannot write into our private temp dir
        cmd += ["-o", "APT::Sandbox::User=root"]
    proc = subprocess.run(cmd + [package], cwd=workdir, capture_output=True, text=True, check=False)
    found = sorted(workdir.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not found:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("E:")] or lines
        detail = errors[-1] if errors else f"exit status {proc.returncode}"
        hint = ""
        if re.search(
            r"Unable to locate|installation candidate|Can.t select|has no|Failed to fetch|404",
            detail,
        ):
            hint = "; the package lists may be missing: run `apt-get update` (as root) first"
        raise DataError(f"`apt-get download {package}` failed: {detail}{hint}")
    return found[-1]


def _extract_deb(deb: Path, dest: Path) -> None:
    """Unpack a .deb's files (never installs): ``dpkg-deb -x``, else a pure-Python reader."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("dpkg-deb"):
        proc = subprocess.run(
            ["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise DataError(f"dpkg-deb -x {deb.name} failed: {detail}")
        return
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise DataError(f"{deb.name} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if not member.startswith("data.tar"):
            continue
        if member.endswith(".zst"):
            raise DataError(
                f"{deb.name} uses zstd compression: install dpkg-deb (dpkg) to unpack it"
            )
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            data_filter = getattr(tarfile, "data_filter", None)
            if data_filter is not None:
                tar.extractall(dest, filter=data_filter)
            else:  # Python without extraction filters: refuse unsafe names ourselves
                for info in tar.getmembers():
                    name = info.name
                    if name.startswith("/") or ".." in Path(name).parts:
                        raise DataError(f"{deb.name}: unsafe path in archive: {name!r}")
                    if info.isfile() or info.isdir():
                        tar.extract(info, dest)
        return
    raise DataError(f"{deb.name} has no data.tar member")


def _r_library(root: Path, package: str) -> Path:
    for base in ("usr/lib/R/site-library", "usr/lib/R/library", "usr/local/lib/R/site-library"):
        cand = root / base / package / "data" / "Rdata.rdx"
        if cand.is_file():
            return cand
    found = sorted(root.rglob(f"{package}/data/Rdata.rdx"))
    if not found:
        raise DataError(f"no {package}/data/Rdata.rdx in the unpacked package")
    return found[0]


def _join_lines(lines: list[str]) -> str:
    text = "\n".join(line.rstrip() for line in lines)
    return text.strip("\n") + "\n"


def _lazyload_objects(rdx: Path) -> dict:
    """Every object of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` blobs):
    each blob is 4 length bytes then a zlib stream of an R serialization."""
    try:
        import rdata
    except ImportError:
        raise DataError("reading R data needs rdata: pip install 'namm-mlx[debian]'") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that an .rdx is "RDS with a wrong extension"
        try:
            index = rdata.conversion.convert(rdata.parser.parse_file(rdx))
            blobs = rdx.with_suffix(".rdb").read_bytes()
            out = {}
            for name, (offset, length) in index["variables"].items():
                raw = zlib.decompress(blobs[int(offset) + 4 : int(offset) + int(length)])
                out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
        except (OSError, ValueError, KeyError, TypeError, zlib.error) as err:
            raise DataError(f"cannot read the R lazy-load database {rdx}: {err}") from None
    return out


def _r_lines(obj) -> list[str]:
    """A character vector (NA -> "") or a data frame's ``text`` column, as lines."""
    if hasattr(obj, "columns") and "text" in obj.columns:
        obj = obj["text"]
    return [v if isinstance(v, str) else "" for v in list(obj)]


def _join_lines(lines: list[str]) -> str:
    text = "\n".join(line.rstrip() for line in lines)
    return text.strip("\n") + "\n"


def _extract_austen(root: Path) -> dict[str, str]:
    objects = _lazyload_objects(_r_library(root, "janeaustenr"))
    missing = [r for r in _AUSTEN_OBJECTS if r not in objects]
    if missing:
        raise DataError(f"janeaustenr data lacks {', '.join(missing)} (has {', '.join(objects)})")
    return {text: _join_lines(_r_lines(objects[r])) for r, text in _AUSTEN_OBJECTS.items()}


def _extract_mobydick(root: Path) -> dict[str, str]:
    objects = _lazyload_objects(_r_library(root, "tokenizers"))
    if "mobydick" not in objects:
        raise DataError(f"tokenizers data lacks mobydick (has {', '.join(objects)})")
    # one string holding the whole Project Gutenberg file (CRLF, BOM, PG header and license)
    text = "\n".join(_r_lines(objects["mobydick"])).replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    return {"mobydick": _join_lines(_strip_gutenberg(text).split("\n"))}


def _strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's ``*** START OF`` and ``*** END OF`` markers, less
    the "Produced by" credit and the "End of Project Gutenberg's ..." line."""
    start = re.search(
        r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", text, re.MULTILINE | re.IGNORECASE
    )
    end = re.search(
        r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$", text, re.MULTILINE | re.IGNORECASE
    )
    if start and end and start.end() < end.start():
        text = text[start.end() : end.start()]
    lines = text.split("\n")
    head = [i for i, ln in enumerate(lines[:20]) if ln.startswith("Produced by")]
    if head:
        del lines[head[0]]
    tail = [
        i
        for i, ln in enumerate(lines)
        if re.match(r"End of (the )?Project Gutenberg", ln, re.IGNORECASE)
    ]
    if tail and tail[-1] > len(lines) - 20:
        del lines[tail[-1]]
    return "\n".join(lines)


def _extract_kjv(root: Path) -> dict[str, str]:
    found = sorted(root.rglob("bible.data"))
    if not found:
        raise DataError("no bible.data in the unpacked bible-kjv-text package")
    plain = decode_bible_data(found[0].read_bytes())
    out = []
    for line in plain.splitlines():
        ref, _, verse = line.partition(" ")
        if not _KJV_REF.match(ref):
            continue  # the title line "Holy Bible, Authorized (King James) Version. ..."
        out.append(f"{ref}\t{verse.strip()}")
    if len(out) != 31102:
        raise DataError(f"decoded {len(out)} KJV verses, expected 31102")
    return {"kjv": "\n".join(out) + "\n"}


_EXTRACTORS: dict[str, Callable[[Path], dict[str, str]]] = {
    "austen": _extract_austen,
    "mobydick": _extract_mobydick,
    "kjv": _extract_kjv,
}


def decode_bible_data(data: bytes) -> str:
    """The plain text of a Bible Retrieval System ``bible.data`` file (format ``EC02``): an
    84-byte header, the window size and count, a table of window offsets, then each 64 KiB
    window of the text compressed on its own with Unix ``compress`` (decoded by unlzw3)."""
    try:
        import unlzw3
    except ImportError:
        raise DataError("decoding bible.data needs unlzw3: pip install 'namm-mlx[debian]'") from None
    if len(data) < 92 or data[:4] != b"EC02":
        raise DataError("not a bible.data file (expected magic 'EC02')")
    wsize, wnum = struct.unpack_from(">II", data, 84)
    if not 0 < wnum < 1 << 16 or not 0 < wsize <= 1 << 24:
        raise DataError(f"implausible bible.data header: {wnum} windows of {wsize} bytes")
    table = struct.unpack_from(f">{wnum + 1}I", data, 92)
    first = table[0]
    header = data[first - 3 : first] if data[first - 3 : first - 1] == b"\x1f\x9d" else b"\x1f\x9d\x90"
    parts = []
    for i in range(wnum):
        start, stop = table[i], table[i + 1]
        if not 0 <= start <= stop <= len(data):
            raise DataError(f"bible.data window {i} lies outside the file")
        try:
            window = unlzw3.unlzw(header + data[start:stop])
        except (ValueError, IndexError) as err:
            raise DataError(f"bible.data window {i} is corrupt ({err})") from None
        if i < wnum - 1 and len(window) != wsize:
            raise DataError(f"bible.data window {i} decoded to {len(window)} bytes, not {wsize}")
        parts.append(window)
    return b"".join(parts).decode("latin-1")
