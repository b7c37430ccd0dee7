"""Every notebook in notebooks/ runs in a real kernel without error (nbclient)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.kernel
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any unexpected error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    tagged = [c for c in nb.cells if "raises-exception" in c.get("metadata", {}).get("tags", [])]
    assert len(errors) == len(tagged)
    # every %%autograd cell published the static snapshot beside whatever else it shows
    traced = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("%%autograd")]
    for c in traced:
        assert any("text/html" in o.get("data", {}) for o in c.outputs if o.output_type == "display_data"), c.source
