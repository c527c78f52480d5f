"""Public-domain long texts for evaluation, extracted offline from Debian packages.

Three sources, all public-domain texts shipped inside ordinary Debian packages:

========== ======================= ==========================================================
source     package                 what is extracted (under ``text_cache_dir()``)
========== ======================= ==========================================================
austen     ``r-cran-janeaustenr``  ``austen/<novel>.txt``: Jane Austen's six novels, one line
                                   of the R data per line (blank lines and "CHAPTER I" /
                                   "Chapter 1" headings kept as in the R data)
mobydick   ``r-cran-tokenizers``   ``mobydick.txt``: Melville's *Moby Dick*
kjv        ``bible-kjv-text``      ``kjv.tsv``: the King James Bible, one verse a line,
                                   ``Ref<TAB>text`` with references like ``Ge1:1``
========== ======================= ==========================================================

Nothing is installed: ``apt-get download`` fetches the ``.deb`` into a temporary folder
(it needs the package lists, i.e. a prior ``apt-get update``, but neither root nor R), and
``dpkg-deb -x`` unpacks it (a pure-Python ``ar``/``tar`` reader is used where ``dpkg-deb`` is
missing).  Pre-downloaded ``.deb`` files can be given with ``deb_dir=`` instead, e.g. on macOS.

* The two R packages keep their data in an R lazy-load database (``data/Rdata.rdx`` +
  ``Rdata.rdb``).  The ``.rdx`` is an RDS file (gzip'd, or bzip2/xz, serialized R object) holding
  ``list(variables=list(name=c(offset, length), ...), references=..., compressed=...)``; each
  object in the ``.rdb`` is 4 big-endian length bytes (+ 1 type byte for bzip2/xz databases)
  then a compressed serialized R object.  A small pure-Python reader for R's XDR serialization
  format (versions 2 and 3) lives here: :func:`unserialize`, :func:`read_rds`,
  :func:`read_lazyload_db`.
* ``bible-kjv-text`` ships ``usr/lib/bible.data``, the "Bible Retrieval System" text file
  (magic ``EC02``): an 84-byte header, the window size and count, a table of window offsets,
  then each 64 KiB window of the plain text compressed independently with Unix ``compress``
  (LZW, 16 bits, block mode).  The plain text is one verse a line (``Ge1:1 In the
  beginning...``) after a one-line title, so it is decoded in pure Python
  (:func:`decode_bible_data`) with no need for the ``bible`` program; the result is identical
  to ``bible -f 'gen1:1-rev22:21'``.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from namm_mlx.models import cache_dir

__all__ = [
    "SOURCES",
    "TEXTS",
    "DataError",
    "REnvironment",
    "RObject",
    "RPairlist",
    "RSymbol",
    "RVector",
    "available_texts",
    "decode_bible_data",
    "fetch_texts",
    "load_text",
    "parse_kjv",
    "parse_kjv_ref",
    "r_lines",
    "read_lazyload_db",
    "read_rds",
    "text_cache_dir",
    "unserialize",
]


class DataError(RuntimeError):
    """A text could not be fetched, decoded or found; the message is one line."""


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Source:
    """One Debian package and the texts extracted from it."""

    name: str
    package: str
    texts: tuple[str, ...]
    description: str


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
        "austen",
        "r-cran-janeaustenr",
        tuple(_AUSTEN_OBJECTS.values()),
        "Jane Austen's six novels",
    ),
    "mobydick": Source("mobydick", "r-cran-tokenizers", ("mobydick",), "Moby Dick"),
    "kjv": Source("kjv", "bible-kjv-text", ("kjv",), "King James Bible, one verse a line"),
}

# aliases accepted by load_text / fetch_texts
_ALIASES = {
    **{r: t for r, t in _AUSTEN_OBJECTS.items()},
    "moby_dick": "mobydick",
    "bible": "kjv",
    "kjv_bible": "kjv",
}


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
) -> dict[str, Path]:
    """Fetch and extract texts into :func:`text_cache_dir`; returns text name -> path.

    ``names``: sources (``austen``, ``mobydick``, ``kjv``) or text names (a text brings its
    whole source); ``None`` means all.  Sources whose texts are all cached are skipped unless
    ``force``.  ``deb_dir``: a folder holding pre-downloaded ``<package>_*.deb`` files, used
    instead of ``apt-get download`` when a matching file is there.
    """
    if isinstance(names, str):
        names = [names]
    wanted: list[Source] = []
    for name in SOURCES if names is None else names:
        key = name.strip().lower()
        source = SOURCES.get(key) or _source_of(_text_name(key))
        if source not in wanted:
            wanted.append(source)

    root = text_cache_dir()
    result: dict[str, Path] = {}
    for source in wanted:
        paths = {t: root / TEXTS[t] for t in source.texts}
        if force or not all(p.is_file() for p in paths.values()):
            with tempfile.TemporaryDirectory(prefix=f"namm-{source.name}-") as tmp:
                tmp_path = Path(tmp)
                deb = _find_or_download_deb(source.package, tmp_path, deb_dir)
                unpacked = tmp_path / "root"
                _extract_deb(deb, unpacked)
                texts = _EXTRACTORS[source.name](unpacked)
                for text_name, content in texts.items():
                    _atomic_write(paths[text_name], content)
                _record_manifest(root, source, deb)
        result.update(paths)
    return result


def _atomic_write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(content, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def _record_manifest(root: Path, source: Source, deb: Path) -> None:
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    parts = deb.name[: -len(".deb")].split("_")
    version = parts[1].replace("%3a", ":") if len(parts) >= 2 else "unknown"
    manifest[source.name] = {
        "package": source.package,
        "version": version,
        "deb": deb.name,
        "texts": {t: TEXTS[t] for t in source.texts},
    }
    _atomic_write(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


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


def _extract_austen(root: Path) -> dict[str, str]:
    objects = read_lazyload_db(_r_library(root, "janeaustenr"))
    missing = [r for r in _AUSTEN_OBJECTS if r not in objects]
    if missing:
        raise DataError(f"janeaustenr data lacks {', '.join(missing)} (has {', '.join(objects)})")
    return {text: _join_lines(r_lines(objects[r])) for r, text in _AUSTEN_OBJECTS.items()}


def _extract_mobydick(root: Path) -> dict[str, str]:
    objects = read_lazyload_db(_r_library(root, "tokenizers"))
    if "mobydick" not in objects:
        raise DataError(f"tokenizers data lacks mobydick (has {', '.join(objects)})")
    lines = r_lines(objects["mobydick"])
    # one string holding the whole Project Gutenberg file (CRLF, BOM, PG header and license)
    text = "\n".join(lines).replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
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


# --------------------------------------------------------------------------- bible.data


def _unlzw(data: bytes, maxbits: int = 16) -> bytes:
    """Decompress one Unix ``compress`` (LZW, block mode) stream without its 3-byte header.

    A faithful port of the classic decoder, including its quirk of discarding the rest of a
    ``n_bits``-byte group of input whenever the code width changes or the table is cleared.
    """
    out = bytearray()
    maxmaxcode = 1 << maxbits
    table: list[bytes] = [bytes([i]) for i in range(256)] + [b""]
    n_bits, maxcode, free_ent, clear_flg = 9, (1 << 9) - 1, 257, False
    pos, end = 0, len(data)
    group: list[int] = []
    gi = 0

    def next_code() -> int:
        nonlocal n_bits, maxcode, clear_flg, pos, group, gi
        if clear_flg or gi >= len(group) or free_ent > maxcode:
            if free_ent > maxcode:
                n_bits += 1
                maxcode = maxmaxcode if n_bits == maxbits else (1 << n_bits) - 1
            if clear_flg:
                n_bits, maxcode, clear_flg = 9, (1 << 9) - 1, False
            size = min(n_bits, end - pos)
            if size <= 0:
                return -1
            value = int.from_bytes(data[pos : pos + size], "little")
            pos += size
            mask = (1 << n_bits) - 1
            group = [(value >> (i * n_bits)) & mask for i in range(8 * size // n_bits)]
            gi = 0
            if not group:
                return -1
        gi += 1
        return group[gi - 1]

    code = next_code()
    if code < 0:
        return b""
    if code > 255:
        raise DataError("corrupt LZW stream: first code is not a literal")
    prev = table[code]
    out += prev
    while True:
        code = next_code()
        if code < 0:
            break
        if code == 256:
            del table[257:]
            clear_flg, free_ent = True, 256
            code = next_code()
            if code < 0:
                break
        if code < len(table) and code < free_ent:
            entry = table[code]
        elif code == free_ent:
            entry = prev + prev[:1]
        else:
            raise DataError(f"corrupt LZW stream: code {code} beyond table size {free_ent}")
        out += entry
        if free_ent < maxmaxcode:
            new = prev + entry[:1]
            if free_ent < len(table):
                table[free_ent] = new
            else:
                table.append(new)
            free_ent += 1
        prev = entry
    return bytes(out)


def decode_bible_data(data: bytes) -> str:
    """The plain text of a Bible Retrieval System ``bible.data`` file (format ``EC02``)."""
    if len(data) < 92 or data[:4] != b"EC02":
        raise DataError("not a bible.data file (expected magic 'EC02')")
    wsize, wnum = struct.unpack_from(">II", data, 84)
    if not 0 < wnum < 1 << 16 or not 0 < wsize <= 1 << 24:
        raise DataError(f"implausible bible.data header: {wnum} windows of {wsize} bytes")
    table = struct.unpack_from(f">{wnum + 1}I", data, 92)
    first = table[0]
    maxbits = 16
    if data[first - 3 : first - 1] == b"\x1f\x9d":  # compress header before window 0
        maxbits = data[first - 1] & 0x1F
    parts = []
    for i in range(wnum):
        start, stop = table[i], table[i + 1]
        if not 0 <= start <= stop <= len(data):
            raise DataError(f"bible.data window {i} lies outside the file")
        window = _unlzw(data[start:stop], maxbits)
        if i < wnum - 1 and len(window) != wsize:
            raise DataError(f"bible.data window {i} decoded to {len(window)} bytes, not {wsize}")
        parts.append(window)
    return b"".join(parts).decode("latin-1")


# --------------------------------------------------------------------------- R serialization


class RObject:
    """Base of decoded R values that are not plain Python values; ``attributes`` is a dict."""

    rtype = "object"
    attributes: dict

    def attr(self, name: str, default=None):
        return self.attributes.get(name, default)


class RVector(list, RObject):
    """An R atomic vector or list: a Python list plus ``rtype`` and ``attributes``.

    ``rtype`` is R's ``typeof``: character, integer, logical, double, complex, raw, list,
    expression.  NA is ``None`` (for doubles, ``NA_real_`` is ``None`` and NaN stays NaN).
    """

    def __init__(self, items=(), rtype: str = "list", attributes: dict | None = None):
        super().__init__(items)
        self.rtype = rtype
        self.attributes = attributes or {}

    @property
    def names(self) -> list | None:
        return self.attributes.get("names")

    def as_dict(self) -> dict:
        """``{name: item}`` using the ``names`` attribute."""
        names = self.names
        if names is None or len(names) != len(self):
            raise DataError(f"R {self.rtype} vector has no names")
        return dict(zip(names, self))

    def __repr__(self) -> str:
        return f"RVector({self.rtype}, {list.__repr__(self)[:200]}, attributes={list(self.attributes)})"


class RPairlist(list, RObject):
    """An R pairlist (or call, closure, ...): a list of ``(tag or None, value)``."""

    def __init__(self, items=(), rtype: str = "pairlist", attributes: dict | None = None):
        super().__init__(items)
        self.rtype = rtype
        self.attributes = attributes or {}

    def as_dict(self) -> dict:
        return {tag: value for tag, value in self if tag is not None}


class RSymbol(str):
    """An R symbol (name)."""


class REnvironment(RObject):
    """An R environment; ``kind`` is global, base, empty, namespace, package or env."""

    rtype = "environment"

    def __init__(self, kind: str = "env", info=None):
        self.kind = kind
        self.info = info
        self.frame = None
        self.hashtab = None
        self.enclos = None
        self.attributes = {}

    def __repr__(self) -> str:
        return f"REnvironment({self.kind})"


class RS4(RObject):
    rtype = "S4"

    def __init__(self, attributes: dict | None = None):
        self.attributes = attributes or {}


class RPersistent(RObject):
    """A persistent reference (e.g. a namespace in a lazy-load DB) left unresolved."""

    rtype = "persistent"

    def __init__(self, names):
        self.names = names
        self.attributes = {}


class RBuiltin(RObject):
    def __init__(self, rtype: str, name: str):
        self.rtype = rtype
        self.name = name
        self.attributes = {}


class RExternal(RObject):
    """External pointer or weak reference; only its attributes are kept."""

    def __init__(self, rtype: str):
        self.rtype = rtype
        self.attributes = {}


# SEXP type codes (Rinternals.h) and serialization pseudo-types (serialize.c)
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_SPECIALSXP, _BUILTINSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP = 7, 8, 9, 10, 13, 14, 15
_STRSXP, _DOTSXP, _VECSXP, _EXPRSXP, _BCODESXP, _EXTPTRSXP, _WEAKREFSXP = 16, 17, 19, 20, 21, 22, 23
_RAWSXP, _S4SXP = 24, 25
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP, _MISSINGARG_SXP = 255, 254, 253, 252, 251
_BASENAMESPACE_SXP, _NAMESPACESXP, _PACKAGESXP, _PERSISTSXP = 250, 249, 248, 247
_EMPTYENV_SXP, _BASEENV_SXP, _ATTRLANGSXP, _ATTRLISTSXP, _ALTREP_SXP = 242, 241, 240, 239, 238

_PAIRLIST_TYPES = {
    _LISTSXP: "pairlist",
    _LANGSXP: "language",
    _CLOSXP: "closure",
    _PROMSXP: "promise",
    _DOTSXP: "...",
}
_VECTOR_NAMES = {
    _LGLSXP: "logical",
    _INTSXP: "integer",
    _REALSXP: "double",
    _CPLXSXP: "complex",
    _STRSXP: "character",
    _VECSXP: "list",
    _EXPRSXP: "expression",
    _RAWSXP: "raw",
}
_NA_INTEGER = -(2**31)
_NA_REAL_BITS = 0x7FF00000000007A2  # R's NA_real_: a NaN with low word 1954
_UTF8_MASK, _LATIN1_MASK, _BYTES_MASK, _ASCII_MASK = 1 << 3, 1 << 2, 1 << 1, 1 << 6


class _Reader:
    def __init__(self, data: bytes, endian: str):
        self.buf = memoryview(data)
        self.pos = 0
        self.e = endian
        self.refs: list = []
        self.native_encoding = "utf-8"

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise DataError(f"truncated R serialization at byte {self.pos} (needs {n} more)")

    def int(self) -> int:
        self._need(4)
        (v,) = struct.unpack_from(self.e + "i", self.buf, self.pos)
        self.pos += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        if n < 0:
            raise DataError(f"negative R vector length {n}")
        return n

    def bytes(self, n: int) -> bytes:
        self._need(n)
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def ints(self, n: int) -> list:
        self._need(4 * n)
        vals = struct.unpack_from(f"{self.e}{n}i", self.buf, self.pos)
        self.pos += 4 * n
        return [None if v == _NA_INTEGER else v for v in vals]

    def doubles(self, n: int) -> list:
        self._need(8 * n)
        raw = struct.unpack_from(f"{self.e}{n}Q", self.buf, self.pos)
        vals = struct.unpack_from(f"{self.e}{n}d", self.buf, self.pos)
        self.pos += 8 * n
        return [None if (r & 0x7FFFFFFFFFFFFFFF) == _NA_REAL_BITS else v for r, v in zip(raw, vals)]

    # -- items

    def charsxp(self, levels: int):
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.bytes(n)
        if levels & _LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & (_UTF8_MASK | _ASCII_MASK):
            return raw.decode("utf-8", "replace")
        try:
            return raw.decode(self.native_encoding)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("latin-1")

    def attributes(self) -> dict:
        plist = self.item()
        if plist is None:
            return {}
        if not isinstance(plist, RPairlist):
            raise DataError("R attributes are not a pairlist")
        return {str(tag): value for tag, value in plist}

    def string_vec(self) -> list:
        if self.int() != 0:
            raise DataError("bad persistent/namespace string vector")
        return [self.item() for _ in range(self.length())]

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))

        if t == _NILVALUE_SXP:
            return None
        if t == _REFSXP:
            idx = flags >> 8 or self.int()
            if not 0 < idx <= len(self.refs):
                raise DataError(f"bad R reference index {idx}")
            return self.refs[idx - 1]
        if t == _EMPTYENV_SXP:
            return REnvironment("empty")
        if t == _BASEENV_SXP:
            return REnvironment("base")
        if t == _GLOBALENV_SXP:
            return REnvironment("global")
        if t == _BASENAMESPACE_SXP:
            return REnvironment("namespace", ["base"])
        if t == _UNBOUNDVALUE_SXP:
            return RSymbol("<unbound>")
        if t == _MISSINGARG_SXP:
            return RSymbol("")
        if t == _PERSISTSXP:
            obj = RPersistent(self.string_vec())
            self.refs.append(obj)
            return obj
        if t in (_NAMESPACESXP, _PACKAGESXP):
            obj = REnvironment("namespace" if t == _NAMESPACESXP else "package", self.string_vec())
            self.refs.append(obj)
            return obj
        if t == _SYMSXP:
            sym = RSymbol(self.item() or "")
            self.refs.append(sym)
            return sym
        if t == _ENVSXP:
            env = REnvironment("env")
            self.refs.append(env)
            self.int()  # locked
            env.enclos = self.item()
            env.frame = self.item()
            env.hashtab = self.item()
            env.attributes = self.attributes()
            return env
        if t in _PAIRLIST_TYPES or t in (_ATTRLANGSXP, _ATTRLISTSXP):
            return self.pairlist(t, flags)
        if t == _CHARSXP:
            return self.charsxp(levels)
        if t in (_SPECIALSXP, _BUILTINSXP):
            n = self.int()
            return RBuiltin("special" if t == _SPECIALSXP else "builtin", self.bytes(n).decode())
        if t == _ALTREP_SXP:
            return self.altrep()
        if t in (_EXTPTRSXP, _WEAKREFSXP):
            obj = RExternal("externalptr" if t == _EXTPTRSXP else "weakref")
            self.refs.append(obj)
            if t == _EXTPTRSXP:
                self.item()  # prot
                self.item()  # tag
        elif t == _S4SXP:
            obj = RS4()
        elif t in _VECTOR_NAMES:
            obj = self.vector(t)
        elif t == _BCODESXP:
            raise DataError("R byte code is not supported by this reader")
        else:
            raise DataError(f"unsupported R SEXP type {t} at byte {self.pos - 4}")
        if has_attr:
            obj.attributes = self.attributes()
        return obj

    def vector(self, t: int) -> RVector:
        n = self.length()
        name = _VECTOR_NAMES[t]
        if t == _STRSXP:
            items = []
            for _ in range(n):
                flags = self.int()
                if flags & 0xFF != _CHARSXP:
                    raise DataError(f"character vector element of type {flags & 0xFF}")
                items.append(self.charsxp(flags >> 12))
        elif t in (_VECSXP, _EXPRSXP):
            items = [self.item() for _ in range(n)]
        elif t == _INTSXP:
            items = self.ints(n)
        elif t == _LGLSXP:
            items = [None if v is None else bool(v) for v in self.ints(n)]
        elif t == _REALSXP:
            items = self.doubles(n)
        elif t == _CPLXSXP:
            d = self.doubles(2 * n)
            items = [
                None if a is None or b is None else complex(a, b) for a, b in zip(d[::2], d[1::2])
            ]
        else:  # RAWSXP
            items = list(self.bytes(n))
        return RVector(items, name)

    def pairlist(self, t: int, flags: int) -> RPairlist:
        rtype = _PAIRLIST_TYPES.get(t, "language" if t == _ATTRLANGSXP else "pairlist")
        out = RPairlist(rtype=rtype)
        # iterate along CDRs instead of recursing, as R's own reader does
        while True:
            has_attr = bool(flags & (1 << 9)) or t in (_ATTRLANGSXP, _ATTRLISTSXP)
            has_tag = bool(flags & (1 << 10))
            attrs = self.attributes() if has_attr else {}
            if attrs and not out.attributes:
                out.attributes = attrs
            tag = self.item() if has_tag else None
            value = self.item()
            out.append((None if tag is None else str(tag), value))
            flags = self.int()
            t2 = flags & 0xFF
            if t2 == _NILVALUE_SXP:
                return out
            if t2 not in _PAIRLIST_TYPES and t2 not in (_ATTRLANGSXP, _ATTRLISTSXP):
                # improper list: CDR is some other object; keep it as an untagged element
                self.pos -= 4
                out.append((None, self.item()))
                return out
            t = t2

    def altrep(self):
        info = self.item()
        state = self.item()
        attrs = self.item()
        cls = str(info[0][1]) if isinstance(info, RPairlist) and info else "?"
        if cls == "compact_intseq":
            n, start, step = (int(v) for v in state)
            obj = RVector([start + i * step for i in range(n)], "integer")
        elif cls == "compact_realseq":
            n, start, step = state
            obj = RVector([start + i * step for i in range(int(n))], "double")
        elif cls.startswith("wrap_"):
            inner = state[0] if isinstance(state, RVector) else state[0][1]
            obj = RVector(list(inner), getattr(inner, "rtype", cls[5:]))
        elif cls == "deferred_string":
            arg = state[0][1] if isinstance(state, RPairlist) else state
            obj = RVector([None if v is None else _r_number_str(v) for v in arg], "character")
        else:
            raise DataError(f"unsupported R ALTREP class {cls!r}")
        if isinstance(attrs, RPairlist):
            obj.attributes = {str(tag): value for tag, value in attrs}
        return obj


def _r_number_str(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def unserialize(data: bytes):
    """Decode an uncompressed R serialization stream (``X\\n`` XDR or ``B\\n`` native binary,
    format versions 2 and 3) into Python values: ``None`` for NULL, :class:`RVector`,
    :class:`RPairlist`, :class:`RSymbol`, :class:`REnvironment`, ...
    """
    head = bytes(data[:2])
    if head == b"X\n":
        reader = _Reader(data, ">")
    elif head == b"B\n":
        reader = _Reader(data, "<")
    elif head == b"A\n":
        raise DataError("ASCII R serialization is not supported (only XDR and binary)")
    else:
        raise DataError(f"not an R serialization stream (starts with {head!r})")
    reader.pos = 2
    version = reader.int()
    reader.int()  # writer's R version
    reader.int()  # minimal reader R version
    if version == 3:
        n = reader.int()
        enc = reader.bytes(n).decode("ascii", "replace")
        try:
            "".encode(enc)
            reader.native_encoding = enc
        except LookupError:
            pass
    elif version != 2:
        raise DataError(f"unsupported R serialization version {version}")
    return reader.item()


def _decompress_any(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def read_rds(data: bytes | str | os.PathLike):
    """Read an RDS file (a path or its bytes; gzip/bzip2/xz/uncompressed)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = Path(data).read_bytes()
    try:
        raw = _decompress_any(bytes(data))
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise DataError(f"cannot decompress RDS data: {exc}") from None
    return unserialize(raw)


