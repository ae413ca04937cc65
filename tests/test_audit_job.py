"""The audit job on a real tiny build: a build changed since it was made is refused whatever the change, a
machine review is never silently replaced, and the paths it records are absolute."""

import json
import os
import pathlib
import shutil

import pytest

import sft
from configs import audit as audit_configs
from sft.annotator.base import Generation
from sft.audit import data
from sft.databuilder import build_config, build_dataset
from sft.errors import ConfigError

SHARD = "train-00000-of-00001.jsonl"
ANSWER = "Water them deeply early in the morning, at the base, so the roots get the moisture before the heat."


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """5 kept chats and a refusal dropped."""
  raw = tmp_path_factory.mktemp("raw")
  rows = [{"instruction": f"Explain step {i} of watering tomato plants in a hot dry week?", "output": f"{ANSWER} ({i})"} for i in range(5)]
  rows.append({"instruction": "Tell me a secret about the moon?", "output": "I'm sorry, but as an AI language model I cannot help with that."})
  (raw / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = build_config()
  config.input_dir, config.num_workers, config.output.validation_fraction = str(raw), 1, 0.0
  out = tmp_path_factory.mktemp("build") / "data"
  build_dataset(config, out, progress=False)
  return out


def audit_config(build_dir, **keys):
  config = audit_configs.get_config()
  config.build_dir, config.bootstrap_samples = str(build_dir), 50
  for k, v in keys.items():
    setattr(config, k, v)
  return config


def copy_with(built, tmp_path, edit):
  """A copy of the build whose shard `edit` changed (bytes -> bytes of the same length)."""
  folder = tmp_path / "build"
  shutil.copytree(built, folder)
  before = (folder / SHARD).read_bytes()
  (folder / SHARD).write_bytes(edit(before))
  assert len((folder / SHARD).read_bytes()) == len(before)
  return folder


def test_a_shard_changed_since_the_build_at_its_size_is_refused(built, tmp_path):
  changed = copy_with(built, tmp_path / "a", lambda b: b.replace(b"Water them deeply", b"Burn them quickly", 1))
  with pytest.raises(ConfigError, match=f"{SHARD} has sha256 .*: changed since the build"):
    sft.audit(audit_config(changed), tmp_path / "a" / "audit")
  assert not (tmp_path / "a" / "audit" / "review.jsonl").exists()
  bad_byte = copy_with(built, tmp_path / "b", lambda b: b.replace(b"W", b"\xff", 1))
  with pytest.raises(ConfigError, match=rf"{SHARD}:1 is not UTF-8 \(invalid start byte at byte \d+\)"):
    sft.audit(audit_config(bad_byte), tmp_path / "b" / "audit")


def test_each_file_is_read_once_and_hashed_as_it_is_read(built, monkeypatch):
  opened = []
  real_open = pathlib.Path.open
  monkeypatch.setattr(pathlib.Path, "open", lambda self, *a, **k: opened.append(self.name) or real_open(self, *a, **k))
  build = data.open_build(built)
  assert not [name for name in opened if name.endswith(".jsonl")]  # sizes only: the shards are hashed as read
  assert len(list(data.records(build))) == 6
  assert sorted(name for name in opened if name.endswith(".jsonl")) == sorted(p.name for p in build.files())


class Keep:
  fingerprint = "keep"

  def __init__(self):
    self.calls = 0

  def generate(self, chats, decoding):
    self.calls += 1
    return [Generation("keep", True) for _ in chats]


def test_judging_again_never_replaces_a_machine_review_silently(built, tmp_path):
  sft.audit(audit_config(built, mode="judge"), tmp_path, annotator=Keep())
  path = tmp_path / "review-machine.jsonl"
  first = path.read_bytes()
  sft.audit(audit_config(built, mode="judge"), tmp_path, annotator=Keep())  # the same answers: the same bytes
  assert path.read_bytes() == first
  rows = [json.loads(x) for x in first.decode().splitlines()]
  corrected = "".join(json.dumps(dict(r, verdict="drop", note="by hand") if i == 0 else r) + "\n" for i, r in enumerate(rows))
  path.write_text(corrected)
  with pytest.raises(ConfigError, match="review-machine.jsonl holds another sample .*which judging again would replace"):
    sft.audit(audit_config(built, mode="judge"), tmp_path, annotator=Keep())
  # Another sample is refused before the model is asked anything.
  keep = Keep()
  with pytest.raises(ConfigError, match="holds another sample"):
    sft.audit(audit_config(built, mode="judge", per_stratum=2), tmp_path, annotator=keep)
  assert keep.calls == 0 and path.read_text() == corrected


def test_a_judge_run_counts_each_reason_a_row_stays_unfilled(built, tmp_path):
  class CutOff:
    fingerprint = "cut"

    def generate(self, chats, decoding):
      return [Generation("Keep it? Let me look again", False) if i % 2 else Generation("", False, error="HTTP 503") for i in range(len(chats))]

  out = sft.audit(audit_config(built, mode="judge"), tmp_path, annotator=CutOff())
  rows = [json.loads(x) for x in (tmp_path / "review-machine.jsonl").read_text().splitlines()]
  assert out["unfilled"] == {"unparseable": 0, "truncated": 3, "annotator error": 3} and out["unparseable"] == 6
  assert [r["verdict"] for r in rows] == [""] * 6 and {r["note"].split(":")[0] for r in rows} == {"truncated", "annotator error"}


def test_relative_paths_are_recorded_absolute_and_a_file_is_no_workdir(built, tmp_path, monkeypatch):
  shutil.copytree(built, tmp_path / "build")
  monkeypatch.chdir(tmp_path)
  sft.audit(audit_config("build"), "aud")
  assert f"Build: `{tmp_path / 'build'}`" in (tmp_path / "aud" / "instructions.md").read_text()
  rows = [dict(json.loads(x), verdict="keep", reviewer="al") for x in (tmp_path / "aud" / "review.jsonl").read_text().splitlines()]
  (tmp_path / "aud" / "al.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  results = sft.audit(audit_config("build", mode="score", reviews=("aud/al.jsonl",)), "aud")
  assert results["build"]["folder"] == str(tmp_path / "build")
  section = (tmp_path / "build" / "report.md").read_text().split("## Data quality", 1)[1]
  assert f"`{tmp_path / 'aud' / 'report.md'}`" in section and os.path.isabs(str(tmp_path / "aud"))
  (tmp_path / "afile").write_text("")
  with pytest.raises(ConfigError, match="afile is a file, not a folder"):
    sft.audit(audit_config("build"), "afile")
  with pytest.raises(ConfigError, match="cannot be made"):
    sft.audit(audit_config("build"), "afile/aud")
