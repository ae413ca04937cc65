"""notebooks/quickstart.ipynb runs top to bottom (its SMALL setting, as committed) and shows what matters:
the build's accounting and a report plot, the loss curves, the evaluation summary and a generated answer."""

import json
import os
import re
import sys

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")

pytestmark = pytest.mark.slow  # the whole quickstart in a kernel: minutes


def kernel_dir(tmp_path):
  """A `python3` kernel spec that runs this interpreter, ahead of any other on JUPYTER_PATH."""
  folder = tmp_path / "jupyter"
  spec = folder / "kernels" / "python3"
  spec.mkdir(parents=True)
  argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
  return folder


def outputs(nb, output_type=None):
  return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if output_type in (None, o.output_type)]


def text_of(nb):
  parts = []
  for o in outputs(nb):
    if o.output_type == "stream":
      parts.append(o.text)
    elif "text/plain" in o.get("data", {}):
      parts.append(o.data["text/plain"])
  return "".join(parts)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  regenerate = "jupyter execute --inplace notebooks/quickstart.ipynb"
  assert outputs(nb) and not outputs(nb, "error"), f"store the notebook with the outputs of a clean run: {regenerate}"
  assert regenerate in nb.cells[0].source and os.path.getsize(NOTEBOOK) < 500_000  # small outputs only
  for cell in nb.cells:  # run afresh: the checks below read this run's outputs, not the stored ones
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  assert "SMALL = True" in nb.cells[1].source

  # The kernel inherits this environment: the checkout importable, temporary files under tmp_path.
  monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir(tmp_path)))
  monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  workdir = tmp_path / "cwd"
  workdir.mkdir()
  client = nbclient.NotebookClient(nb, timeout=300, startup_timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
  try:
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
  finally:
    nbformat.write(nb, tmp_path / "quickstart.executed.ipynb")  # to look at when it fails

  assert not outputs(nb, "error")
  images = [o for o in outputs(nb, "display_data") if "image/png" in o.data]
  assert len(images) >= 2, "the report's drop-reason plot and the loss curves"

  text = text_of(nb)
  read, kept, dropped = map(int, re.search(r"read (\d+), kept (\d+), dropped (\d+)", text).groups())
  assert read == kept + dropped and kept > 500 and dropped >= 5  # the five planted problems at least
  first, last = map(float, re.search(r"held-out response loss (\d+\.\d+) -> (\d+\.\d+)", text).groups())
  assert last < first
  assert re.search(r"exact match \d\.\d{3} -> \d\.\d{3}", text)
  assert text.count("reference:") >= 3
  assert "| classification |" in text and "| summarisation |" in text  # the report's per-task table
  assert "> List the parameter names of `dumps(" in text
  assert os.listdir(tmp_path / "cwd") == []  # everything went to a temporary folder
