"""experiments/debian: apt's description lists -> summarisation, classification and cloze records."""

import json
import pathlib
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments" / "debian"))

import make_data  # noqa: E402
import packages  # noqa: E402

LONG = " ".join(f"word{i}" for i in range(25))
TRANSLATION = f"""Package: alpha
Description-md5: aaa
Description-en: Alpha game of strategy
 Alpha is a turn-based game where players build cities and fight their
 neighbours.
 .
 This package contains the main program. {LONG}

Package: beta
Description-md5: bbb
Description-en: network client for beta
 Beta talks to servers over the network. It provides:
  * a command-line client
    with colours
  * a library
 .
 The library is used by other programs. {LONG}

Package: gamma
Description-md5: ggg
Description-en: gamma with no long description

Package: beta
Description-md5: bbb-old
Description-en: old beta description
 An older text of beta.
"""
PACKAGES = """Package: alpha
Version: 1.0
Section: games
Description: Alpha game of strategy
Description-md5: aaa

Package: beta
Section: contrib/net
Description-md5: bbb
Tag: role::program,
 use::network

Package: gamma
Section: non-free/utils
Description-md5: other
"""


def _pkgs():
  return packages.join(packages.parse_stanzas(TRANSLATION), packages.parse_stanzas(PACKAGES))


def test_parse_stanzas_keeps_continuations_and_paragraphs():
  stanzas = list(packages.parse_stanzas(TRANSLATION))
  assert [s["Package"] for s in stanzas] == ["alpha", "beta", "gamma", "beta"]
  value = stanzas[0]["Description-en"]
  assert value.split("\n")[:4] == ["Alpha game of strategy", " Alpha is a turn-based game where players build cities and fight their", " neighbours.", " ."]
  synopsis, lines = packages.split_description(value)
  assert synopsis == "Alpha game of strategy"
  assert packages.plain_text(lines) == f"Alpha is a turn-based game where players build cities and fight their neighbours.\n\nThis package contains the main program. {LONG}"
  tags = list(packages.parse_stanzas(PACKAGES))[1]["Tag"]
  assert tags == "role::program,\n use::network"


def test_plain_text_lists_one_item_per_line():
  _, lines = packages.split_description(list(packages.parse_stanzas(TRANSLATION))[1]["Description-en"])
  assert packages.plain_text(lines).split("\n\n")[0] == "Beta talks to servers over the network. It provides:\n* a command-line client with colours\n* a library"
  assert packages.plain_text([" .", " one", " .", " .", " two"]) == "one\n\ntwo"
  assert packages.plain_text([]) == ""


def test_sections_keep_last_part():
  assert packages.last_section("contrib/net") == "net"
  assert packages.last_section("non-free-firmware/kernel") == "kernel"
  assert packages.last_section("games") == "games"


def test_join_by_md5_then_name_one_per_package():
  by_name = {p.name: p for p in _pkgs()}
  assert sorted(by_name) == ["alpha", "beta", "gamma"]
  assert by_name["alpha"].section == "games"
  assert by_name["beta"].section == "net" and by_name["beta"].synopsis == "network client for beta"  # the md5 match wins
  assert by_name["gamma"].section == "utils" and by_name["gamma"].description == ""  # joined by name
  # the md5 match is kept even when a stale translation of the package comes first
  stale_first = TRANSLATION.split("Package: gamma")[0].replace("alpha", "zeta")
  stanzas = list(packages.parse_stanzas(TRANSLATION))[3:] + list(packages.parse_stanzas(stale_first))
  beta = [p for p in packages.join(stanzas, packages.parse_stanzas(PACKAGES)) if p.name == "beta"][0]
  assert beta.synopsis == "network client for beta"
  # no Packages list: kept, without a section
  assert {p.section for p in packages.join(packages.parse_stanzas(TRANSLATION), [])} == {""}


def test_lists_dir_from_apt_config():
  dump = 'Dir "/";\nDir::State "var/lib/apt";\nDir::State::lists "lists/";\nDir::Cache "var/cache/apt";\n'
  assert packages.lists_dir_from_config(dump) == pathlib.Path("/var/lib/apt/lists")
  assert packages.lists_dir_from_config('Dir "/chroot/";\nDir::State "/srv/apt";\nDir::State::lists "l";\n') == pathlib.Path("/srv/apt/l")
  assert packages.lists_dir_from_config("APT::Architecture \"amd64\";\n") is None


NOUNS = ("library", "server", "client", "editor", "format", "image", "sound", "font", "network", "window", "terminal")


