"""Executes a notebook with nbclient in a kernel of this very interpreter (a kernelspec written to
a temp dir, so no system-wide Jupyter setup is needed). Holds no tests itself."""

import json
import sys
import time
from datetime import datetime

import ipykernel  # noqa: F401  (the kernel the notebook runs in; pinned: a missing one fails here)
import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager


def execute(nb, folder, timeout=600) -> None:
  """Runs every cell of NB in place, with FOLDER as the working directory; raises
  CellExecutionError (with the cell and traceback) if a cell fails. Writes FOLDER/executed.ipynb
  either way, for a look after a failure."""
  client = nbclient.NotebookClient(nb, km=_kernel_manager(folder), timeout=timeout, allow_errors=False,
                                   resources={"metadata": {"path": str(folder)}})
  start = time.perf_counter()
  try:
    client.execute()
  finally:
    print(f"notebook: {time.perf_counter() - start:.0f} s; per cell: {_cell_seconds(nb)}")
    nbformat.write(nb, str(folder / "executed.ipynb"))


def _kernel_manager(folder):
  """A KernelManager that starts `sys.executable -m ipykernel_launcher` (this venv's Python)."""
  spec_dir = folder / "kernels" / "llava-jax-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "llava-jax test", "language": "python"}))
  ksm = KernelSpecManager(kernel_dirs=[str(folder / "kernels")])
  return KernelManager(kernel_name="llava-jax-test", kernel_spec_manager=ksm)


def _cell_seconds(nb) -> str:
  """Wall time of each executed code cell (nbclient records execute_input / execute_reply times)."""
  out = []
  for i, cell in enumerate(nb.cells):
    timing = cell.metadata.get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if start and end:
      seconds = (datetime.fromisoformat(end.replace("Z", "+00:00")) -
                 datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
      out.append(f"[{i}] {seconds:.1f}")
  return ", ".join(out)
