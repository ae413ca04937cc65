"""The annotation cache: every answer an annotator gave, kept in one SQLite file, so that a rebuild (or a
build killed halfway and started again) asks the model only what it has not answered yet.

One table, readable with the sqlite3 shell:

    sqlite3 annotations.sqlite "SELECT task, request, response FROM annotations LIMIT 3"

    key          sha256 of [fingerprint, task, kind, chat, answer, decoding] (JSON): the primary key
    fingerprint  the annotator's (its weights, tokenizer and backend)
    task         what asked ("fill", "label", ...)
    request      JSON: {"kind", "chat", "answer", "decoding"}
    response     JSON: {"text", "finished"} for a generation, {"loglik"} for a log-likelihood
    created      UTC time of the write

The file is in WAL mode and each call's new answers are committed in one transaction: a process killed
mid-write leaves a readable file that lost at most the answers of the call in flight. Standard library
only (no JAX): the data builder's workers import this.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import sqlite3
from typing import Any, Sequence

from sft.annotator.base import Annotator, Chat, Decoding, Generation, check_count
from sft.errors import ConfigError

TABLE = "annotations"
COLUMNS = ("key", "fingerprint", "task", "request", "response", "created")
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, task TEXT NOT NULL, "
    "request TEXT NOT NULL, response TEXT NOT NULL, created TEXT NOT NULL)"
)
_LOOKUP_CHUNK = 500  # keys per SELECT: well under SQLite's bound on parameters


def to_json(value: Any) -> str:
  """Readable JSON (non-ASCII text as itself) where the text is valid UTF-8; escaped where it is not
  (a lone surrogate): both read back as the same value."""
  text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return json.dumps(value, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
  return text


def decoding_of(decoding: Decoding) -> dict[str, Any]:
  """The decoding as the key reads it: 0 and 0.0 are the same temperature."""
  return {k: float(v) if k in ("temperature", "top_p") else int(v) for k, v in decoding.as_dict().items()}


def _chat_of(chat: Chat) -> list[dict[str, Any]]:
  return [dict(message) for message in chat]


def request_of(kind: str, chat: Chat, answer: str | None = None, decoding: Decoding | None = None) -> dict[str, Any]:
  """What a cache row records of a request, and its key is made of."""
  return {
      "kind": kind, "chat": _chat_of(chat), "answer": answer,
      "decoding": None if decoding is None else decoding_of(decoding),
  }


def cache_key(fingerprint: str, task: str, request: dict[str, Any]) -> str:
  """sha256 hex of JSON [fingerprint, task, kind, chat, answer or null, decoding or null]."""
  parts = [fingerprint, task, request["kind"], request["chat"], request["answer"], request["decoding"]]
  text = json.dumps(parts, ensure_ascii=True, sort_keys=True, separators=(",", ":"))  # ASCII: any str encodes
  return hashlib.sha256(text.encode()).hexdigest()


class AnnotationCache:
  """Key -> response over the SQLite file at `path` (created with its folder when missing). The
  connection opens on first use in each process, so the object pickles (as its path) to workers,
  which share the file (SQLite's locking and a busy timeout order their writes)."""

  def __init__(self, path: str | os.PathLike, *, timeout_s: float = 60.0):
    self.path = pathlib.Path(path)
    self.timeout_s = timeout_s
    self._conn: sqlite3.Connection | None = None
    self._pid: int | None = None

  def __getstate__(self):
    return {**self.__dict__, "_conn": None, "_pid": None}

  def _fail(self, err: Exception) -> ConfigError:
    return ConfigError(
        f"the annotation cache {self.path} is not an annotation cache ({err}): delete it (or move it aside) to start "
        "an empty one, or give another cache path"
    )

  @property
  def conn(self) -> sqlite3.Connection:
    if self._conn is None or self._pid != os.getpid():
      self._conn, self._pid = self._open(), os.getpid()
    return self._conn

  def _open(self) -> sqlite3.Connection:
    if self.path.is_dir():
      raise ConfigError(f"the annotation cache {self.path} is a folder: give the path of a file")
    self.path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
    try:
      tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
      if tables and TABLE not in tables:  # another program's database: checked before anything is written
        raise ValueError(f"it holds the tables {sorted(tables)}, not {TABLE!r}")
      columns = tuple(row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})"))
      if tables and columns != COLUMNS:
        raise ValueError(f"its {TABLE} table has the columns {columns}, expected {COLUMNS}")
      conn.execute("PRAGMA journal_mode=WAL")
      conn.execute(_SCHEMA)
    except (sqlite3.DatabaseError, ValueError) as err:  # not a database, a damaged one, or another program's
      conn.close()
      raise self._fail(err) from None
    return conn

  def close(self) -> None:
    if self._conn is not None and self._pid == os.getpid():
      self._conn.close()
    self._conn = self._pid = None

  def __len__(self) -> int:
    return self._query(f"SELECT COUNT(*) FROM {TABLE}")[0][0]

  def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
    try:
      return self.conn.execute(sql, args).fetchall()
    except sqlite3.DatabaseError as err:
      raise self._fail(err) from None

  def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
    """key -> response (decoded JSON) of the keys stored; the others are absent."""
    found = {}
    keys = list(dict.fromkeys(keys))
    for start in range(0, len(keys), _LOOKUP_CHUNK):
      chunk = keys[start:start + _LOOKUP_CHUNK]
      marks = ",".join("?" * len(chunk))
      for key, response in self._query(f"SELECT key, response FROM {TABLE} WHERE key IN ({marks})", chunk):
        found[key] = json.loads(response)
    return found

  def put_many(self, rows: Sequence[tuple[str, str, str, dict[str, Any], Any]]) -> None:
    """Stores (key, fingerprint, task, request, response) rows in one transaction: all of them or none.
    A key already stored keeps its first answer."""
    if not rows:
      return
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    values = [
        (key, fingerprint, task, to_json(request), to_json(response), created)
        for key, fingerprint, task, request, response in rows
    ]
    conn = self.conn
    try:
      conn.execute("BEGIN IMMEDIATE")
      try:
        conn.executemany(f"INSERT OR IGNORE INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?)", values)
      except BaseException:
        conn.execute("ROLLBACK")
        raise
      conn.execute("COMMIT")
    except sqlite3.DatabaseError as err:
      raise self._fail(err) from None


