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
mid-write leaves a readable file that lost at most the answers of the call in flight. A row that does
not read back as an answer (damaged, or written by another program) is a miss: asked again, overwritten
and counted in `CachedAnnotator.unreadable`. Standard library only (no JAX): the data builder's workers
import this.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pathlib
import sqlite3
import threading
from typing import Any, Callable, Collection, Sequence

from sft.annotator.base import Annotator, Chat, Decoding, Generation, check_count
from sft.errors import ConfigError

log = logging.getLogger("sft")
TABLE = "annotations"
COLUMNS = ("key", "fingerprint", "task", "request", "response", "created")
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, task TEXT NOT NULL, "
    "request TEXT NOT NULL, response TEXT NOT NULL, created TEXT NOT NULL)"
)
_LOOKUP_CHUNK = 500  # keys per SELECT: well under SQLite's bound on parameters
# SQLite's primary result codes, by what the user should do about them.
_FOREIGN = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_DENIED = (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_AUTH)


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
  """The decoding as the key reads it: 0 and 0.0 are the same temperature (Decoding checked the types)."""
  return {k: float(v) if k in ("temperature", "top_p") else v for k, v in decoding.as_dict().items()}


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


class NotACache(Exception):
  """The file is a database, but not an annotation cache (another program's tables or columns)."""


def problem_of(path: pathlib.Path, err: Exception, timeout_s: float) -> ConfigError | None:
  """The one-line error a failed SQLite call on the cache at `path` is reported as; None for a misuse
  of the sqlite3 module (a bug here, raised as it is). Only a file that is no annotation cache is worth
  deleting: a busy or read-only one still holds every answer."""
  code = (getattr(err, "sqlite_errorcode", None) or 0) & 0xFF  # the primary code of an extended one
  if isinstance(err, NotACache) or code in _FOREIGN:
    return ConfigError(
        f"the annotation cache {path} is not an annotation cache ({err}): delete it (or move it aside) to start "
        "an empty one, or give another cache path"
    )
  if code in _BUSY:
    return ConfigError(
        f"the annotation cache {path} is in use by another process (waited {timeout_s:g} s): let it finish "
        "(another build on the same folder, or a sqlite3 shell), or give another cache path"
    )
  if code in _DENIED:
    return ConfigError(
        f"the annotation cache {path} cannot be opened for writing ({err}): check the permissions of the file, "
        "its -wal and -shm files and its folder, or give another cache path"
    )
  if isinstance(err, sqlite3.OperationalError) or type(err) is sqlite3.DatabaseError:
    return ConfigError(f"the annotation cache {path} cannot be used ({err}): give another cache path")
  return None


class AnnotationCache:
  """Key -> response over the SQLite file at `path` (created with its folder when missing). A
  connection opens on first use in each process and each thread (sqlite3's connections are neither
  fork- nor thread-safe), so the object pickles (as its path) to workers and serves a thread pool;
  they all share the file (SQLite's locking and a busy timeout of `timeout_s` order their writes)."""

  def __init__(self, path: str | os.PathLike, *, timeout_s: float = 60.0):
    self.path = pathlib.Path(path)
    self.timeout_s = timeout_s
    self._local = threading.local()  # this thread's (pid, connection)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_local"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()

  def _raise(self, err: Exception):
    problem = problem_of(self.path, err, self.timeout_s)
    if problem is None:
      raise err
    raise problem from None

  @property
  def conn(self) -> sqlite3.Connection:
    local = self._local
    if getattr(local, "pid", None) != os.getpid():
      local.conn, local.pid = self._open(), os.getpid()
    return local.conn

  def _open(self) -> sqlite3.Connection:
    if self.path.is_dir():
      raise ConfigError(f"the annotation cache {self.path} is a folder: give the path of a file")
    self.path.parent.mkdir(parents=True, exist_ok=True)
    conn = None
    try:
      conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
      tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
      if tables and TABLE not in tables:  # another program's database: checked before anything is written
        raise NotACache(f"it holds the tables {sorted(tables)}, not {TABLE!r}")
      columns = tuple(row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})"))
      if tables and columns != COLUMNS:
        raise NotACache(f"its {TABLE} table has the columns {columns}, expected {COLUMNS}")
      conn.execute("PRAGMA journal_mode=WAL")
      conn.execute(_SCHEMA)
    except (sqlite3.DatabaseError, NotACache) as err:
      if conn is not None:
        conn.close()
      self._raise(err)
    return conn

  def close(self) -> None:
    """Closes this thread's connection (the others close with their threads)."""
    local = self._local
    if getattr(local, "pid", None) == os.getpid():
      local.conn.close()
    vars(local).clear()

  def __len__(self) -> int:
    return self._query(f"SELECT COUNT(*) FROM {TABLE}")[0][0]

  def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
    try:
      return self.conn.execute(sql, args).fetchall()
    except sqlite3.DatabaseError as err:
      self._raise(err)

  def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
    """key -> response (decoded JSON; None where the stored text is no JSON) of the keys stored; the
    others are absent."""
    found = {}
    keys = list(dict.fromkeys(keys))
    for start in range(0, len(keys), _LOOKUP_CHUNK):
      chunk = keys[start:start + _LOOKUP_CHUNK]
      marks = ",".join("?" * len(chunk))
      for key, response in self._query(f"SELECT key, response FROM {TABLE} WHERE key IN ({marks})", chunk):
        found[key] = _json_or_none(response)
    return found

  def put_many(
      self, rows: Sequence[tuple[str, str, str, dict[str, Any], Any]], replace: Collection[str] = (),
  ) -> None:
    """Stores (key, fingerprint, task, request, response) rows in one transaction: all of them or none.
    A key already stored keeps its first answer, unless it is in `replace` (a row found unreadable)."""
    if not rows:
      return
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    values = [
        (key, fingerprint, task, to_json(request), to_json(response), created)
        for key, fingerprint, task, request, response in rows
    ]
    replace = set(replace)
    conn = self.conn
    try:
      conn.execute("BEGIN IMMEDIATE")
      try:
        for verb, redo in (("IGNORE", False), ("REPLACE", True)):
          chosen = [v for v in values if (v[0] in replace) == redo]
          conn.executemany(f"INSERT OR {verb} INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?)", chosen)
      except BaseException:
        conn.execute("ROLLBACK")
        raise
      conn.execute("COMMIT")
    except sqlite3.DatabaseError as err:
      self._raise(err)


