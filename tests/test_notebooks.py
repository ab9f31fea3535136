"""Every demo notebook executes top to bottom in a real kernel, offline, and shows what its
prose promises: finished runs with the expected step counts, the diagnosis, the memory lines.

(nbclient itself fails on an error in a cell that is not tagged `raises-exception`; what it
does not check is that the outputs are the right ones, or that a tagged cell really raised.)
"""
import re
import shutil
from pathlib import Path

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.notebook
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "demo_notebooks").glob("*.ipynb"))

# notebook -> (a piece of a code cell's source, a piece of text that cell's outputs must show)
EXPECTED = {
    "01_quickstart": [
        ("%gpu_status", "Recommendation: --dtype auto picks"),
        ("%amp_check", "PASS  torch"),
        ("--epochs 3 --log acc --seed 0 -o run\n", "run1 finished: 72 steps (0 skipped)"),
        ("-o run2", "run2 finished: 48 steps (0 skipped)"),
        ('print(run2.summary["steps"]', "48 steps, final loss"),
        ("amp_magics.runs()", "['run1', 'run2']"),
        ('Run.load("quickstart_run.json")', "48"),
    ],
    "02_hyperparameter_tuning": [
        ("--name slow", "slow finished: 48 steps"),
        ("--name fast", "fast finished: 48 steps"),
        ("--sweep", "<Sweep of 3 runs, best sweep[lr="),
        ("%amp_runs --plot fast slow", "data:image/svg+xml;base64,"),
        ("--compare fp32,bf16 --steps 20", "compare[bf16] finished: 20 steps"),
        ("--find-lr 1e-4,3 --steps 60", "learning-rate range test, "),
        ("--find-lr 1e-4,3 --steps 60", 'img class="amp-chart"'),
        ("lr.apply()", "lr set to "),
        ("--find-batch-size 256", "capped by --find-batch-size 256, not by memory"),
        ("tuned_loader = bs.loader", "batch size 256, 6 batches per epoch"),
        ("--name tuned", "tuned finished: 120 steps"),
        ("--study digits --trials 8", "trial 8 of 8"),
        ("--study digits --trials 12", "trial 12 of 12"),
        ("print(study.progress())", "trial 12 of 12"),
        ("--trials 13 --background", "digits3[lr="),
        ("%amp_stop", "FAIL"),
        ("%amp_stop", "(interrupted: tried again first on resume)"),
        ("--trials 13 -o study", "trial 13 of 13"),
        ("print(showdown)", "bf16: "),
    ],
    "03_memory_inspection": [
        ("%%amp_memory --model net", "kept for backward"),
        ("%amp_memory --top 5", "5 largest live tensors"),
        ("%amp_stop", "interrupted after"),
        ("activations = [torch.randn", "[amp_memory] RSS +"),
        ("%amp_memory --track off", "per-cell tracking off"),
        ("if step == 20:", "failed: 20 steps"),
        ("oom_run.status", "'failed'"),
        ("-o after", "finished: 10 steps (0 skipped)"),
        ("after.status", "'finished'"),
    ],
    "04_troubleshooting": [
        ("--diagnose -o broken", "finished: 30 steps (30 skipped)"),
        ("broken.diagnosis", "(Amplify)"),
        ("%%amp_doctor", "(Amplify)"),
        ("-o fixed_bf16", "finished: 30 steps (0 skipped)"),
        ("-o fixed_fp32_layer", "finished: 30 steps (0 skipped)"),
        ("--name low_scale", "low_scale finished: 30 steps (0 skipped)"),
    ],
    "05_scripts_and_ssh": [
        ("tail -n 3 train.log", "digits-script finished: 72 steps"),
        ('Run.load("digits_run.json")', "<Run 'digits-script' finished: 72 steps"),
        ("amp_magics.plot(run)", "data:image/svg+xml;base64,"),
        ("-m torch.distributed.run --standalone", "ddp-script finished: 40 steps"),
        ("python -m amp_magics status", "Recommendation: --dtype auto picks"),
        ("python -m amp_magics check", "PASS  AMP smoke test"),
    ],
}


def shown(cell) -> str:
    """Everything a cell's outputs show: streams, plain text, HTML, error messages."""
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts += [out.get("data", {}).get(kind, "") for kind in ("text/plain", "text/html")]
        if out["output_type"] == "error":
            parts.append(f"{out['ename']}: {out['evalue']}")
    return "\n".join(parts)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_demo_notebook_runs(path, tmp_path):
    work = tmp_path / path.name
    shutil.copy(path, work)  # files the notebook writes stay out of the repository
    nb = nbformat.read(work, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    cells = code_cells(nb)

    for cell in cells:
        errors = [o for o in cell.outputs if o["output_type"] == "error"]
        if "raises-exception" in cell.metadata.get("tags", []):
            assert errors, f"a cell tagged raises-exception did not raise:\n{cell.source}"
        foreground = "--background" not in cell.source
        finder = "--find-" in cell.source or "--search" in cell.source  # results: EXPECTED
        if cell.source.startswith("%%amp_train") and foreground and not errors and not finder:
            # a foreground run ends with its summary line, with the steps it was asked for
            text = shown(cell)
            match = re.search(r"\S+ (finished|interrupted|failed): (\d+) steps", text)
            assert match and match.group(1) == "finished", (cell.source, text[-500:])
            steps = re.search(r"--steps (\d+)", cell.source)
            if steps and "--compare" not in cell.source:
                assert match.group(2) == steps.group(1), (cell.source, match.group(0))

    expected = EXPECTED[path.stem]  # a new notebook needs its expectations here
    for source, text in expected:
        matching = [c for c in cells if source in c.source]
        assert len(matching) == 1, f"{path.name}: {len(matching)} code cells contain {source!r}"
        logs = "".join(f"\n--- {log.name}:\n{log.read_text()[-3000:]}"
                       for log in tmp_path.glob("*.log"))  # what a shell cell's tail cut off
        assert text in shown(matching[0]), (f"{path.name}: the cell with {source!r} does not "
                                           f"show {text!r}; it shows:\n{shown(matching[0])[-800:]}"
                                           f"{logs}")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3
    assert {p.stem for p in NOTEBOOKS} == EXPECTED.keys()


def test_inspecting_while_training_survives_repeated_runs(tmp_path):
    """Notebook 03 measures `net` (a real forward and backward) while a background run trains
    it. Before runs owned their models this killed the kernel about one time in four; now the
    measurement waits for a step boundary. Twenty times in one real kernel: a background run
    of notebook 03's network, measured at once and again while it trains, then stopped; a
    crash would end the kernel and fail the execution."""
    setup = next(c.source for c in code_cells(nbformat.read(
        next(p for p in NOTEBOOKS if p.stem == "03_memory_inspection"), as_version=4))
        if c.source.startswith("import torch"))
    cells = ["%load_ext amp_magics", setup]
    for attempt in range(20):
        cells += [f"%%amp_train --model net --optimizer opt --data train_loader --epochs 100000 "
                  f"--background -o bg{attempt}\nx, y = batch\nloss = F.cross_entropy(net(x), y)",
                  "%amp_memory --model net --optimizer opt",
                  "import time; time.sleep(0.05)\n%amp_memory --model net --optimizer opt",
                  "%amp_stop"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    measured = [c for c in code_cells(nb) if "%amp_memory --model net" in c.source]
    stops = [c for c in code_cells(nb) if c.source == "%amp_stop"]
    assert len(measured) == 40 and len(stops) == 20
    for cell in measured:
        assert "kept for backward" in shown(cell), shown(cell)
    for cell in stops:
        assert "interrupted after" in shown(cell), shown(cell)
