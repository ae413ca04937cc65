"""The data build's fast paths decide exactly as the slow paths they stand in for: ftfy skipped on text it
cannot change, alphanumeric counting by regex, language identification batched and on a float32 table, the
decontamination index's first-word filter, and cheap stages kept out of worker processes."""

import collections
import mmap
import multiprocessing
import sys

import ftfy
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sft.databuilder import clean, decontaminate, language_id, quality, records, runner_local

# Printable ASCII and the characters around the fast path's edges: "&" (entities), "\r", escape and
# other control characters, Latin-1 mojibake, curly quotes, a ligature, full-width letters, a surrogate.
EDGES = "&;#\r\x1b\x00\x07\x0b\x0c\x7f\x85\u00a0\u00c3\u00a9\u00e2\u20ac\u2122\u201c\u2019\ufb01\uff21\u2028\ufeff"
TEXTS = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from(list("\t\n" + EDGES)), max_size=80)


@settings(max_examples=400, deadline=None)
@given(TEXTS, st.sampled_from(["NFC", "NFD", "NFKC", "NFKD"]))
@example("caf\u00c3\u00a9 &amp; more", "NFC")
@example("line\r\nbreak \x1b[31mred\x1b[0m", "NFC")
@example("plain text, nothing to fix.\n\tIndented.", "NFKC")
def test_ftfy_fast_path_matches_ftfy(text, form):
  assert clean.fix_unicode(text, form) == ftfy.fix_text(text, normalization=form)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=80))
def test_ftfy_leaves_what_the_fast_path_skips(text):
  if clean._FTFY_UNCHANGED.fullmatch(text):
    assert ftfy.fix_text(text) == text
  else:  # the pattern only lets through text without "&", "\r" or control characters
    assert set(text) & set("&\r" + "".join(map(chr, [*range(0, 9), *range(11, 32), 127])))


def test_alnum_pattern_is_isalnum_on_every_code_point():
  chars = "".join(map(chr, range(sys.maxunicode + 1)))
  by_pattern = {m.start() for m in quality._ALNUM.finditer(chars)}
  assert by_pattern == {i for i, c in enumerate(chars) if c.isalnum()}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.integers(-1, 12))
def test_has_alnum_counts_as_isalnum_does(text, n):
  assert quality._has_alnum(text, n) == (sum(c.isalnum() for c in text) >= n)


@pytest.fixture(scope="module")
def stock_identifier():
  from py3langid.langid import MODEL_FILE, LanguageIdentifier

  return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


LANGUAGE_TEXTS = st.text(max_size=200) | st.lists(st.sampled_from("the of and water mountain über été вода 水 مياه 12 , . ß İ".split()), max_size=60).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(LANGUAGE_TEXTS)
@example("The river carved the valley over many years.")
@example("")
@example("SHOUTED TEXT IS LOWERED FIRST")
@example("lone \ud800 surrogate")
def test_batched_walk_counts_what_py3langid_counts(stock_identifier, text):
  from py3langid.langid import visit_counts

  data = stock_identifier._encode(text)
  [(ids, counts)] = language_id.feature_counts([data], language_id.model())
  stock = visit_counts(stock_identifier.tk_nextmove, stock_identifier._rowbase, stock_identifier.tk_output, data) or {}
  assert list(zip(ids.tolist(), counts.tolist())) == list(stock.items())  # the same features in first-seen order


@settings(max_examples=60, deadline=None)
@given(st.lists(LANGUAGE_TEXTS, max_size=12), st.integers(1, 5))
@example(["The river carved the valley over many years.", "", "Le fleuve a creusé la vallée.", "水"], 2)
def test_languages_bit_for_bit_as_py3langid_in_any_batch(stock_identifier, texts, batch):
  """Each text's language and probability are py3langid's own, to the bit, whatever its batch mates."""
  expected = [stock_identifier.classify(t) for t in texts]
  assert language_id.identify(texts, batch=batch) == expected
  assert [quality.identify_language(t) for t in texts] == expected


def _mapped(array):
  """Whether the array's memory is a file mapped by np.load (some base of it is the mmap)."""
  while array is not None and not isinstance(array, mmap.mmap):
    array = getattr(array, "base", None)
  return array is not None