def _json_or_none(text: Any) -> Any:
  try:
    return json.loads(text)
  except (TypeError, ValueError):  # not JSON (or not text at all: a BLOB written by another program)
    return None


def generation_of(response: Any) -> Generation | None:
  """The Generation a stored response holds; None when the row is not one (damaged or hand-edited)."""
  if not isinstance(response, dict):
    return None
  text, finished, error = response.get("text"), response.get("finished"), response.get("error", "")
  if not (isinstance(text, str) and isinstance(finished, bool) and isinstance(error, str)):
    return None
  return Generation(text, finished, error)


def loglik_of(response: Any) -> float | None:
  """The log-likelihood a stored response holds; None when the row is not one."""
  value = response.get("loglik") if isinstance(response, dict) else None
  return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class CachedAnnotator:
  """The Annotator interface over `annotator` and `cache`, for one `task`: answers stored under the
  annotator's fingerprint, the task, the chat, the answer scored and the decoding come from the cache;
  the others (each distinct one once) go to `annotator` in one call and are stored, one transaction
  per call. `hits` counts the requests answered without the model (stored, or equal to an earlier one
  of the same call), `misses` those it was asked; `unreadable` those of the misses whose stored row
  did not read back as an answer (asked again and overwritten). Pickles with its annotator and cache."""

  def __init__(self, annotator: Annotator, cache: AnnotationCache, task: str):
    self.annotator, self.cache, self.task = annotator, cache, task
    self.hits = self.misses = self.unreadable = 0

  @property
  def fingerprint(self) -> str:
    return self.annotator.fingerprint

  def generate(self, chats: Sequence[Chat], decoding: Decoding) -> list[Generation]:
    requests = [request_of("generate", chat, decoding=decoding) for chat in chats]

    def ask(indices: list[int]) -> list[dict[str, Any]]:
      out = self.annotator.generate([chats[i] for i in indices], decoding)
      check_count("generations", out, len(indices))
      return [{"text": g.text, "finished": bool(g.finished), **({"error": g.error} if g.error else {})} for g in out]

    return self._answer(requests, ask, generation_of)

  def log_likelihoods(self, chats: Sequence[Chat], answers: Sequence[str]) -> list[float]:
    if len(chats) != len(answers):
      raise ValueError(f"log_likelihoods takes one answer per chat, got {len(chats)} chats and {len(answers)} answers")
    requests = [request_of("loglik", chat, answer) for chat, answer in zip(chats, answers)]

    def ask(indices: list[int]) -> list[dict[str, Any]]:
      out = self.annotator.log_likelihoods([chats[i] for i in indices], [answers[i] for i in indices])
      check_count("log-likelihoods", out, len(indices))
      return [{"loglik": float(x)} for x in out]

    return self._answer(requests, ask, loglik_of)

  def _answer(self, requests: list[dict[str, Any]], ask, read: Callable[[Any], Any]) -> list[Any]:
    """The answer of each request, as `read` makes it of a response: stored ones, and the others
    (each distinct one once, and those whose row `read` cannot make an answer of) from `ask`."""
    fingerprint = self.fingerprint
    keys = [cache_key(fingerprint, self.task, r) for r in requests]
    found = {k: read(r) for k, r in self.cache.get_many(keys).items()}
    bad = [k for k, v in found.items() if v is None]
    for k in bad:
      del found[k]
    if bad:
      self.unreadable += len(bad)
      log.warning(
          "annotation cache %s: %d stored answers do not read back as answers (the first: key %s): asked again "
          "and overwritten", self.cache.path, len(bad), bad[0],
      )
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
      if key not in found:
        first.setdefault(key, i)
    todo = list(first.values())  # each missing request once, in order
    if todo:
      responses = ask(todo)
      # A failed request (an error, no answer) is returned but not stored: the next build asks again.
      kept = [(i, r) for i, r in zip(todo, responses) if not (isinstance(r, dict) and r.get("error"))]
      self.cache.put_many([(keys[i], fingerprint, self.task, requests[i], r) for i, r in kept], replace=bad)
      found.update((keys[i], read(r)) for i, r in zip(todo, responses))
    self.misses += len(todo)
    self.hits += len(keys) - len(todo)
    return [found[k] for k in keys]
