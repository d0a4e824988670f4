"""The document record every source yields, and the text clean-up they all share."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_SPACE_AROUND_NEWLINE = re.compile(r" *\n *")
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Document:
    """One unit of the held-out split and of deduplication.

    ``doc_id`` is unique within the corpus (``source/...``) and stable across builds, because the
    split is a function of it: the same document lands in the same split on every machine.
    """

    doc_id: str
    source: str
    text: str

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    def record(self) -> dict:
        return {"id": self.doc_id, "source": self.source, "text": self.text}


def clean_whitespace(text: str) -> str:
    """Unix newlines, single spaces, at most one blank line in a row, no leading/trailing space.

    Line breaks are kept (verse, poetry and dialogue depend on them); only runs are collapsed, so
    extraction artefacts (tag boundaries, hard spacing) do not reach the tokenizer.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", text)
    text = _SPACE_AROUND_NEWLINE.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()
