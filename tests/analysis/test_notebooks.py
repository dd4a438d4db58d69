"""The analysis notebooks run headless (papermill, kernelspec python3) on the real tiny sweep's results store."""
import nbformat
import papermill
import pytest

from ssmcompress.config import REPO
from sweep_fixture import tiny_sweep

sweep = pytest.fixture(scope="session")(tiny_sweep)
NOTEBOOKS = sorted(p.stem for p in (REPO / "analysis").glob("*.ipynb"))
FIGURES = {"accuracy_vs_flops": ["accuracy_vs_flops.png"],
           "token_reduction": ["tokens_per_layer.png", "token_fates.png"]}


def test_notebooks_have_a_kernelspec_and_a_parameters_cell():
    assert set(NOTEBOOKS) >= {"tables", "accuracy_vs_flops", "token_reduction"}
    for name in NOTEBOOKS:
        notebook = nbformat.read(REPO / "analysis" / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata.kernelspec.name == "python3"
        parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(parameters) == 1 and "results_dir = None" in parameters[0].source
        assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), f"{name}: clear outputs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_the_tiny_sweep(name, sweep, tmp_path):
    parameters = dict(results_dir=str(sweep.results))
    if name != "tables":
        parameters["figures_dir"] = str(tmp_path / "figures")
    output = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(REPO / "analysis" / f"{name}.ipynb", output, parameters=parameters,
                               kernel_name="python3", cwd=str(REPO / "analysis"), progress_bar=False)
    executed = nbformat.read(output, as_version=4)
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                   for cell in executed.cells for o in cell.get("outputs", []))
    for figure in FIGURES.get(name, []):
        assert (tmp_path / "figures" / figure).stat().st_size > 0
    if name == "tables":
        assert "Table 1 — Main accuracy" in text and "Missing: " in text
    if name == "token_reduction" and len(sweep.methods) > 1:
        assert "no token-reduction runs" not in text
