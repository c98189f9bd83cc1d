"""graft in a real Jupyter kernel (ipykernel, driven by nbclient as a notebook front end
would be): progress bars show and update in place, the epoch lines print, a fitted
classifier and an evaluation render as HTML when they end a cell, and the notebook's own
matplotlib plots still show inline afterwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import make_dataset

TINY = dict(
    img_size=64,
    epochs=1,
    fine_tune_epochs=1,
    views=1,
    batch_size=16,
    fine_tune_batch_size=8,
    workers=0,
)


class RecordingClient(NotebookClient):
    """nbclient's client, keeping every output message of the kernel: a progress bar's
    updates replace its output, so the finished notebook alone would not show them."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.messages: list[tuple[int, str, dict[str, Any]]] = []

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        self.messages.append((cell_index, msg["msg_type"], msg["content"]))
        return super().process_message(msg, cell, cell_index)


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec running this interpreter, and Jupyter's and IPython's files under
    tmp_path, never in the home folder."""
    spec = tmp_path / "jupyter" / "kernels" / "graft-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "graft test", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend
    return "graft-test"


def html_of(output: dict[str, Any]) -> str:
    return str(output.get("data", {}).get("text/html", ""))


def test_a_notebook_shows_progress_and_html_summaries(kernel_env: str, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class={"circle": 8, "square": 8}, seed=3)
    run = tmp_path / "run"
    cells = [
        "from graft import ImageClassifier\n"
        f"clf = ImageClassifier(**{TINY!r})\n"
        f"clf.fit({str(data)!r}, out={str(run)!r}, verbose=True)",
        "clf.evaluate()",
        "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = RecordingClient(nb, kernel_name=kernel_env, timeout=600, allow_errors=False)
    client.execute(cwd=str(tmp_path))

    # progress: bars appear as HTML outputs, are updated in place, and are emptied at the end
    train = [(t, c) for i, t, c in client.messages if i == 0]
    bars = {
        c["transient"]["display_id"]: c
        for t, c in train
        if t == "display_data" and "<progress" in html_of(c)
    }
    assert bars, "no progress bar was shown while training"
    updates = [
        c for t, c in train if t == "update_display_data" and c["transient"]["display_id"] in bars
    ]
    assert any('<progress value="' in html_of(c) for c in updates)
    last = {c["transient"]["display_id"]: html_of(c) for c in updates}
    assert set(last) == set(bars) and set(last.values()) == {""}

    # the epoch lines and the end of the run print (rich renders them as HTML outputs)
    printed = " ".join(html_of(o) + str(o.get("text", "")) for o in nb.cells[0].outputs)
    assert "frozen" in printed and "fine-tune" in printed and "Held-out test accuracy" in printed

    # the classifier and the evaluation that end a cell render as tables
    fitted = [o for o in nb.cells[0].outputs if o["output_type"] == "execute_result"]
    assert len(fitted) == 1 and 'class="graft-summary"' in html_of(fitted[0])
    assert "circle, square (2)" in html_of(fitted[0]) and str(run) in html_of(fitted[0])
    assert fitted[0]["data"]["text/plain"].startswith("ImageClassifier(img_size=64")
    evaluated = [o for o in nb.cells[1].outputs if o["output_type"] == "execute_result"]
    assert len(evaluated) == 1 and "Evaluation</b> on the held-out test split" in html_of(
        evaluated[0]
    )

    # graft's figures never take over the notebook's matplotlib: its plot still shows inline
    assert any("image/png" in o.get("data", {}) for o in nb.cells[2].outputs)
