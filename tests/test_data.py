"""namm_mlx.data: both routes (Hugging Face Hub + HTTPS, Debian packages), the bible.data
decoder, the cache API and the offline excerpts in tests/data.  Nothing here needs apt or
the network: the hub route reads a real huggingface_hub cache laid out here with
HF_HUB_OFFLINE=1, Gutenberg is served from loopback, the Debian packages are built here;
the end-to-end Debian extraction runs only with NAMM_TEST_APT=1."""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import zipfile
import zlib
from pathlib import Path

import pytest

from namm_mlx import data
from namm_mlx.data import (
    DataError,
    decode_bible_data,
    fetch_texts,
    load_text,
    parse_kjv,
    parse_kjv_ref,
)

DATA = Path(__file__).resolve().parent / "data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# ----------------------------------- a tiny writer of R serializations (for a fake janeaustenr .deb)


def _i(*vals: int) -> bytes:
    return struct.pack(f">{len(vals)}i", *vals)


def _header(version: int = 3) -> bytes:
    out = b"X\n" + _i(version, 0x040201, 0x030500)
    if version == 3:
        out += _i(5) + b"UTF-8"
    return out


def _charsxp(s: str | None, levels: int = 64) -> bytes:
    if s is None:
        return _i(9, -1)
    raw = s.encode("utf-8")
    return _i(9 | (levels << 12), len(raw)) + raw


def _strsxp(items, attrs: bytes = b"") -> bytes:
    flags = 16 | (0x200 if attrs else 0)
    body = b"".join(_charsxp(s, 8 if s and not s.isascii() else 64) for s in items)
    return _i(flags, len(items)) + body + attrs


def _intsxp(items) -> bytes:
    return _i(13, len(items), *[-(2**31) if v is None else v for v in items])


def _attrs(pairs: list[tuple[str, bytes]], sym_refs: dict | None = None) -> bytes:
    """A pairlist of attributes; symbols already written are emitted as REFSXP."""
    out = b""
    for tag, value in pairs:
        if sym_refs is not None and tag in sym_refs:
            sym = _i((sym_refs[tag] << 8) | 255)
        else:
            sym = _i(1) + _charsxp(tag)
            if sym_refs is not None:
                sym_refs[tag] = len(sym_refs) + 1
        out += _i(0x402) + sym + value
    return out + _i(254)


def _vecsxp(items: list[bytes], attrs: bytes = b"") -> bytes:
    return _i(19 | (0x200 if attrs else 0), len(items)) + b"".join(items) + attrs


def _named_list(named: dict[str, bytes], refs: dict) -> bytes:
    return _vecsxp(list(named.values()), _attrs([("names", _strsxp(list(named)))], refs))


# --------------------------------------------------------------------------- bible.data


