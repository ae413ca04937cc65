"""The data builder annotating through `sft serve`: the endpoint backend against the project's own server
gives the answers the local backend gives with the same model, and a build through it is accounted."""

import json

import pytest
import test_annotation_build as annotation_build
from serving_util import make_workdir, running_server, test_config

import sft
from sft.annotator import Decoding, open_annotator, open_endpoint
from sft.annotator.endpoint import fingerprint_of

# A build and an audit through a served model: about a minute.
pytestmark = pytest.mark.slow

CHATS = [[{"role": "user", "content": text}] for text in (
    "json", "What does json.dumps do?", "split text on spaces", "wrap", "shlex split a command line into its words",
)]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
  folder = make_workdir(tmp_path_factory.mktemp("serve-annotate"), tokenizer)
  with running_server(test_config(), folder) as (url, server):
    yield folder, url, server


def test_the_endpoint_backend_answers_as_the_local_backend_with_the_same_model(served):
  folder, url, _ = served
  decoding = Decoding(max_new_tokens=12)
  remote = open_endpoint(url, progress=False).generate(CHATS, decoding)
  local = open_annotator(str(folder), batch_size=4, context=128, progress=False).generate(CHATS, decoding)
  assert remote == local
  # The server lists its weights' fingerprint: the endpoint's cache key changes with the weights it serves.
  assert open_endpoint(url, progress=False).fingerprint == fingerprint_of(url, "tiny", served[2].fingerprint)


def test_a_build_annotated_through_sft_serve_is_accounted_and_audited(served, tmp_path):
  folder, url, server = served
  raw = annotation_build.raw_folder(tmp_path / "raw")
  config = annotation_build.config_of(str(raw))
  config.annotate.model = url
  config.annotate.label.method = "generate"
  config.annotate.max_new_tokens = 8
  config.annotate.max_drop_fraction = 1.0  # random weights rarely end a turn: most answers are cut, and counted
  manifest = sft.build_dataset(config, tmp_path / "out", progress=False)
  assert manifest["annotation"]["annotator"]["fingerprint"] == open_endpoint(url, progress=False).fingerprint
  rows = manifest["accounting"]["by_source"]["todo.jsonl"]
  fill = {k: v for k, v in rows["dropped_by_reason"].items() if k.startswith("annotate: fill")}
  filled = sum(1 for r in annotation_build.read_all(tmp_path / "out") if r.get("annotated") == "response")
  assert filled + sum(fill.values()) == annotation_build.NUM_RECORDS
  assert set(fill) <= {"annotate: fill: truncated", "annotate: fill: empty"}  # no request failed
  assert server.engine.running == 0 and server.engine.waiting == 0

  # The audit's machine reviewer through the same server: every sampled row is filled or counted.
  from sft.audit.config import audit_config

  audit = audit_config()
  audit.build_dir, audit.mode, audit.per_stratum = str(tmp_path / "out"), "judge", 2
  audit.judge.model, audit.judge.max_new_tokens = url, 4
  judged = sft.audit(audit, tmp_path / "audit")
  machine = [json.loads(x) for x in (tmp_path / "audit" / "review-machine.jsonl").read_text().splitlines()]
  assert len(machine) == judged["rows"] > 0 and all(r["reviewer"] == "machine" for r in machine)
  assert sum(1 for r in machine if not r["verdict"] and not r["right_label"]) == judged["unparseable"]