def test_the_cached_model_is_the_derived_one_and_a_broken_cache_is_rebuilt(tmp_path, monkeypatch):
  monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path))
  derived = language_id._derive()
  language_id.model.cache_clear()
  try:
    first = language_id.model()  # derives and writes the cache
    (folder,) = tmp_path.iterdir()
    language_id.model.cache_clear()
    cached = language_id.model()
    assert _mapped(cached.table)  # read from the files this time
    for m in (first, cached):
      assert m._replace(**dict.fromkeys(language_id._ARRAYS)) == derived._replace(**dict.fromkeys(language_id._ARRAYS))
      for name in language_id._ARRAYS:
        got, want = getattr(m, name), getattr(derived, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    (folder / "table.npy").write_bytes((folder / "table.npy").read_bytes()[:1000])  # truncated
    language_id.model.cache_clear()
    assert np.array_equal(language_id.model().table, derived.table) and not _mapped(language_id.model().table)
    language_id.model.cache_clear()
    assert _mapped(language_id.model().table)  # rewritten whole
  finally:
    language_id.model.cache_clear()


def test_automaton_depth_bounds_every_state():
  """The walk's window: no state stands for a longer string than `depth` bytes (checked from the model)."""
  m = language_id.model()
  assert m.depth == 6
  data = bytes(range(256)) * 3 + "вода 水 مياه".encode() * 4
  windowed = language_id.feature_counts([data], m)
  step_by_step = language_id.feature_counts([data], m._replace(depth=len(data) + 1))
  assert [a.tolist() for a in windowed[0]] == [b.tolist() for b in step_by_step[0]]


VOCAB = "the a river valley carved over many years stone water cold north".split()
WORDS = st.lists(st.sampled_from(VOCAB), max_size=30).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(WORDS, min_size=1, max_size=4), WORDS, WORDS, st.sampled_from([1, 3]))
def test_first_words_filter_finds_what_the_full_scan_finds(eval_texts, prompt, answer, min_words):
  index = decontaminate.build_index([(f"eval:{i}", t) for i, t in enumerate(eval_texts)], n=5, min_words=min_words, exact_min_words=2)
  full_scan = {k: v for k, v in index.items() if k != "heads"}
  record = records.chat("x:1", "x", [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
  text = records.contents(record)
  assert decontaminate.find_overlap(text, index) == decontaminate.find_overlap(text, full_scan)
  tokens = decontaminate.words(text)
  assert decontaminate.find_exact(record, index, decontaminate.message_words(record)) == decontaminate.find_exact(record, index)
  assert [w for seq in decontaminate.message_words(record) for w in seq] == tokens
  assert decontaminate.decontaminate_record(record, index) == decontaminate.decontaminate_record(record, full_scan)


def _normalize_whitespace_in_full(text):
  lines = [clean._SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
  return clean._BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


SPACES = st.text(alphabet=st.sampled_from(list("ab .\n\r\t\x0b\x0c\x1c\x85\u00a0\u2000\u200b\u2028\u3000")), max_size=40)


@settings(max_examples=500, deadline=None)
@given(SPACES)
@example("a\n\nb")
@example("a \u200b\nb")
def test_whitespace_fast_path_matches_the_full_normalisation(text):
  assert clean.normalize_whitespace(text) == _normalize_whitespace_in_full(text)


# Greek capital sigma lowercases by its neighbours (final or not): a newline between texts must end that context.
SIGMA_TEXTS = st.text(alphabet=st.sampled_from(list("ΣσςΑα'.\u0345\u00ad a1_\n")), max_size=12)
# Prompts that the answer repeats, in part or whole, and turns that differ only by case or punctuation.
REPEATS = st.sampled_from(["Say it: the cold north water.", "the cold north water", "THE COLD, NORTH WATER!", "x"])


@settings(max_examples=500, deadline=None)
@given(st.lists(SIGMA_TEXTS | REPEATS, min_size=1, max_size=4))
@example(["ΑΣ", "Σα"])
@example(["the cold north water", "THE COLD, NORTH WATER!"])
def test_words_of_the_turns_are_the_words_of_the_whole_text(turns):
  record = records.chat("x:1", "x", [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)])
  per_turn = decontaminate.message_words(record)
  assert [w for seq in per_turn for w in seq] == decontaminate.words(records.contents(record))
  messages = record["messages"]
  last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
  prompt = "\n".join(m["content"] for m in messages[:last] if m["role"] == "user")
  texts = [records.contents(record), prompt, *(m["content"] for m in messages)]  # each normalised on its own
  expected = list(dict.fromkeys(t for t in map(decontaminate.normalise, texts) if t))
  assert decontaminate.exact_texts(record, eval_side=False, per_message=per_turn) == expected
  if any(m["role"] == "assistant" for m in messages):  # the SFT rules compare the same words
    sft = {"min_response_alnum_chars": 1, "refusal_patterns": list(quality.REFUSALS)}
    assert quality.sft_rules(record, sft, per_turn) == quality.sft_rules(record, sft)


def test_workers_pay_for_costly_items_only():
  # 500 items timed in a worker: 1 ms of work and 5 ms to pickle them (format, measure) -> here;
  # 150 ms of work (clean, filter, decontaminate) -> workers; work that costs less than its transfer -> here.
  assert not runner_local._workers_pay(0.001, 0.005, 500, 100_000, 2)
  assert runner_local._workers_pay(0.150, 0.005, 500, 100_000, 2)
  assert not runner_local._workers_pay(0.150, 0.100, 500, 500, 2)


def _double(x):
  return [x, -x]


_EVENTS = []  # what the fake pool below and the stage function saw, in order


def _double_chunk(chunk):
  _EVENTS.append("chunk")
  return [y for x in chunk for y in _double(x)]


def test_cheap_stage_runs_here_in_order_after_its_trial_in_a_worker(monkeypatch):
  """The first chunk runs in a worker, timed; a cheap stage runs the rest here, and the workers stay up
  for the build's later stages until the runner closes."""
  events = _EVENTS
  events.clear()

  class Pool:
    def __init__(self, *args, **kwargs):
      events.append("workers started")

    def apply(self, fn, args):
      events.append("trial in a worker")
      return fn(*args)

    def imap(self, *args):
      raise AssertionError("a cheap stage sent its other chunks to worker processes")

    def terminate(self):
      events.append("workers stopped")

    def join(self):
      pass

  monkeypatch.setattr(multiprocessing, "get_context", lambda method: type("Context", (), {"Pool": Pool}))
  monkeypatch.setattr(runner_local, "_workers_pay", lambda *args: False)  # (its own test is above)
  double = _double_chunk
  items = list(range(runner_local._MIN_PARALLEL + 1234))
  with runner_local.LocalRunner(2, progress=False) as runner:
    out = runner.map_chunks(items, double, "cheap")
    assert out == [y for x in items for y in _double(x)]
    again = runner.map_chunks(items, double, "cheap again")
  assert again == out
  assert events[:4] == ["workers started", "trial in a worker", "chunk", "chunk"]
  assert events.count("workers started") == 1 and events[-1] == "workers stopped"


def test_costly_stages_go_to_the_same_workers_in_order(monkeypatch):
  used = collections.Counter()
  spawn = multiprocessing.get_context("spawn")

  def counting(method):
    used[method] += 1
    return spawn

  monkeypatch.setattr(multiprocessing, "get_context", counting)
  monkeypatch.setattr(runner_local, "_workers_pay", lambda *args: True)
  items = list(range(runner_local._MIN_PARALLEL))
  with runner_local.LocalRunner(2, progress=False) as runner:
    out = runner.flat_map(items, _double, "costly")
    again = runner.flat_map(out, _double, "costly again")
    assert runner._workers is not None
  assert out == [y for x in items for y in _double(x)] and used == {"spawn": 1}
  assert again == [z for y in out for z in _double(y)] and runner._workers is None


def _facts(n):
  langs = ("en", "fr", "not judged (short)")
  kept = [{"id": f"k{i}", "source": "s", "kind": "chat", "chars": 10 + i, "words": 2 + i % 7, "split": "train", "lang": langs[i % 3]} for i in range(n)]
  dropped = [{"id": f"d{i}", "source": "s", "kind": "chat", "chars": 5, "words": 1, "stage": "filter", "reason": "r"} for i in range(n // 3)]
  return kept + dropped


def test_plots_drawn_in_a_second_process_are_the_plots_drawn_here(tmp_path):
  from sft.databuilder import report

  facts = _facts(60)
  report.draw_plots(tmp_path / "here" / "plots", report.plot_jobs(facts))
  background = report.BackgroundPlots(tmp_path / "there", facts)
  background.wait()
  here = {p.name: p.read_bytes() for p in (tmp_path / "here" / "plots").iterdir()}
  assert len(here) == 6 and here == {p.name: p.read_bytes() for p in (tmp_path / "there" / "plots").iterdir()}
  killed = report.BackgroundPlots(tmp_path / "killed", facts)
  killed.process.kill()
  killed.wait()  # the second process died: drawn here instead
  assert here == {p.name: p.read_bytes() for p in (tmp_path / "killed" / "plots").iterdir()}


DEDUP = {"num_perm": 16, "bands": 4, "rows": 4, "shingle_size": 2, "threshold": 0.7, "seed": 1}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=12), st.lists(st.integers(1, 11), max_size=4))
def test_fingerprints_prepared_in_chunks_and_unpacked_are_those_of_the_whole(pairs, cuts):
  """The clean/filter/decontaminate stage attaches each record's fingerprints, packed, chunk by chunk
  (in workers); near dedup unpacks them all."""
  from sft.databuilder import dedup

  batch = [records.chat(f"x:{i}", "x", [{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for i, (q, a) in enumerate(pairs)]
  bounds = sorted({0, len(batch), *(c for c in cuts if c < len(batch))})
  ready = [r for a, b in zip(bounds, bounds[1:]) for r in dedup.prepared(batch[a:b], {**DEDUP, "exact": True, "near": True})]
  got, whole = dedup.unpacked([r[dedup.PREPARED][1] for r in ready], DEDUP["num_perm"]), dedup.fingerprints(batch, DEDUP)
  for name in whole._fields:
    if name in ("shingles", "answer_words"):
      assert all(np.array_equal(x, y) for x, y in zip(getattr(got, name), getattr(whole, name))), name
    else:
      assert np.array_equal(getattr(got, name), getattr(whole, name)), name
  assert [dedup.exact_key(r) for r in ready] == [dedup.exact_key(r) for r in batch]
  assert [dedup.unprepared(r) for r in ready] == batch


def _top_ngram_in_full(words, n):
  grams = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
  if not grams:
    return 0.0
  gram, count = grams.most_common(1)[0]
  return count * sum(len(w) for w in gram) / max(sum(len(w) for w in words), 1)


def _duplicated_ngrams_in_full(words, n):
  seen, covered = set(), [False] * len(words)
  for i in range(len(words) - n + 1):
    gram = tuple(words[i:i + n])
    if gram in seen:
      covered[i:i + n] = [True] * n
    seen.add(gram)
  return sum(len(w) for w, c in zip(words, covered) if c) / max(sum(len(w) for w in words), 1)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["a", "bb", "ccc", "a", "dddd", ""]), max_size=40), st.integers(1, 10))
def test_gopher_ngram_fractions_match_the_plain_loops(words, n):
  total = sum(map(len, words))
  assert quality._top_ngram_char_fraction(words, n, total) == _top_ngram_in_full(words, n)
  assert quality._duplicated_ngram_char_fraction(words, n, total) == _duplicated_ngrams_in_full(words, n)


PHONE_TEXTS = st.lists(st.sampled_from(list("0123456789+-()./ x#ext:;,\n\u0661\uff11") + ["tel ", " 2.0 ", "+49", "+683", "011"]), max_size=30).map("".join)


@settings(max_examples=400, deadline=None)
@given(PHONE_TEXTS, st.sampled_from(["US", "DE", "GB", "NU", ""]), st.sampled_from(clean.PHONE_LENIENCIES))
@example("call +49 30 12 or 030 1234", "DE", "possible")
@example("tel +683 4002, v2.0", "", "possible")
def test_phone_matcher_skipping_short_candidates_finds_what_phonenumbers_finds(text, region, leniency):
  import phonenumbers

  level = getattr(phonenumbers.Leniency, leniency.upper())
  found = phonenumbers.PhoneNumberMatcher(text, region or None, level, max_tries=sys.maxsize)
  expected = [(m.start, m.end) for m in found if not clean._is_year_range(m.raw_string)]
  assert clean._phone_spans(text, region, leniency) == expected
  assert all(sum(map(str.isdecimal, text[a:b])) >= clean.min_phone_digits(region or None) for a, b in expected)