def _lzw_compress(text: bytes) -> bytes:
    """Minimal Unix-compress encoder for short inputs (codes stay 9 bits wide)."""
    table = {bytes([i]): i for i in range(256)}
    codes, w, nxt = [], b"", 257
    for byte in text:
        wc = w + bytes([byte])
        if wc in table:
            w = wc
        else:
            codes.append(table[w])
            table[wc] = nxt
            nxt += 1
            w = bytes([byte])
    if w:
        codes.append(table[w])
    assert nxt <= 511, "test input too long for 9-bit codes"
    value = sum(c << (9 * i) for i, c in enumerate(codes))
    return value.to_bytes((9 * len(codes) + 7) // 8, "little")


def _bible_data(plain: bytes, wsize: int) -> bytes:
    windows = [plain[i : i + wsize] for i in range(0, len(plain), wsize)]
    comp = [_lzw_compress(w) for w in windows]
    head = b"EC02" + b"Test data".ljust(80, b"\0") + struct.pack(">II", wsize, len(windows))
    start = len(head) + 4 * (len(windows) + 1) + 3
    table, pos = [], start
    for c in comp:
        table.append(pos)
        pos += len(c)
    table.append(pos)
    return head + struct.pack(f">{len(table)}I", *table) + b"\x1f\x9d\x90" + b"".join(comp)


def test_decode_bible_data_windows():
    plain = (
        b"Holy Bible, test.\nGe1:1 In the beginning God created the heaven and the earth.\n"
        b"Ge1:2 And the earth was without form, and void.\nRev22:21 The grace of our Lord be with you all. Amen.\n"
    )
    assert decode_bible_data(_bible_data(plain, 64)) == plain.decode()
    with pytest.raises(DataError, match="EC02"):
        decode_bible_data(b"nope" * 30)


# --------------------------------------------------------------------------- cache API


def test_text_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NAMM_MLX_CACHE", str(tmp_path))
    assert data.text_cache_dir() == tmp_path / "texts"
    assert data.available_texts() == {}


def test_load_text_missing_names_namm_data(monkeypatch, tmp_path):
    monkeypatch.setenv("NAMM_MLX_CACHE", str(tmp_path))
    with pytest.raises(DataError) as err:
        load_text("pride_and_prejudice")
    msg = str(err.value)
    assert "namm data" in msg and "austen" in msg and "\n" not in msg
    with pytest.raises(DataError, match="unknown text"):
        load_text("war_and_peace")


def test_load_text_reads_cache_and_aliases(monkeypatch, tmp_path):
    monkeypatch.setenv("NAMM_MLX_CACHE", str(tmp_path))
    path = tmp_path / "texts" / "austen" / "emma.txt"
    path.parent.mkdir(parents=True)
    path.write_text("EMMA\n", encoding="utf-8")
    assert load_text("emma") == "EMMA\n"
    assert load_text("austen/emma.txt") == "EMMA\n"
    assert data.available_texts() == {"emma": path}


def test_fetch_without_apt_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("NAMM_MLX_CACHE", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get not found"):
        fetch_texts(["mobydick"], route="debian")


def test_fetch_missing_package_lists_suggests_update(monkeypatch, tmp_path):
    monkeypatch.setenv("NAMM_MLX_CACHE", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)

    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(
            cmd, 100, "", "E: Unable to locate package r-cran-tokenizers\n"
        )

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(DataError, match="apt-get update") as err:
        fetch_texts(["mobydick"], route="debian")
    assert "\n" not in str(err.value)


def _fake_austen_deb(path: Path) -> None:
    """A .deb (ar + data.tar.xz) holding a janeaustenr lazy-load DB with six tiny novels."""
    blobs, where = [], {}
    for rname in data._AUSTEN_OBJECTS:
        raw = _header() + _strsxp([rname.upper(), "", "Chapter 1", "", f"Text of {rname}."])
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        where[rname] = (sum(map(len, blobs)), len(blob))
        blobs.append(blob)
    refs: dict = {}
    variables = _named_list({k: _intsxp(list(v)) for k, v in where.items()}, refs)
    index = _named_list({"variables": variables, "compressed": _i(10, 1, 1)}, refs)
    files = {
        "./usr/lib/R/site-library/janeaustenr/data/Rdata.rdx": gzip.compress(_header() + index),
        "./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb": b"".join(blobs),
    }
    tar_io = io.BytesIO()
    with tarfile.open(fileobj=tar_io, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    control = b"Package: r-cran-janeaustenr\nVersion: 1.0.0-1\nArchitecture: all\n"
    control += b"Maintainer: Test <t@example.org>\nDescription: test\n"
    ctl_io = io.BytesIO()
    with tarfile.open(fileobj=ctl_io, mode="w:xz") as tar:
        info = tarfile.TarInfo("./control")
        info.size = len(control)
        tar.addfile(info, io.BytesIO(control))
    members = [
        (b"debian-binary", b"2.0\n"),
        (b"control.tar.xz", ctl_io.getvalue()),
        (b"data.tar.xz", tar_io.getvalue()),
    ]
    out = b"!<arch>\n"
    for name, body in members:
        hdr = name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6)
        hdr += b"100644".ljust(8) + str(len(body)).encode().ljust(10) + b"`\n"
        out += hdr + body + (b"\n" if len(body) % 2 else b"")
    path.write_bytes(out)


@pytest.mark.parametrize("with_dpkg", [False, True])
def test_fetch_from_deb_dir(monkeypatch, tmp_path, with_dpkg):
    if with_dpkg and shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    monkeypatch.setenv("NAMM_MLX_CACHE", str(tmp_path / "cache"))
    debs = tmp_path / "debs"
    debs.mkdir()
    _fake_austen_deb(debs / "r-cran-janeaustenr_1.0.0-1_all.deb")
    if not with_dpkg:
        monkeypatch.setattr(shutil, "which", lambda name: None)
    paths = fetch_texts(["emma"], deb_dir=debs)
    assert set(paths) == set(data.SOURCES["austen"].texts)
    assert load_text("pride_and_prejudice") == (
        "PRIDEPREJUDICE\n\nChapter 1\n\nText of prideprejudice.\n"
    )
    manifest = (tmp_path / "cache" / "texts" / "manifest.json").read_text()
    assert '"version": "1.0.0-1"' in manifest


# --------------------------------------------------------------------------- hub route


def _namm() -> list[str]:
    script = Path(sys.executable).with_name("namm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def _longbench_cache(hf_home: Path) -> None:
    """THUDM/LongBench's data.zip as huggingface_hub caches a downloaded dataset repo."""
    repo = hf_home / "hub" / "datasets--THUDM--LongBench"
    rev = "5e628be" + "0" * 33
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    item = {"input": "What is the passkey?", "context": "The passkey is 7314. " * 50, "answers": ["7314"],
            "length": 250, "dataset": "passkey_demo", "language": "en", "all_classes": None, "_id": "a1"}
    with zipfile.ZipFile(repo / "snapshots" / rev / "data.zip", "w") as zf:
        zf.writestr("data/passkey_demo.jsonl", json.dumps(item) + "\n" + json.dumps({**item, "_id": "a2"}) + "\n")
        zf.writestr("data/qasper.jsonl", json.dumps({**item, "dataset": "qasper"}) + "\n")
        zf.writestr("data/../../evil.jsonl", json.dumps(item) + "\n")  # must land inside the cache folder
        zf.writestr("data/README.txt", "not a dataset")


def test_hub_route_fetches_longbench_offline_from_the_hf_cache(tmp_path):
    from namm_mlx.eval.longbench import load_jsonl

    hf_home, cache = tmp_path / "hf", tmp_path / "cache"
    _longbench_cache(hf_home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", NAMM_MLX_CACHE=str(cache), NAMM_OPENBLAS="0")
    out = subprocess.run([*_namm(), "data", "fetch", "longbench", "--source", "hub"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = dict(line.split("\t") for line in out.stdout.strip().splitlines())
    assert sorted(listed) == ["longbench/evil", "longbench/passkey_demo", "longbench/qasper"]
    folder = cache / "texts" / "longbench"
    assert all(Path(p).parent == folder for p in listed.values()) and not (tmp_path / "evil.jsonl").exists()
    items = load_jsonl(listed["longbench/passkey_demo"])  # what `namm eval --data` reads
    assert [i["_id"] for i in items] == ["a1", "a2"] and items[0]["answers"] == ["7314"]
    shown = subprocess.run([*_namm(), "data", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert "longbench/qasper\t" in shown.stdout

    empty = {**env, "HF_HOME": str(tmp_path / "empty-hf")}
    missing = subprocess.run([*_namm(), "data", "fetch", "longbench", "--source", "hub"], env=empty,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the Hugging Face cache" in lines[0] and "Traceback" not in missing.stderr


def _gutenberg_files(root: Path) -> None:
    """Moby Dick and a 66-book KJV in Project Gutenberg's plain-text layout."""
    head = "\ufeffThe Project Gutenberg eBook of {t}\r\n\r\n*** START OF THE PROJECT GUTENBERG EBOOK {t} ***\r\n"
    tail = "\r\n*** END OF THE PROJECT GUTENBERG EBOOK {t} ***\r\n\r\nLicense text.\r\n"
    moby = root / "cache" / "epub" / "2701"
    moby.mkdir(parents=True)
    (moby / "pg2701.txt").write_bytes((head.format(t="MOBY DICK") + "\r\nCHAPTER 1. Loomings.\r\n\r\nCall me Ishmael."
                                       + tail.format(t="MOBY DICK")).encode())
    books = []
    for b in range(66):
        verses = [f"1:1 Verse one of book {b}.", f"1:2 A verse that wraps\r\nonto a second line in book {b}."]
        if b == 65:
            verses.append("22:21 The grace of our Lord Jesus Christ be with you all. Amen.")
        books.append(f"Book Title Number {b}\r\n\r\n\r\n" + "\r\n\r\n".join(verses))
    kjv = root / "cache" / "epub" / "10"
    kjv.mkdir(parents=True)
    (kjv / "pg10.txt").write_bytes((head.format(t="KJV") + "\r\n\r\n".join(books) + "\r\n" + tail.format(t="KJV")).encode())


@pytest.fixture()
def gutenberg(tmp_path, monkeypatch):
    """A loopback HTTP server in Gutenberg's layout (NAMM_GUTENBERG_URL points at it)."""
    root = tmp_path / "site"
    _gutenberg_files(root)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("NAMM_GUTENBERG_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


def test_hub_route_books_over_https(tmp_path, monkeypatch, gutenberg):
    monkeypatch.setenv("NAMM_MLX_CACHE", str(tmp_path / "cache"))
    paths = fetch_texts(["mobydick", "kjv"], route="hub")
    assert set(paths) == {"mobydick", "kjv"}
    assert load_text("mobydick") == "CHAPTER 1. Loomings.\n\nCall me Ishmael.\n"  # no Gutenberg header/licence
    verses = dict(parse_kjv(load_text("kjv")))
    assert len(verses) == 133 and verses["Ge1:1"] == "Verse one of book 0."
    assert verses["Exo1:2"] == "A verse that wraps onto a second line in book 1."
    assert verses["Rev22:21"].endswith("Amen.")
    assert "Book Title" not in load_text("kjv")


def test_routes_refuse_what_they_cannot_do(tmp_path, monkeypatch):
    monkeypatch.setenv("NAMM_MLX_CACHE", str(tmp_path))
    monkeypatch.setenv("NAMM_GUTENBERG_URL", "http://127.0.0.1:9")  # nothing listens: a download error
    with pytest.raises(DataError, match="only on the Hugging Face Hub"):
        fetch_texts(["longbench"], route="debian")
    with pytest.raises(DataError, match="cannot download"):
        fetch_texts(["mobydick"], route="hub")
    with pytest.raises(DataError, match="unknown route"):
        fetch_texts(["mobydick"], route="ftp")


# --------------------------------------------------------------------------- offline excerpts


def test_excerpts_exist_and_are_small():
    files = [DATA / "pride_and_prejudice.txt", DATA / "kjv_sample.tsv"]
    for f in files:
        assert f.is_file(), f
    total = sum(f.stat().st_size for f in DATA.iterdir() if f.is_file())
    assert total <= 1_000_000
    pride = (DATA / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    assert pride.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in pride
    assert sum(line == f"Chapter {n}" for n in range(1, 16) for line in pride.splitlines()) == 15


def test_kjv_sample_parses_into_references():
    verses = parse_kjv((DATA / "kjv_sample.tsv").read_text(encoding="utf-8"))
    assert len(verses) > 2000
    refs = dict(verses)
    assert refs["Ge1:1"] == "In the beginning God created the heaven and the earth."
    assert refs["John3:16"].startswith("For God so loved the world")
    books = {parse_kjv_ref(r)[0] for r, _ in verses}
    assert {"Ge", "Psa", "John", "Rev"} <= books
    assert parse_kjv_ref("1Sm3:4") == ("1Sm", 3, 4)
    with pytest.raises(DataError):
        parse_kjv_ref("Genesis 1:1")


def test_example_text_fits_smollm2_context():
    path = EXAMPLES / "pride_and_prejudice_ch1-4.txt"
    text = path.read_text(encoding="utf-8")
    assert 20_000 < len(text.encode()) < 28_000  # 6,203 SmolLM2 tokens when made
    assert text.startswith("PRIDE AND PREJUDICE")
    assert "Chapter 4" in text and "Chapter 5" not in text


# --------------------------------------------------------------------------- end to end (opt-in)


@pytest.mark.skipif(
    os.environ.get("NAMM_TEST_APT") != "1", reason="set NAMM_TEST_APT=1 (needs apt-get + network)"
)
def test_fetch_texts_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("NAMM_MLX_CACHE", str(tmp_path))
    paths = fetch_texts(route="debian")
    assert set(paths) == set(data.TEXTS)
    assert len(load_text("emma").split()) > 150_000
    assert "Call me Ishmael" in load_text("mobydick")
    kjv = parse_kjv(load_text("kjv"))
    assert len(kjv) == 31102 and kjv[0][0] == "Ge1:1" and kjv[-1][0] == "Rev22:21"
    # the excerpts in tests/data are exact slices of the extracted texts
    assert load_text("pride_and_prejudice").startswith(
        (DATA / "pride_and_prejudice.txt").read_text()
    )
    sample = set((DATA / "kjv_sample.tsv").read_text().splitlines())
    assert sample <= set(load_text("kjv").splitlines())