def _lazyload_blob(blob: bytes, compressed) -> bytes:
    """Decompress one ``.rdb`` entry as R's ``lazyLoadDBfetch`` does."""
    try:
        if not compressed:
            return blob
        if compressed is True or compressed == 1:
            return zlib.decompress(blob[4:])
        kind = blob[4:5]
        body = blob[5:]
        if kind == b"Z":
            return lzma.decompress(body)
        if kind == b"2":
            return bz2.decompress(body)
        if kind == b"1":
            return zlib.decompress(body)
        if kind == b"0":
            return body
        raise DataError(f"unknown lazy-load compression type {kind!r}")
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise DataError(f"cannot decompress lazy-load entry: {exc}") from None


def read_lazyload_db(rdx: str | os.PathLike, rdb: str | os.PathLike | None = None) -> dict:
    """All objects of an R lazy-load database (``<name>.rdx`` + ``<name>.rdb``): name -> value."""
    rdx = Path(rdx)
    rdb = Path(rdb) if rdb is not None else rdx.with_suffix(".rdb")
    index = read_rds(rdx.read_bytes())
    if not isinstance(index, RVector) or index.names is None:
        raise DataError(f"{rdx.name} is not a lazy-load index")
    fields = index.as_dict()
    variables = fields.get("variables")
    if not isinstance(variables, RVector):
        raise DataError(f"{rdx.name} has no 'variables' table")
    comp = fields.get("compressed")
    compressed = comp[0] if isinstance(comp, RVector) and comp else True
    blob_all = rdb.read_bytes()
    out = {}
    for name, where in variables.as_dict().items():
        offset, length = (int(v) for v in where[:2])
        if offset < 0 or offset + length > len(blob_all):
            raise DataError(f"{rdb.name}: entry {name!r} lies outside the file")
        out[name] = unserialize(_lazyload_blob(blob_all[offset : offset + length], compressed))
    return out


def r_lines(obj) -> list[str]:
    """The lines of a text held in R: a character vector (NA -> ""), or the ``text`` column of
    a data frame / tibble, or a length-1 list holding one of those."""
    if isinstance(obj, RVector):
        if obj.rtype == "character":
            return ["" if s is None else s for s in obj]
        if obj.rtype == "list":
            names = obj.names or []
            if "text" in names:
                return r_lines(obj[names.index("text")])
            if len(obj) == 1:
                return r_lines(obj[0])
    raise DataError(f"cannot read lines from an R {getattr(obj, 'rtype', type(obj).__name__)}")
