"""namm_mlx.documents: every format a user gives ``--doc``, from small real files
made here, and the decoding rules (replacement count, UTF-16, binary)."""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
from pathlib import Path

import pytest

from namm_mlx.documents import DocumentError, decode_text, read_document

REPO_ROOT = Path(__file__).resolve().parents[1]
FRENCH = "Le café était fermé; « déjà vu » à Noël.\n" * 20
RUSSIAN = "Съешь же ещё этих мягких французских булок, да выпей чаю.\n" * 40


def minimal_pdf(lines: list[str]) -> bytes:
    """A valid one-page PDF whose text layer holds ``lines`` (Helvetica, ASCII)."""
    ops = ["BT", "/F1 12 Tf", "72 720 Td", "14 TL"]
    for line in lines:
        ops.append("(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj T*")
    ops.append("ET")
    stream = "\n".join(ops).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".txt", ".md", ".rst", ""])
def test_text_and_markdown_read_as_is(tmp_path, suffix, capsys):
    doc = tmp_path / f"notes{suffix}"
    doc.write_text("# Title\n\nSome *emphasis* and café.\n", encoding="utf-8")
    assert read_document(doc) == "# Title\n\nSome *emphasis* and café."
    assert capsys.readouterr().err == ""


def test_html_reduced_to_visible_text(tmp_path):
    doc = tmp_path / "page.html"
    doc.write_text(
        "<!doctype html><html><head><title>T</title><style>p{color:red}</style></head>"
        "<body><h1>Report</h1><script>var x = 1;</script><p>Q3 revenue &amp; costs</p>"
        "<ul><li>one</li><li>two&nbsp;items</li></ul></body></html>",
        encoding="utf-8",
    )
    text = read_document(doc)
    assert text.splitlines() == ["Report", "", "Q3 revenue & costs", "", "one", "", "two items"]
    assert "var x" not in text and "color" not in text


def test_pdf_text_layer(tmp_path):
    pytest.importorskip("pypdf")
    doc = tmp_path / "memo.pdf"
    doc.write_bytes(minimal_pdf(["The passkey is 48213.", "Remember it (for later)."]))
    text = read_document(doc)
    assert "The passkey is 48213." in text and "Remember it (for later)." in text


def test_pdf_without_text_or_damaged_gets_one_line(tmp_path):
    pytest.importorskip("pypdf")
    empty = tmp_path / "scan.pdf"
    empty.write_bytes(minimal_pdf([]))
    with pytest.raises(DocumentError, match="without a text layer"):
        read_document(empty)
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nthis is not a pdf body at all\n")
    with pytest.raises(DocumentError) as err:
        read_document(broken)
    assert "broken.pdf" in str(err.value) and "\n" not in str(err.value)


def test_pdf_without_pypdf_says_how_to_get_it(tmp_path):
    doc = tmp_path / "memo.pdf"
    doc.write_bytes(minimal_pdf(["hello"]))
    code = (
        "import sys; sys.modules['pypdf'] = None\n"  # as if the [pdf] extra were not installed
        "from namm_mlx.documents import DocumentError, read_document\n"
        f"try:\n    read_document({str(doc)!r})\nexcept DocumentError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'namm-mlx[pdf]'" in out.stdout


@pytest.mark.parametrize("name", ["report.docx", "book.epub", "scan.png"])
def test_other_formats_get_one_clear_line(tmp_path, name):
    doc = tmp_path / name
    doc.write_bytes(b"PK\x03\x04 whatever")
    with pytest.raises(DocumentError) as err:
        read_document(doc)
    message = str(err.value)
    assert "not supported" in message and ".pdf" in message and "\n" not in message


def test_cli_refuses_an_unsupported_document_before_loading_a_model(tmp_path):
    doc = tmp_path / "report.docx"
    doc.write_bytes(b"PK\x03\x04")
    script = Path(sys.executable).with_name("namm")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "cli"]
    env = dict(os.environ, NAMM_OPENBLAS="0")
    out = subprocess.run([*cmd, "generate", "--doc", str(doc), "--prompt", "q"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "not supported" in lines[0] and "Traceback" not in out.stderr


# --------------------------------------------------------------------------- decoding


def test_one_stray_byte_costs_one_character_and_is_reported(tmp_path, capsys):
    data = FRENCH.encode("utf-8")
    data = data[:100] + b"\xe9" + data[100:]  # a lone Latin-1 e-acute
    doc = tmp_path / "cafe.txt"
    doc.write_bytes(data)
    text = read_document(doc)
    assert text.count("\ufffd") == 1
    assert text.replace("\ufffd", "") == FRENCH.strip()  # every other accent intact: no mojibake
    assert "Ã" not in text
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 byte not valid UTF-8" in err[0] and "cafe.txt" in err[0]


def test_dense_non_latin_text_with_a_stray_byte_is_text():
    data = RUSSIAN.encode("utf-8")
    data = data[:301] + b"\xff" + data[301:]
    text, replaced = decode_text(data, "doc")
    assert replaced == 1 and text.count("\ufffd") == 1 and "французских" in text


def test_truncated_multibyte_sequences_are_counted_in_bytes():
    text, replaced = decode_text("abc é".encode("utf-8")[:-1] + b" \xe2\x82 end", "doc")
    assert replaced == 3 and text == "abc \ufffd \ufffd end"


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-16"])
@pytest.mark.parametrize("bom", [True, False])
def test_utf16_with_or_without_bom(codec, bom):
    if codec == "utf-16" and not bom:
        pytest.skip("Python's utf-16 codec always writes a BOM")
    data = FRENCH.encode(codec)
    if bom and codec != "utf-16":
        data = (codecs.BOM_UTF16_LE if codec.endswith("le") else codecs.BOM_UTF16_BE) + data
    text, replaced = decode_text(data, "doc")
    assert (text, replaced) == (FRENCH, 0)


def test_utf8_bom_is_dropped():
    assert decode_text(codecs.BOM_UTF8 + b"hello", "doc") == ("hello", 0)


def test_binary_only_when_it_really_is(tmp_path):
    nul = tmp_path / "blob.bin"
    nul.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(DocumentError, match="binary"):
        read_document(nul)
    controls = tmp_path / "controls.dat"
    controls.write_bytes(b"text\x01\x02\x03\x04\x05\x06\x07\x08" * 100)
    with pytest.raises(DocumentError, match="binary"):
        read_document(controls)
    # A log with ANSI colours and form feeds is still text.
    log = tmp_path / "build.log"
    log.write_bytes(b"\x1b[32mok\x1b[0m step one\n\x0c\npage two\n" * 50)
    assert "page two" in read_document(log)


def test_stdin_html_and_missing_or_empty(tmp_path):
    code = "from namm_mlx.documents import read_document; print(read_document('-'))"
    out = subprocess.run([sys.executable, "-c", code], input=b"<html><body><p>Hi &lt;there&gt;</p></body></html>",
                         capture_output=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().strip() == "Hi <there>"
    with pytest.raises(DocumentError, match="not found"):
        read_document(tmp_path / "nope.txt")
    (tmp_path / "blank.md").write_text(" \n\n")
    with pytest.raises(DocumentError, match="empty"):
        read_document(tmp_path / "blank.md")