def _many(n=40):
  """n packages in two sections with distinct long descriptions of 20+ words."""
  out = []
  for i in range(n):
    section = "games" if i % 2 else "net"
    w = [NOUNS[(i * k) % len(NOUNS)] for k in (1, 3, 7)]
    body = f"Package number {i} is a useful {w[0]} that works with the {w[1]} and the {w[2]} of any kind. Written in C, it is small and quick to start. Unique {i}."
    out.append(packages.Package(f"pkg{i:02d}", f"synopsis of package {i}", body, section))
  return out


def test_study_records_have_their_schema():
  pkgs = make_data.unique_descriptions(_many())
  summary = make_data.summarisation(pkgs, 10, seed=0)
  assert len(summary) == 10 and all(set(r) == {"id", "document", "summary"} for r in summary)
  assert len({r["id"] for r in summary}) == 10
  labelled = make_data.classification(pkgs, 10, seed=0, sections=("games", "net"))
  assert len(labelled) == 10 and all(set(r) == {"id", "text", "label", "labels"} for r in labelled)
  assert all(r["label"] in r["labels"] and r["labels"] == ["games", "net"] for r in labelled)
  assert sorted(r["label"] for r in labelled).count("games") == 5  # balanced
  cloze = make_data.cloze(pkgs, 10, seed=0, vocab_size=20)
  assert cloze and all(set(r) == {"id", "text", "answer", "choices"} for r in cloze)
  for r in cloze:
    assert r["text"].count("____") == 1 and r["choices"].count(r["answer"]) == 1 and len(set(r["choices"])) == 4
    assert r["text"].replace("____", r["answer"]) in {s for p in pkgs for s in make_data.sentences(p.description)}


def test_pretraining_texts_hold_no_study_package_and_no_cloze_sentence():
  pkgs = make_data.unique_descriptions(_many(60))
  first = make_data.sentences(pkgs[7].description)[0]
  word = first.split()[5]
  studies = {
      "summarisation": make_data.summarisation(pkgs, 10, seed=0),
      "cloze": [{"id": f"debian-cloze-{pkgs[7].name}", "text": first.replace(word, "____", 1), "answer": word, "choices": [word, "x"]}],
  }
  copy = packages.Package("copycat", "a synopsis", pkgs[7].description.replace("Unique 7.", "Other."), "net")
  texts = make_data.pretrain_texts([*pkgs, copy], studies, 1000, seed=0)
  used = {r["id"].split("-", 2)[2] for rows in studies.values() for r in rows}
  names = {r["id"].removeprefix("debian-text-") for r in texts}
  assert all(set(r) == {"id", "text"} for r in texts) and not used & names and "copycat" not in names
  assert len(texts) == len(pkgs) - len(used) and not any(first in r["text"] for r in texts)
  assert make_data.pretrain_texts(pkgs, studies, 5, seed=1) == make_data.pretrain_texts(pkgs, studies, 5, seed=1)


def test_unique_descriptions_bounds_and_duplicates():
  short = packages.Package("short", "s y", "too short", "net")
  twin = packages.Package("twin", "another synopsis", _many(1)[0].description, "net")
  kept = make_data.unique_descriptions([*_many(2), short, twin])
  assert [p.name for p in kept] == ["pkg00", "pkg01"]


def test_sentences_split_on_capitals_only():
  assert make_data.sentences("It runs on 0 A.D. Maps too. e.g. this\n\nNew para! Yes") == ["It runs on 0 A.D.", "Maps too. e.g. this", "New para!", "Yes"]


def test_files_are_deterministic_under_a_seed(tmp_path):
  lists = tmp_path / "lists"
  lists.mkdir()
  stanzas_t, stanzas_p = [], []
  for p in _many(60):
    stanzas_t.append(f"Package: {p.name}\nDescription-md5: m{p.name}\nDescription-en: {p.synopsis}\n {p.description}\n")
    stanzas_p.append(f"Package: {p.name}\nSection: {p.section}\nDescription-md5: m{p.name}\n")
  (lists / "example_dists_x_main_i18n_Translation-en").write_text("\n".join(stanzas_t))
  (lists / "example_dists_x_main_binary-amd64_Packages").write_text("\n".join(stanzas_p))
  (lists / "example_dists_x_main_binary-amd64_Packages.diff_Index").write_text("not a list")

  def run(out, seed):
    assert make_data.main(["--lists_dir", str(lists), "--out", str(out), "--seed", str(seed), "--per_study", "20"]) == 0
    return {s: (out / s / "descriptions.jsonl").read_text() for s in ("summarisation", "classification", "cloze")}

  first, again, other = run(tmp_path / "a", 0), run(tmp_path / "b", 0), run(tmp_path / "c", 1)
  assert first == again and first != other
  assert all(json.loads(line) for text in first.values() for line in text.splitlines())


