"""Every notebook in notebooks/ runs in a real kernel without error (nbclient)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
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
    # every %%autograd cell published two outputs: the widget (no HTML, an empty text, so that
    # GitHub and nbconvert show the snapshot once) and the snapshot marked with the widget's model id
    traced = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("%%autograd")]
    for c in traced:
        shown = [o.data for o in c.outputs if o.output_type == "display_data"]
        widgets = [d for d in shown if WIDGET_MIME in d]
        snapshots = [d for d in shown if "agm-snapshot" in d.get("text/html", "")]
        nothing = any("no tensor operations ran" in d.get("text/plain", "") for d in shown)
        assert snapshots or (nothing and not widgets), c.source
        for w in widgets:
            assert "text/html" not in w and w.get("text/plain", "") == ""
            model = w[WIDGET_MIME]["model_id"]
            assert any(f"agm-snapshot-{model}" in s["text/html"] for s in snapshots), c.source
