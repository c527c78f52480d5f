"""The ``debian`` route: the books from Debian packages, and their decoders.

``apt-get download`` fetches a ``.deb`` (or one is taken from ``deb_dir``),
``dpkg-deb -x`` or a small ``ar``/``tar`` reader unpacks it; Jane Austen's
novels and Moby Dick come out of R lazy-load databases (read with ``rdata``),
the King James Bible out of ``bible.data`` (windows of Unix ``compress``,
decoded with ``unlzw3``): the ``[debian]`` extra.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

from .catalogue import _AUSTEN_OBJECTS, _KJV_REF, TEXTS, DataError, Source, record_manifest, text_cache_dir

def _from_debian(source: Source, deb_dir) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix=f"namm-{source.name}-") as tmp:
        tmp_path = Path(tmp)
        deb = _find_or_download_deb(source.package, tmp_path, deb_dir)
        unpacked = tmp_path / "root"
        _extract_deb(deb, unpacked)
        texts = _EXTRACTORS[source.name](unpacked)
    parts = deb.name[: -len(".deb")].split("_")
    version = parts[1].replace("%3a", ":") if len(parts) >= 2 else "unknown"
    record_manifest(text_cache_dir(), source.name, {
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
