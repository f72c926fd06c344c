"""notebooks/llava_jax_demo.ipynb runs end to end in quick mode (issue 4, deliverable 6).

The notebook is executed with nbclient in a kernel of this very interpreter (a kernelspec written to a
temp dir, so no system-wide Jupyter setup is needed), with a workdir in tmp and nothing downloaded.
A probe cell appended to a copy of the notebook reports what the final cells produced.
"""

import json
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "llava_jax_demo.ipynb")
CONTRACT_KEYS = ("accuracy", "blind_accuracy", "pope", "blind_pope", "seconds", "params", "examples")
QA_TYPES = ("color", "shape", "count", "position", "existence")
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
PROBE_TAG = "NOTEBOOK_PROBE "

PROBE = f"""
import json as _json
print({PROBE_TAG!r} + _json.dumps({{
    "results": {{k: results[k] for k in ("accuracy", "blind_accuracy", "pope", "blind_pope", "params", "seconds")}},
    "results_keys": sorted(results),
    "chat_log": chat_log,
    "answer": answer,
    "export": export,
    "workdir": workdir,
}}))
"""


def _kernel_manager(tmp_path):
  """A KernelManager that starts `sys.executable -m ipykernel_launcher` (this venv's Python)."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  spec_dir = tmp_path / "kernels" / "llava-jax-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "llava-jax test", "language": "python"}))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name="llava-jax-test", kernel_spec_manager=ksm)


def _cell_seconds(nb) -> str:
  """Wall time of each executed code cell (nbclient records execute_input / execute_reply times)."""
  from datetime import datetime
  out = []
  for i, cell in enumerate(nb.cells):
    timing = cell.metadata.get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if start and end:
      seconds = (datetime.fromisoformat(end.replace("Z", "+00:00")) -
                 datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
      out.append(f"[{i}] {seconds:.1f}")
  return ", ".join(out)


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs"
  assert "parameters" in code[0].metadata.get("tags", []), "the first code cell is the papermill parameters cell"
  assert "QUICK" in code[0].source
  assert os.path.getsize(NOTEBOOK) < 100_000


def test_notebook_runs_in_quick_mode(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(PROBE))
  workdir = tmp_path / "workdir"
  monkeypatch.setenv("LLAVA_JAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("LLAVA_JAX_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
  # One real CPU device, as a user's kernel has (conftest fakes 8 for the sharding tests).
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600, allow_errors=False,
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  try:
    client.execute()  # raises CellExecutionError (with the cell and traceback) if any cell fails
  finally:
    print(f"notebook: {time.perf_counter() - start:.0f} s; per cell: {_cell_seconds(nb)}")
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # for a look after a failure

  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.output_type != "error", out

  probe = [o.text for o in nb.cells[-1].outputs if o.output_type == "stream" and PROBE_TAG in o.text]
  assert probe, nb.cells[-1].outputs
  got = json.loads(probe[0].split(PROBE_TAG, 1)[1])
  r = got["results"]
  assert set(CONTRACT_KEYS) <= set(got["results_keys"])
  for key in ("accuracy", "blind_accuracy"):
    assert set(r[key]) == set(QA_TYPES)
    assert all(0.0 <= v <= 1.0 for v in r[key].values() if v == v), r[key]  # nan when a type has no question
  for key in ("pope", "blind_pope"):
    assert set(r[key]) == set(POPE_SPLITS)
    assert all(set(POPE_KEYS) <= set(m) for m in r[key].values())
  assert set(r["params"]) == {"vision_tower", "projector", "language_model"}
  assert all(r["seconds"][k] > 0 for k in ("data", "stage0", "stage1", "stage2", "eval", "total"))

  assert len(got["chat_log"]) >= 2
  assert all(isinstance(q, str) and isinstance(a, str) and a.strip() for q, a in got["chat_log"])
  assert isinstance(got["answer"], str) and got["answer"].strip()

  # The demo's files: results.json (same contract), the loss plot, and the exported model folder.
  with open(workdir / "results.json") as f:
    assert set(CONTRACT_KEYS) <= set(json.load(f))
  assert (workdir / "losses.png").stat().st_size > 0
  assert os.path.isfile(os.path.join(got["export"], "config.json"))
  # Figures were drawn inline: the data, loss, and evaluation cells show images.
  pngs = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
  assert pngs >= 6, pngs
