"""Read a user's document as plain text (txt, md, rst, html, or stdin).

Bad input is reported before a model is loaded: a missing or binary file, or
an empty document, is a :class:`DocumentError` with a one-line message.
"""

from __future__ import annotations

import html
import sys
from html.parser import HTMLParser
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ""}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}


class DocumentError(ValueError):
    """The document cannot be used; the message says why and what to do."""


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


def _decode(data: bytes, name: str) -> str:
    """UTF-8 (or UTF-16 with a BOM); Latin-1 only for text that is clearly not binary."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    if b"\x00" in data[:8192]:
        raise DocumentError(f"{name} looks like a binary file; give a text, Markdown, reST or HTML document")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    sample = data[:8192]
    printable = sum(32 <= b < 127 or b in (9, 10, 13) or b >= 160 for b in sample)
    if printable < 0.95 * len(sample):
        raise DocumentError(f"{name} looks like a binary file; give a text, Markdown, reST or HTML document")
    return data.decode("latin-1")


def read_document(path: str | Path) -> str:
    """The document's text; ``-`` reads standard input. HTML is reduced to its visible text."""
    if str(path) == "-":
        text, name, suffix = _decode(sys.stdin.buffer.read(), "standard input"), "standard input", ".txt"
        if text.lstrip().lower().startswith(("<!doctype html", "<html")):
            suffix = ".html"
    else:
        file = Path(path).expanduser()
        name = str(file)
        if not file.exists():
            raise DocumentError(f"document not found: {file}")
        if file.is_dir():
            raise DocumentError(f"{file} is a folder; give one document file")
        suffix = file.suffix.lower()
        text = _decode(file.read_bytes(), name)
    if suffix in HTML_SUFFIXES:
        text = html_to_text(text)
    if not text.strip():
        raise DocumentError(f"{name} is empty; give a document with some text")
    return text.strip()
