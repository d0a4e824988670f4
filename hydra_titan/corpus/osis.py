"""OSIS markup (the XML dialect of SWORD modules) to plain text.

Entries are XML *fragments* (milestones open in one verse and close in another), so no XML parser
can take them; tags are handled by name instead. Footnotes and critical-apparatus readings are
dropped: they interrupt the running text mid-sentence ("God<note>The Hebrew word ...</note>
created"). Structural tags become line breaks, everything else keeps its text and loses the tag.
"""

from __future__ import annotations

import html
import re

from hydra_titan.corpus.document import clean_whitespace

# elements whose content is not part of the running text
_DROPPED = re.compile(r"<(note|rdg|figure)\b[^>]*(?<!/)>.*?</\1\s*>|<(?:note|rdg|figure)\b[^>]*/>", re.DOTALL)
# tags that end a line: paragraphs, poetry lines, headings, list items, table rows, chapter marks
_BREAKING = re.compile(r"</?(?:div|p|l|lg|lb|title|item|list|row|table|chapter|head|speaker)\b[^>]*>")
# a table cell boundary: keep the cells apart on one line
_CELL = re.compile(r"</?cell\b[^>]*>")
_ANY_TAG = re.compile(r"<[^>]*>")


def osis_to_text(fragment: str) -> str:
    """The readable text of an OSIS fragment, with cleaned whitespace."""
    text = _DROPPED.sub("", fragment)
    text = _BREAKING.sub("\n", text)
    text = _CELL.sub(" ", text)
    text = _ANY_TAG.sub("", text)
    return clean_whitespace(html.unescape(text))
