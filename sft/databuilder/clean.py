"""Clean: repair and normalise every text of a record; count what changed.

Per text, in order: mojibake and broken Unicode repaired by ftfy (which also normalises to NFC and
removes control characters other than newline and tab), HTML / markup stripped when the text holds
tags, whitespace normalised, and optionally PII replaced by placeholders. Chat control strings
(control.py; also when hidden by invisible characters or written in full-width forms) are escaped or the
record is dropped (clean.control_strings). A record whose turn or
text is empty afterwards is dropped ("empty after cleaning").
"""

from __future__ import annotations

import bisect
import collections
import functools
import html.parser
import re
import sys
import unicodedata
from typing import Any

import ftfy
import phonenumbers

from sft.databuilder import control, records

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(\s[^<>]*)?/?>")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
# Emails and IPv4 addresses by pattern; phone numbers by the phonenumbers package (see _phone_spans). The
# email local part must start a run (the lookbehind), so a long run of word characters without "@" is
# scanned once, not once per starting position.
PII_PATTERNS = {
    "email": (re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b"), "<EMAIL>"),
    "ip_address": (re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\w|\.\d)"), "<IP_ADDRESS>"),
    "phone": (None, "<PHONE>"),
}
PII_KINDS = tuple(PII_PATTERNS)
PHONE_LENIENCIES = ("possible", "valid", "strict_grouping", "exact_grouping")
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


_ODD_SPACES = re.compile(r"[\r\t\u00a0\u2000-\u200b\u3000]")
_AT_A_LINE_END = re.compile(r"\s\n|\n\s")


def _normal_whitespace(text: str) -> bool:
  """Whether normalize_whitespace would leave `text` as it is, for most texts (one it says no to may still
  be): no carriage return or run of _SPACES other than one space, no whitespace at its ends or beside a
  newline (a line's ends, a blank line)."""
  if "  " in text or _ODD_SPACES.search(text) or text[:1].isspace() or text[-1:].isspace():
    return False
  return "\n" not in text or not _AT_A_LINE_END.search(text)


def normalize_whitespace(text: str) -> str:
  """Runs of spaces -> one space, trailing spaces off every line, at most one blank line in a row."""
  if _normal_whitespace(text):
    return text
  lines = [_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
  return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _shortest_national_number(country_code: int) -> int:
  """The fewest digits a possible national number of `country_code` has (local-only lengths included), over
  the regions (or non-geographic entity) that share it; the parser's own floor (2) where none is listed."""
  lengths = []
  for region in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(country_code, ()):
    metadata = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    if metadata is not None:
      desc = metadata.general_desc
      lengths += [n for n in (*(desc.possible_length or ()), *(desc.possible_length_local_only or ())) if n >= 2]
  return min(lengths, default=2)


@functools.lru_cache(maxsize=16)
def min_phone_digits(region: str | None) -> int:
  """The fewest digits a candidate the phone matcher reports can hold, at any leniency: a national number's
  digits are among the candidate's, and so are its country code's unless the number is written without one,
  which only a number of the default region's country code can be."""
  written_with_code = min(len(str(cc)) + _shortest_national_number(cc) for cc in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
  code = phonenumbers.country_code_for_region(region) if region else 0
  return min(written_with_code, _shortest_national_number(code)) if code else written_with_code


class _PhoneMatcher(phonenumbers.PhoneNumberMatcher):
  """phonenumbers' matcher, which skips the candidates (a version "2.0", an index "x[3]": most of them in
  real text) with fewer digits than any number it could report: parsing each costs ~60 us."""

  def __init__(self, text: str, region: str | None, leniency: Any, max_tries: int):
    super().__init__(text, region, leniency, max_tries=max_tries)
    self._min_digits = min_phone_digits(region)

  # phonenumbers' own per-candidate step (pinned in requirements.txt); were it renamed, nothing is skipped.
  def _extract_match(self, candidate: str, offset: int):
    if sum(map(str.isdecimal, candidate)) < self._min_digits:
      return None
    return super()._extract_match(candidate, offset)


def _phone_spans(text: str, region: str, leniency: str) -> list[tuple[int, int]]:
  """Where phone numbers are. "valid" (the default) needs a number valid for its region, which rejects most
  year ranges (1313-1375), page ranges and dates that a digit-group pattern takes for numbers; the year
  ranges it would still take ("(1310-1370)") are left out by _is_year_range."""
  if leniency not in PHONE_LENIENCIES:
    raise ValueError(f"unknown clean.phone_leniency {leniency!r}; choose among {PHONE_LENIENCIES}")
  level = getattr(phonenumbers.Leniency, leniency.upper())
  digits = sum(text.count(d) for d in "0123456789") if text.isascii() else sum(map(str.isdecimal, text))
  if digits < min_phone_digits(region or None):  # too few in the whole text for any number
    return []
  # max_tries: the matcher stops silently after that many rejected candidates; no limit on long texts.
  found = _PhoneMatcher(text, region or None, level, max_tries=sys.maxsize)
  return [(m.start, m.end) for m in found if not _is_year_range(m.raw_string)]


# "(1310-1370)": the matcher reads "(1" as the country code 1 and takes the rest for a local number.
_YEAR_RANGE = re.compile(r"\(?\s*(\d{4})\s*[-\u2010-\u2015]\s*(\d{4})\s*\)?")


def _is_year_range(candidate: str) -> bool:
  """Whether a phone-number candidate is a range of years, y1-y2 with 1000 <= y1 <= y2 <= 2099 (hyphen or
  dash, in parentheses or not), which no real number in the formats the matcher accepts looks like."""
  m = _YEAR_RANGE.fullmatch(candidate.strip())
  return bool(m) and 1000 <= int(m[1]) <= int(m[2]) <= 2099


_DIGIT_OR_AT = re.compile(r"[\d@]")
_ASCII_DIGIT_OR_AT = "0123456789@"


def pii_spans(text: str, kinds: tuple[str, ...], region: str = "US", leniency: str = "valid") -> list[tuple[int, int, str]]:
  """Non-overlapping (start, end, kind) of the PII in `text`, sorted. Where two overlap, the kind first
  in PII_PATTERNS wins (an email's digits are not also a phone number)."""
  for kind in kinds:
    if kind not in PII_PATTERNS:
      raise ValueError(f"unknown PII kind {kind!r}; choose among {sorted(PII_PATTERNS)}")
  # Every kind needs a digit or an "@": on ASCII text, a few `in` tests say so sooner than the pattern.
  if not (any(c in text for c in _ASCII_DIGIT_OR_AT) if text.isascii() else _DIGIT_OR_AT.search(text)):
    return []
  taken: list[tuple[int, int, str]] = []
  for kind in (k for k in PII_PATTERNS if k in kinds):
    pattern = PII_PATTERNS[kind][0]
    found = _phone_spans(text, region, leniency) if pattern is None else [m.span() for m in pattern.finditer(text)]
    starts = [s for s, _, _ in taken]
    new = []
    for start, end in found:
      i = bisect.bisect_right(starts, start)
      if (i and taken[i - 1][1] > start) or (i < len(taken) and taken[i][0] < end):
        continue  # overlaps a span of a kind that comes first
      new.append((start, end, kind))
    taken = sorted(taken + new)
  return taken


def scrub_pii(text: str, kinds: tuple[str, ...], counts: collections.Counter, region: str = "US", leniency: str = "valid") -> str:
  """`mail a@b.org` -> `mail <EMAIL>`; counts["pii_email"] += 1. Kinds: email, ip_address, phone.
  The output is built once from the pieces between matches, so the cost is linear in the text."""
  spans = pii_spans(text, kinds, region, leniency)
  if not spans:
    return text
  pieces, last = [], 0
  for start, end, kind in spans:
    pieces += [text[last:start], PII_PATTERNS[kind][1]]
    counts[f"pii_{kind}"] += 1
    last = end
  pieces.append(text[last:])
  return "".join(pieces)


# Printable ASCII without "&", plus tab and newline: ftfy leaves such a text as it is (no entity to unescape,
# no mojibake or width, quote or ligature fix possible without a non-ASCII character, no carriage return,
# terminal escape or control character to remove) and every Unicode normal form of ASCII is itself.
_FTFY_UNCHANGED = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def fix_unicode(text: str, form: str) -> str:
  """ftfy.fix_text(text, normalization=form), without calling it on a text it cannot change."""
  return text if _FTFY_UNCHANGED.fullmatch(text) else ftfy.fix_text(text, normalization=form)


def clean_text(text: str, params: dict[str, Any], counts: collections.Counter, extra_control: tuple[str, ...] = ()) -> str:
  """One text through every cleaning step; `counts` gains one per step that changed it.

  With clean.control_strings = "escape", control strings are escaped before the other steps (so HTML
  stripping does not silently eat `<start_of_turn>` or `<s>`) and again after them (entity decoding or
  removed control characters can assemble new ones: `&lt;|im_start|&gt;`)."""
  escape = params.get("control_strings", "escape") == "escape"
  n_escaped = 0
  if escape:
    text, n_escaped = control.escape(text, extra_control)
  fixed = fix_unicode(text, params["unicode_form"]) if params["fix_unicode"] else unicodedata.normalize(params["unicode_form"], text)
  if fixed != text:  # (a Counter's missing key costs a Python call: counted only when changed)
    counts["unicode_fixed"] += 1
  out = strip_html(fixed) if params["strip_html"] else fixed
  if out != fixed:
    counts["html_stripped"] += 1
  spaced = normalize_whitespace(out)
  if spaced != out:
    counts["whitespace_normalized"] += 1
  region, leniency = params.get("phone_region", "US"), params.get("phone_leniency", "valid")
  scrubbed = scrub_pii(spaced, tuple(params["pii"]), counts, region, leniency) if params["pii"] else spaced
  if escape:
    scrubbed, n = control.escape(scrubbed, extra_control)
    if n_escaped + n:
      counts["control_strings_escaped"] += n_escaped + n
  return scrubbed


def _control_hits(record: records.Record, extra_control: tuple[str, ...]) -> str:
  """"<|im_start|>, <|im_end|> in the user turn" for the first text holding control strings, or ""."""
  texts = [(m["role"], m["content"]) for m in record["messages"]] if record["kind"] == "chat" else [("text", record["text"])]
  for where, text in texts:
    found = control.find(text, extra_control)
    if found:
      return f"{', '.join(sorted(found))} in the {where}" + (" turn" if where != "text" else "")
  return ""


def clean_record(record: records.Record, params: dict[str, Any], extra_control: tuple[str, ...] = ()) -> records.Record:
  """The record with every text cleaned and `edits` counting the changes, or dropped if a text empties
  or, with clean.control_strings = "drop", if a text holds control strings (raw or after cleaning).
  `extra_control`: the target tokenizer's own control strings, on top of control.KNOWN."""
  mode = params.get("control_strings", "escape")
  if mode not in control.MODES:
    raise ValueError(f"unknown clean.control_strings {mode!r}; choose among {control.MODES}")
  if mode == "drop" and (hits := _control_hits(record, extra_control)):
    return records.drop(record, "clean", "control strings", hits)  # before any cleaning work
  counts: collections.Counter = collections.Counter()
  if record["kind"] == "chat":
    messages = [{**m, "content": clean_text(m["content"], params, counts, extra_control)} for m in record["messages"]]
    cleaned = {**record, "messages": messages}
    empty = next((m["role"] for m in messages if not m["content"]), None)
  else:
    cleaned = {**record, "text": clean_text(record["text"], params, counts, extra_control)}
    empty = "text" if not cleaned["text"] else None
  cleaned["edits"] = {k: v for k, v in sorted(counts.items()) if v}
  if mode == "drop" and (hits := _control_hits(cleaned, extra_control)):
    return records.drop(cleaned, "clean", "control strings", hits + " after cleaning")
  if empty:
    return records.drop(cleaned, "clean", "empty after cleaning", f"the {empty} turn" if empty != "text" else "")
  return cleaned
