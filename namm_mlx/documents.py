"""Read a user's document as plain text (txt, md, rst, html, pdf, or stdin).

Bad input is reported before a model is loaded: a missing, binary or
unsupported file, or an empty document, is a :class:`DocumentError` with a
one-line message.

Decoding never guesses silently. Text is UTF-8 (or UTF-16, recognised by its
BOM or, without one, by the NUL bytes of its ASCII characters); bytes that are
not valid UTF-8 become U+FFFD and their count is reported on stderr, so one
stray byte costs one character instead of turning the whole file into
Latin-1 mojibake. A file is called binary only when it has NUL bytes that are
not UTF-16 or a high share of control characters.
"""

from __future__ import annotations

import codecs
import html
import sys
from html.parser import HTMLParser
from pathlib import Path

from .errors import NammError

HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
#: Formats people have that are not text; each gets one line saying what to do.
UNSUPPORTED_SUFFIXES = {
    ".doc", ".docx", ".odt", ".rtf", ".pages", ".epub", ".mobi", ".azw3", ".djvu",
    ".xls", ".xlsx", ".ods", ".ppt", ".pptx", ".odp", ".key",
    ".zip", ".gz", ".bz2", ".xz", ".7z", ".tar", ".rar",
    ".png", ".jpg", ".jpeg", ".gif", ".webp", ".tif", ".tiff", ".heic", ".mp3", ".mp4", ".wav",
}
SUPPORTED = "text (.txt), Markdown (.md), reST (.rst), HTML (.html) or PDF (.pdf)"

#: Bytes examined to tell text from binary and to spot BOM-less UTF-16.
SAMPLE = 1 << 16
#: Control characters other than tab, newlines, form feed and escape, as a share of the sample.
MAX_CONTROL_SHARE = 0.05
_CONTROL = frozenset(range(32)) - {9, 10, 11, 12, 13, 27} | {127}


class DocumentError(NammError, ValueError):
    """The document cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------- HTML


class _TextExtractor(HTMLParser):
    """Visible text of an HTML page, with block elements on their own lines."""

    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre"}
    HIDDEN = {"script", "style", "head", "noscript", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self._hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.HIDDEN and self._hidden:
            self._hidden -= 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._hidden:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    lines = [" ".join(line.split()) for line in html.unescape("".join(parser.parts)).splitlines()]
    text, blank = [], False
    for line in lines:
        if line or not blank:
            text.append(line)
        blank = not line
    return "\n".join(text).strip()


# --------------------------------------------------------------------------- PDF


def pdf_to_text(data: bytes, name: str) -> str:
    """The text layer of a PDF, page after page (pypdf, the ``[pdf]`` extra)."""
    try:
        from pypdf import PdfReader
    except ImportError:
        raise DocumentError(f"{name} is a PDF; reading PDFs needs pypdf: pip install 'namm-mlx[pdf]'") from None
    import io

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError(f"{name} is a password-protected PDF; save an unprotected copy first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except Exception as err:  # pypdf raises many types on damaged files; the user needs one line
        raise DocumentError(f"{name} is not a readable PDF ({type(err).__name__}: {err})") from None
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        raise DocumentError(f"{name} is a PDF without a text layer (scanned pages?); run OCR on it first")
    return text


# --------------------------------------------------------------------------- decoding


def _count_replaced(err: UnicodeDecodeError) -> tuple[str, int]:
    _count_replaced.bytes += err.end - err.start  # type: ignore[attr-defined]
    return "\ufffd", err.end


_count_replaced.bytes = 0  # type: ignore[attr-defined]
codecs.register_error("namm-count-replace", _count_replaced)


def _bomless_utf16(sample: bytes) -> str | None:
    """``utf-16-le``/``-be`` when the NUL bytes sit on one side of the byte pairs,
    as they do for text mostly in Latin script; else None."""
    pairs = len(sample) // 2
    if pairs < 2:
        return None
    even = sample[0 : 2 * pairs : 2].count(0)
    odd = sample[1 : 2 * pairs : 2].count(0)
    if odd >= 0.3 * pairs and even <= 0.02 * pairs:
        return "utf-16-le"
    if even >= 0.3 * pairs and odd <= 0.02 * pairs:
        return "utf-16-be"
    return None


def decode_text(data: bytes, name: str) -> tuple[str, int]:
    """``(text, replaced)``: the decoded text and how many bytes were invalid
    (each run of invalid bytes became one U+FFFD)."""
    _count_replaced.bytes = 0  # type: ignore[attr-defined]
    if data.startswith(codecs.BOM_UTF8):
        text = data[3:].decode("utf-8", "namm-count-replace")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16", "namm-count-replace")
    elif encoding := _bomless_utf16(data[:SAMPLE]):
        text = data[: len(data) // 2 * 2].decode(encoding, "namm-count-replace")
        _count_replaced.bytes += len(data) % 2  # type: ignore[attr-defined]
    else:
        sample = data[:SAMPLE]
        control = sum(sample.count(c) for c in _CONTROL)
        if b"\x00" in data or control > MAX_CONTROL_SHARE * len(sample):
            raise DocumentError(f"{name} looks like a binary file; give {SUPPORTED}")
        text = data.decode("utf-8", "namm-count-replace")
    return text, _count_replaced.bytes  # type: ignore[attr-defined]


_noted: set[tuple[str, int]] = set()


def _report_replaced(name: str, replaced: int, size: int) -> None:
    """One line on stderr, once per document and process (callers may read it twice)."""
    if (name, replaced) in _noted:
        return
    _noted.add((name, replaced))
    hint = ""
    if replaced > 0.005 * size:
        hint = " (if it is Latin-1 or Windows-1252, convert it: iconv -f cp1252 -t utf-8)"
    s = "" if replaced == 1 else "s"
    print(f"note: {name}: {replaced:,} byte{s} not valid UTF-8, replaced by \ufffd{hint}", file=sys.stderr)


# --------------------------------------------------------------------------- documents


def read_document(path: str | Path) -> str:
    """The document's text; ``-`` reads standard input. HTML is reduced to its
    visible text, a PDF to its text layer; replaced bytes are noted on stderr."""
    if str(path) == "-":
        data, name, suffix = sys.stdin.buffer.read(), "standard input", ""
    else:
        file = Path(path).expanduser()
        name = str(file)
        if not file.exists():
            raise DocumentError(f"document not found: {file}")
        if file.is_dir():
            raise DocumentError(f"{file} is a folder; give one document file")
        suffix = file.suffix.lower()
        if suffix in UNSUPPORTED_SUFFIXES:
            raise DocumentError(f"{file}: {suffix} documents are not supported; convert it to {SUPPORTED}")
        data = file.read_bytes()
    if suffix in PDF_SUFFIXES or data.startswith(b"%PDF-"):
        text = pdf_to_text(data, name)
    else:
        text, replaced = decode_text(data, name)
        if replaced:
            _report_replaced(name, replaced, len(data))
        if suffix in HTML_SUFFIXES or (
            not suffix and text.lstrip("\ufeff \t\r\n").lower().startswith(("<!doctype html", "<html"))
        ):
            text = html_to_text(text)
    if not text.strip():
        raise DocumentError(f"{name} is empty; give a document with some text")
    return text.strip()
