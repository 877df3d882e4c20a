"""Notebook conventions: a first code cell tagged `parameters` whose every knob
papermill can read, and no outputs committed."""
import json
import re
from pathlib import Path

import pytest
from papermill.translators import PythonTranslator

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_six_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == ["01_curate", "02_train", "03_evaluate",
                                           "04_bulk_identify", "05_report", "06_clean"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_parses_and_no_outputs(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    first = cells[0]
    assert "parameters" in first["metadata"].get("tags", [])
    src = "".join(first["source"])
    names = [line.split(":")[0] for line in src.splitlines() if re.match(r"^\w+\s*:", line)]
    parsed = [p.name for p in PythonTranslator.inspect({"source": src})]
    assert names and parsed == names  # papermill reads every knob (a stray "=" in a comment breaks it)
    assert all("#" in line for line in src.splitlines() if line.strip())  # each has a reason
    assert "REPORT_DIR" in names and "WORKSPACE" in names
    assert not any(c.get("outputs") or c.get("execution_count") for c in cells)