def _generation(response: Any) -> Generation:
  return Generation(str(response["text"]), bool(response["finished"]), str(response.get("error", "")))


class CachedAnnotator:
  """The Annotator interface over `annotator` and `cache`, for one `task`: answers stored under the
  annotator's fingerprint, the task, the chat, the answer scored and the decoding come from the cache;
  the others (each distinct one once) go to `annotator` in one call and are stored, one transaction
  per call. `hits` counts the requests answered without the model (stored, or equal to an earlier one
  of the same call), `misses` those it was asked. Pickles with its annotator and cache."""

  def __init__(self, annotator: Annotator, cache: AnnotationCache, task: str):
    self.annotator, self.cache, self.task = annotator, cache, task
    self.hits = self.misses = 0

  @property
  def fingerprint(self) -> str:
    return self.annotator.fingerprint

  def generate(self, chats: Sequence[Chat], decoding: Decoding) -> list[Generation]:
    requests = [request_of("generate", chat, decoding=decoding) for chat in chats]

    def ask(indices: list[int]) -> list[dict[str, Any]]:
      out = self.annotator.generate([chats[i] for i in indices], decoding)
      check_count("generations", out, len(indices))
      return [{"text": g.text, "finished": bool(g.finished), **({"error": g.error} if g.error else {})} for g in out]

    return [_generation(r) for r in self._answer(requests, ask)]

  def log_likelihoods(self, chats: Sequence[Chat], answers: Sequence[str]) -> list[float]:
    if len(chats) != len(answers):
      raise ValueError(f"log_likelihoods takes one answer per chat, got {len(chats)} chats and {len(answers)} answers")
    requests = [request_of("loglik", chat, answer) for chat, answer in zip(chats, answers)]

    def ask(indices: list[int]) -> list[dict[str, Any]]:
      out = self.annotator.log_likelihoods([chats[i] for i in indices], [answers[i] for i in indices])
      check_count("log-likelihoods", out, len(indices))
      return [{"loglik": float(x)} for x in out]

    return [float(r["loglik"]) for r in self._answer(requests, ask)]

  def _answer(self, requests: list[dict[str, Any]], ask) -> list[Any]:
    fingerprint = self.fingerprint
    keys = [cache_key(fingerprint, self.task, r) for r in requests]
    found = self.cache.get_many(keys)
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
      if key not in found:
        first.setdefault(key, i)
    todo = list(first.values())  # each missing request once, in order
    if todo:
      responses = ask(todo)
      # A failed request (an error, no answer) is returned but not stored: the next build asks again.
      kept = [(i, r) for i, r in zip(todo, responses) if not (isinstance(r, dict) and r.get("error"))]
      self.cache.put_many([(keys[i], fingerprint, self.task, requests[i], r) for i, r in kept])
      found.update((keys[i], r) for i, r in zip(todo, responses))
    self.misses += len(todo)
    self.hits += len(keys) - len(todo)
    return [found[k] for k in keys]
