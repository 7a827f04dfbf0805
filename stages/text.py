"""The one function that turns a BEIR document into the text that is embedded.

Training, mining, indexing and evaluation all call `doc_text`, so a document is the same string
everywhere (a title-less document is its text alone; otherwise title, newline, text).
"""
from __future__ import annotations

from collections.abc import Mapping


def doc_text(doc: Mapping) -> str:
    title = (doc.get("title") or "").strip()
    text = doc.get("text") or ""
    return f"{title}\n{text}" if title else text
