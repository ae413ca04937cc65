"""Clean: repair and normalise every text of a record; count what changed.

Per text, in order: mojibake and broken Unicode repaired by ftfy (which also normalises to NFC and
removes control characters other than newline and tab), HTML / markup stripped when the text holds
tags, whitespace normalised, and optionally PII replaced by placeholders. A record whose turn or
text is empty afterwards is dropped ("empty after cleaning").
"""

from __future__ import annotations

import collections
import html.parser
import re
import unicodedata
from typing import Any

import ftfy

from sft.databuilder import records

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(\s[^<>]*)?/?>")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
# Emails, IPv4 addresses and phone numbers (digit groups with the usual separators, optional +country;
# see _is_phone for what else a match must be).
PII_PATTERNS = {
    "email": (re.compile(r"\b[\w.+-]+@[\w-]+(\.[\w-]+)*\.[A-Za-z]{2,}\b"), "<EMAIL>"),
    "ip_address": (re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"), "<IP_ADDRESS>"),
    "phone": (re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3}(?![\w.])"), "<PHONE>"),
}
_DROPPED_TAGS = frozenset({"script", "style", "head", "noscript"})
_BLOCK_TAGS = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "ul", "ol", "table"})


class _TextExtractor(html.parser.HTMLParser):
  """The visible text of an HTML fragment: no tags, no script/style, entities decoded, blocks on lines."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts: list[str] = []
    self._skip = 0

  def handle_starttag(self, tag, attrs):
    if tag in _DROPPED_TAGS:
      self._skip += 1
    elif tag in _BLOCK_TAGS:
      self.parts.append("\n")

  def handle_endtag(self, tag):
    if tag in _DROPPED_TAGS:
      self._skip = max(0, self._skip - 1)
    elif tag in _BLOCK_TAGS:
      self.parts.append("\n")

  def handle_data(self, data):
    if not self._skip:
      self.parts.append(data)


def strip_html(text: str) -> str:
  """`<p>Hi &amp; bye</p><script>x()</script>` -> `Hi & bye` (only when the text holds tags)."""
  if not _TAG.search(text):
    return text
  parser = _TextExtractor()
  parser.feed(text)
  parser.close()
  return "".join(parser.parts)


def normalize_whitespace(text: str) -> str:
  """Runs of spaces -> one space, trailing spaces off every line, at most one blank line in a row."""
  lines = [_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
  return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")


def _is_phone(candidate: str) -> bool:
  """7 to 15 digits and not a date (2024-01-02) or a version number."""
  digits = sum(c.isdigit() for c in candidate)
  return 7 <= digits <= 15 and not _DATE.fullmatch(candidate)


def scrub_pii(text: str, kinds: tuple[str, ...], counts: collections.Counter) -> str:
  """`mail a@b.org` -> `mail <EMAIL>`; counts["pii_email"] += 1. Kinds: email, ip_address, phone."""
  for kind in kinds:
    if kind not in PII_PATTERNS:
      raise ValueError(f"unknown PII kind {kind!r}; choose among {sorted(PII_PATTERNS)}")
    pattern, placeholder = PII_PATTERNS[kind]
    matches = [m for m in pattern.finditer(text) if kind != "phone" or _is_phone(m.group())]
    for m in reversed(matches):
      text = text[:m.start()] + placeholder + text[m.end():]
    counts[f"pii_{kind}"] += len(matches)
  return text


def clean_text(text: str, params: dict[str, Any], counts: collections.Counter) -> str:
  """One text through every cleaning step; `counts` gains one per step that changed it."""
  fixed = ftfy.fix_text(text, normalization=params["unicode_form"]) if params["fix_unicode"] else unicodedata.normalize(params["unicode_form"], text)
  counts["unicode_fixed"] += fixed != text
  out = strip_html(fixed) if params["strip_html"] else fixed
  counts["html_stripped"] += out != fixed
  spaced = normalize_whitespace(out)
  counts["whitespace_normalized"] += spaced != out
  return scrub_pii(spaced, tuple(params["pii"]), counts) if params["pii"] else spaced


def clean_record(record: records.Record, params: dict[str, Any]) -> records.Record:
  """The record with every text cleaned and `edits` counting the changes, or dropped if a text empties."""
  counts: collections.Counter = collections.Counter()
  if record["kind"] == "chat":
    messages = [{**m, "content": clean_text(m["content"], params, counts)} for m in record["messages"]]
    cleaned = {**record, "messages": messages}
    empty = next((m["role"] for m in messages if not m["content"]), None)
  else:
    cleaned = {**record, "text": clean_text(record["text"], params, counts)}
    empty = "text" if not cleaned["text"] else None
  cleaned["edits"] = {k: v for k, v in sorted(counts.items()) if v}
  if empty:
    return records.drop(cleaned, "clean", "empty after cleaning", f"the {empty} turn" if empty != "text" else "")
  return cleaned
