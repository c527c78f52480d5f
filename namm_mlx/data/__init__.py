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

from .catalogue import (
    _AUSTEN_OBJECTS,  # noqa: F401  (tests read the R object names)
    DEFAULT_SOURCES,
    KJV_BOOKS,
    LONGBENCH_REPO,
    ROUTES,
    SOURCES,
    TEXTS,
    DataError,
    Source,
    available_texts,
    load_text,
    longbench_files,
    parse_kjv,
    parse_kjv_ref,
    text_cache_dir,
)
from .debian import decode_bible_data
from .fetch import fetch_texts

__all__ = [
    "DEFAULT_SOURCES",
    "KJV_BOOKS",
    "LONGBENCH_REPO",
    "ROUTES",
    "SOURCES",
    "TEXTS",
    "DataError",
    "Source",
    "available_texts",
    "decode_bible_data",
    "fetch_texts",
    "load_text",
    "longbench_files",
    "parse_kjv",
    "parse_kjv_ref",
    "text_cache_dir",
]