def test_missing_lists_fail_clearly(tmp_path, capsys):
  empty = tmp_path / "lists"
  empty.mkdir()
  assert make_data.main(["--lists_dir", str(empty), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "apt-get update -o Acquire::Languages=en" in err and "Traceback" not in err
  assert make_data.main(["--lists_dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
  assert "apt-get update -o Acquire::Languages=en" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_missing_lz4_command_fails_clearly(tmp_path, capsys, monkeypatch):
  (tmp_path / "x_i18n_Translation-en.lz4").write_bytes(b"\x04\x22\x4d\x18")
  monkeypatch.setattr(packages.shutil, "which", lambda name: None)
  assert make_data.main(["--lists_dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
  assert "install the lz4 package" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
def test_read_list_plain_and_compressed(tmp_path, suffix):
  import gzip
  import lzma
  data = TRANSLATION.encode()
  packed = {"": data, ".gz": gzip.compress(data), ".xz": lzma.compress(data)}[suffix]
  path = tmp_path / f"x_Translation-en{suffix}"
  path.write_bytes(packed)
  assert packages.read_list(path) == TRANSLATION


_WORDS = st.sampled_from(["the", "library", "tool", "Data", "network", "fast", "server", "a", "files", "x-tool", "it's", "tool_kit", "42"])
_SEP = st.sampled_from([" ", ", ", " (", ") ", "-", "/", ". "])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_WORDS, _SEP), min_size=1, max_size=20), st.integers(0, 2**32 - 1))
def test_blank_fill_round_trip(parts, seed):
  sentence = "".join(w + s for w, s in parts).strip()
  vocab = frozenset({"library", "tool", "network", "server", "files", "fast", "data"})
  rng = random.Random(seed)
  made = make_data.blank(sentence, vocab, rng)
  if made is None:
    words = make_data._WORD.findall(sentence)
    assert "_" in sentence or not [w for w in words if w in vocab and words.count(w) == 1]
    return
  text, answer = made
  assert text.count("____") == 1 and answer in vocab
  assert text.replace("____", answer) == sentence
  options = make_data.choices(answer, sorted(vocab | {"alpha", "beta", "gamma", "delta"}), rng, exclude=set(make_data._WORD.findall(sentence)))
  assert len(options) == 4 and len(set(options)) == 4 and options.count(answer) == 1
  assert all(o == answer or o not in make_data._WORD.findall(sentence) for o in options)


@pytest.mark.parametrize("study, task", [("summarisation", "summarisation"), ("classification", "classification"), ("cloze", "cloze")])
def test_each_study_config_needs_its_data_and_reads_it_as_its_task(tmp_path, monkeypatch, study, task):
  """Without the data, the study's config says how to make it; with it, the config passes the checks,
  and the data builder's readers turn its records into chats of the study's task."""
  import importlib.util

  from sft.config_check import check_config
  from sft.databuilder import readers
  from sft.errors import ConfigError

  path = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "debian" / study / "config.py"
  spec = importlib.util.spec_from_file_location(f"debian_{study}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.setattr(module, "RAW", tmp_path)
  with pytest.raises(ConfigError, match="make_data.py"):
    module.get_config()
  raw = {
      "summarisation": {"id": "s", "document": "Alpha is a game of strategy.", "summary": "strategy game"},
      "classification": {"id": "c", "text": "Alpha is a game.", "label": "games", "labels": ["games", "net"]},
      "cloze": {"id": "z", "text": "Alpha is a ____ of strategy.", "answer": "game", "choices": ["game", "library"]},
  }[study]
  (tmp_path / "descriptions.jsonl").write_text(json.dumps(raw) + "\n")
  config = module.get_config()
  check_config(config)
  assert config.data.build.input_dir == str(tmp_path)
  [record] = readers.read_file(tmp_path / "descriptions.jsonl", "descriptions.jsonl")
  assert record["kind"] == "chat" and record["task"] == task


def test_weighted_distractors_follow_the_answer_frequencies():
  rng = random.Random(0)
  weights = {"package": 50, "library": 10, "tool": 10, "never": 0, "font": 5}
  drawn = [make_data.choices("data", sorted(weights) + ["data"], rng, exclude={"font"}, weights=weights) for _ in range(300)]
  assert all(len(set(c)) == 4 and "data" in c and "never" not in c and "font" not in c for c in drawn)
  with pytest.raises(ValueError, match="cannot give 3 distractors"):
    make_data.choices("data", ["data", "package", "never"], rng, weights=weights)
