"""Writes raw/: three CPU-sized studies made from Debian's English package descriptions.

    python experiments/debian/make_data.py [--out experiments/debian/raw] [--seed 0] [--per_study 3000]

Needs apt's English description lists (`apt-get update -o Acquire::Languages=en`, as root) and, for
.lz4 lists, the `lz4` command (package lz4); without them it says so and exits with status 2.
Each study is one folder of JSONL in a schema the data builder detects per record:

    summarisation/descriptions.jsonl   {"id", "document": long description, "summary": synopsis}
    classification/descriptions.jsonl  {"id", "text": synopsis + long description, "label": section, "labels": [...]}
    cloze/descriptions.jsonl           {"id", "text": a sentence with one word as "____", "answer", "choices": [4 words]}

Packages whose long description is the same as an earlier one's (e.g. foo, foo-data, foo-doc) are
kept once, and only long descriptions of MIN_WORDS..MAX_WORDS words are used, so a prompt and its
answer fit in about 256 tokens. Classification takes at most per_study // len(SECTIONS) packages
from each of SECTIONS, which are frequent sections whose packages differ in what they are for.

Cloze: the blanked word is one of VOCAB_SIZE frequent content words of the descriptions (the most
common lowercase words of 4+ letters that are not function words), and the 3 distractors are other
answers of the study, drawn in proportion to how often each is an answer (see `cloze`). Frequent words were chosen over rare ones because a small model sees each
of them in many contexts during training, so the blank is guessable from the sentence (and the
choices are all words of the same register, so none is ruled out by form alone). Only a word that
occurs once in its sentence is blanked (otherwise the other occurrence gives it away), and
distractors never occur in the sentence. One sentence per package, each distinct sentence once.
Everything is drawn with random.Random seeded from --seed and the study name: same lists and
seed, same files.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import random
import re
import sys
from typing import Sequence

import packages

HERE = pathlib.Path(__file__).resolve().parent
MIN_WORDS, MAX_WORDS = 20, 120
SECTIONS = ("doc", "fonts", "games", "libdevel", "net", "python", "science", "sound")
BLANK = "____"
NUM_CHOICES = 4
VOCAB_SIZE = 300
SENTENCE_WORDS = (8, 40)
STOP_WORDS = frozenset("""
about above after again against also although among another back been before being below between
both cannot come could does doing done down during each either else even ever every first from
further have having here however http https into just last less like many more most much must
near need next none once only other others otherwise over same should since some such than that
their them then there these they this those though through thus under until upon very want well
were what when where whether which while will with within without would your yours
""".split())
_WORD = re.compile(r"(?<![\w'-])[a-z]+(?![\w'-])")  # a whole lowercase word, not part of a compound
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


# --- study records (pure) -----------------------------------------------------------------------

def word_count(text: str) -> int:
  return len(text.split())


def unique_descriptions(pkgs: Sequence[packages.Package]) -> list[packages.Package]:
  """Packages with a synopsis and a long description of MIN_WORDS..MAX_WORDS words, the first
  package (by name) of each distinct long description only."""
  seen, kept = set(), []
  for p in pkgs:
    if not p.synopsis or p.description in seen or not MIN_WORDS <= word_count(p.description) <= MAX_WORDS:
      continue
    seen.add(p.description)
    kept.append(p)
  return kept


def summarisation(pkgs: Sequence[packages.Package], n: int, seed: int) -> list[dict]:
  rng = random.Random(f"{seed}:summarisation")
  eligible = [p for p in pkgs if word_count(p.synopsis) >= 2]
  chosen = sorted(rng.sample(eligible, min(n, len(eligible))), key=lambda p: p.name)
  return [{"id": f"debian-summary-{p.name}", "document": p.description, "summary": p.synopsis} for p in chosen]


def classification(pkgs: Sequence[packages.Package], n: int, seed: int, sections: Sequence[str] = SECTIONS) -> list[dict]:
  rng = random.Random(f"{seed}:classification")
  per_section = max(1, n // len(sections))
  labels = sorted(sections)
  chosen = []
  for section in labels:
    pool = [p for p in pkgs if p.section == section]
    chosen += rng.sample(pool, min(per_section, len(pool)))
  chosen.sort(key=lambda p: p.name)
  return [{"id": f"debian-section-{p.name}", "text": f"{p.synopsis}\n\n{p.description}", "label": p.section, "labels": labels} for p in chosen]


def sentences(text: str) -> list[str]:
  """A plain-text description -> its sentences (a line is never joined to the next)."""
  return [s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip()]


def is_sentence(text: str) -> bool:
  """A cloze sentence: SENTENCE_WORDS words, starting with a capital or a digit, ending in . ! or ?"""
  return SENTENCE_WORDS[0] <= word_count(text) <= SENTENCE_WORDS[1] and (text[0].isupper() or text[0].isdigit()) and text[-1] in ".!?"


def vocabulary(texts: Sequence[str], size: int = VOCAB_SIZE) -> list[str]:
  """The `size` lowercase content words (4+ letters, not in STOP_WORDS) found in the most texts,
  sorted alphabetically."""
  df: collections.Counter = collections.Counter()
  for text in texts:
    df.update({w for w in _WORD.findall(text) if len(w) >= 4 and w not in STOP_WORDS})
  top = sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
  return sorted(w for w, _ in top)


def blank(sentence: str, vocab: set[str] | frozenset[str], rng: random.Random) -> tuple[str, str] | None:
  """(sentence with one vocabulary word replaced by BLANK, that word), or None when no vocabulary
  word occurs exactly once as a whole word, or the sentence holds an underscore already."""
  if "_" in sentence:
    return None
  matches = list(_WORD.finditer(sentence))
  counts = collections.Counter(m.group() for m in matches)
  candidates = [m for m in matches if m.group() in vocab and counts[m.group()] == 1]
  if not candidates:
    return None
  m = rng.choice(candidates)
  return sentence[:m.start()] + BLANK + sentence[m.end():], m.group()


def choices(
    answer: str, vocab: Sequence[str], rng: random.Random, exclude: set[str] = frozenset(), k: int = NUM_CHOICES,
    weights: dict[str, int] | None = None,
) -> list[str]:
  """`k` distinct words: the answer at a random place and k - 1 distractors from `vocab` (sorted
  for determinism), none of them in `exclude`; drawn in proportion to `weights` when given."""
  pool = sorted(set(vocab) - {answer} - set(exclude))
  if weights is not None:
    pool = [w for w in pool if weights.get(w, 0) > 0]
  if len(pool) < k - 1:
    raise ValueError(f"a vocabulary of {len(pool)} words cannot give {k - 1} distractors")
  if weights is None:
    picked = rng.sample(pool, k - 1)
  else:
    picked = rng.sample(pool, k - 1, counts=[weights[w] for w in pool])
    while len(set(picked)) < k - 1:  # a frequent word drawn twice: draw again
      picked = rng.sample(pool, k - 1, counts=[weights[w] for w in pool])
  picked.insert(rng.randrange(k), answer)
  return picked


def cloze(pkgs: Sequence[packages.Package], n: int, seed: int, vocab_size: int = VOCAB_SIZE) -> list[dict]:
  """One blanked sentence per package, then 3 distractors each, drawn in proportion to how often each
  word is an answer: so every word is a distractor about as often as it is the gold, and knowing which
  words are frequent answers does not pick the gold (drawn uniformly instead, the most frequent answer
  among the choices would be right half the time)."""
  rng = random.Random(f"{seed}:cloze")
  vocab = vocabulary([p.description for p in pkgs], vocab_size)
  vocab_set = frozenset(vocab)
  order = list(pkgs)
  rng.shuffle(order)
  seen, blanked = set(), []
  for p in order:
    if len(blanked) >= n:
      break
    pool = [s for s in sentences(p.description) if is_sentence(s) and s not in seen]
    rng.shuffle(pool)
    for sentence in pool:
      made = blank(sentence, vocab_set, rng)
      if made is not None:
        seen.add(sentence)
        blanked.append((p.name, sentence, *made))
        break
  answers = collections.Counter(answer for *_, answer in blanked)
  out = []
  for name, sentence, text, answer in blanked:
    try:
      options = choices(answer, vocab, rng, exclude=set(_WORD.findall(sentence)), weights=answers)
    except ValueError:  # too few answer words outside this sentence (only in tiny lists)
      continue
    out.append({"id": f"debian-cloze-{name}", "text": text, "answer": answer, "choices": options})
  return sorted(out, key=lambda r: r["id"])


# --- files ------------------------------------------------------------------------------------

def write_jsonl(path: pathlib.Path, rows: Sequence[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def pretrain_texts(pkgs: Sequence[packages.Package], studies: dict[str, list[dict]], n: int, seed: int) -> list[dict]:
  """Synopsis and long description of `n` packages that no study uses, as text records for a
  pretraining phase: the model learns the language of descriptions before SFT, and no study's
  answer comes with them. Descriptions holding a cloze sentence (blank filled) are left out too,
  since common sentences ("This package contains the documentation.") recur across packages."""
  used = {r["id"].split("-", 2)[2] for rows in studies.values() for r in rows}  # "debian-<study>-<package>"
  filled = {r["text"].replace(BLANK, r["answer"]) for r in studies.get("cloze", [])}
  pool = [p for p in pkgs if p.name not in used and not filled.intersection(sentences(p.description))]
  rng = random.Random(f"{seed}:pretrain")
  chosen = sorted(rng.sample(pool, min(n, len(pool))), key=lambda p: p.name)
  return [{"id": f"debian-text-{p.name}", "text": f"{p.synopsis}\n\n{p.description}"} for p in chosen]


def make(pkgs: Sequence[packages.Package], out: pathlib.Path, seed: int, per_study: int, pretrain: int = 0) -> dict[str, list[dict]]:
  """Writes each study's descriptions.jsonl, and with `pretrain` > 0 the same pretrain.jsonl of
  that many other packages' descriptions into every study folder."""
  usable = unique_descriptions(pkgs)
  studies = {
      "summarisation": summarisation(usable, per_study, seed),
      "classification": classification(usable, per_study, seed),
      "cloze": cloze(usable, per_study, seed),
  }
  texts = pretrain_texts(usable, studies, pretrain, seed) if pretrain else []
  for name, rows in studies.items():
    write_jsonl(out / name / "descriptions.jsonl", rows)
    if texts:
      write_jsonl(out / name / "pretrain.jsonl", texts)
  studies["pretrain"] = texts
  return studies


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", type=pathlib.Path, default=HERE / "raw")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--per_study", type=int, default=3000, help="records per study (classification: split evenly over its sections)")
  parser.add_argument("--pretrain", type=int, default=8000, help="descriptions of other packages, as pretraining text (0: none)")
  parser.add_argument("--lists_dir", type=pathlib.Path, default=None, help="apt's lists directory (default: from apt-config, else /var/lib/apt/lists)")
  args = parser.parse_args(argv)
  try:
    pkgs, counts = packages.load(args.lists_dir)
  except packages.ListsError as err:
    print(f"make_data.py: {err}", file=sys.stderr)
    return 2
  studies = make(pkgs, args.out, args.seed, args.per_study, args.pretrain)
  print(f"read {counts['translation_stanzas']} descriptions from {counts['translation_lists']} Translation-en lists and "
        f"{counts['packages_stanzas']} stanzas from {counts['packages_lists']} Packages lists: "
        f"{counts['packages']} packages, {counts['with_section']} with a section")
  texts = studies.pop("pretrain")
  for name, rows in studies.items():
    print(f"{name}: {len(rows)} records -> {args.out / name / 'descriptions.jsonl'}")
  print(f"pretraining text: {len(texts)} other packages' descriptions -> <study>/pretrain.jsonl")
  labels = collections.Counter(r["label"] for r in studies["classification"])
  print("classification labels: " + ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))
  answers = collections.Counter(r["answer"] for r in studies["cloze"])
  print(f"cloze answers: {len(answers)} distinct words, most common " + ", ".join(f"{k} {v}" for k, v in answers.most_common(5)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
