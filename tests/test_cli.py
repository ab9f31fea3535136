"""`python -m amp_magics status|check`: in-process through main(), and as a real subprocess."""
import json
import os
import signal
import subprocess
import sys

import pytest
from fake_nvml import FakeNvml, h100

from amp_magics.system import gpu
from amp_magics.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(*args, timeout=60, python_flags=()):
    return subprocess.run([sys.executable, *python_flags, "-m", "amp_magics", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def imported_modules(importtime_log: str) -> set[str]:
    """The modules a `python -X importtime` run imported, from its stderr."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def test_status_in_process_fits_80_columns(monkeypatch, capsys):
    monkeypatch.setattr(gpu, "_nvml_state", None)  # the real nvidia-ml-py, started afresh
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "Recommendation: --dtype auto picks" in out
    assert max(map(len, out.splitlines())) <= 80


def test_status_json_and_selection(monkeypatch, capsys):
    monkeypatch.setattr(gpu, "_nvml_state", (FakeNvml([h100(uuid=f"GPU-{i}") for i in range(8)]), None))
    assert main(["status", "--json", "-i", "0,2"]) == 0
    assert [g["index"] for g in json.loads(capsys.readouterr().out)["gpus"]] == [0, 2]
    assert main(["status"]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) <= 80


@pytest.mark.parametrize("argv, message", [
    (["status", "-i", "9"], "no GPU 9: this machine has 8"),
    (["status", "-i", "a,b"], "GPU indices must be integers"),
    (["status", "--watch", "0"], "--watch needs a positive number"),
    (["bogus"], "invalid choice"),
    ([], "required"),
    (["status", "--js"], "unrecognized arguments: --js"),  # never a prefix of --json
    (["check", "--exp", "x.yml"], "unrecognized arguments: --exp"),
])
def test_bad_arguments_exit_2_with_a_message(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(gpu, "_nvml_state", (FakeNvml([h100(uuid=f"GPU-{i}") for i in range(8)]), None))
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_subprocess_status_text_and_json_without_torch_or_ipython():
    """What keeps `status` quick on a busy GPU box: it imports neither torch nor IPython."""
    done = run_module("status", python_flags=("-X", "importtime"))
    assert done.returncode == 0, done.stderr
    assert max(map(len, done.stdout.splitlines())) <= 80
    assert "Recommendation: --dtype auto picks" in done.stdout
    imported = imported_modules(done.stderr)
    assert {"amp_magics.cli", "amp_magics.system.gpu"} <= imported  # the log is read right
    assert not {m for m in imported
                if m.split(".")[0] in ("torch", "IPython", "ipywidgets")}
    done = run_module("status", "--json")
    assert done.returncode == 0 and "recommendation" in json.loads(done.stdout)


def test_check_refuses_an_export_path_it_cannot_write_before_checking(tmp_path, capsys):
    from amp_magics import cli

    for path in (tmp_path / "missing" / "environment.yml", tmp_path):
        with pytest.raises(SystemExit) as exited:
            cli.main(["check", "--export", str(path)])
        out, err = capsys.readouterr()
        assert exited.value.code == 2 and "AMP smoke test" not in out
        assert f"cannot write {path}: give a file in a folder that exists" in err


def test_subprocess_check_passes_its_smoke_test(tmp_path):
    path = tmp_path / "environment.yml"
    done = run_module("check", "--export", str(path), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS  AMP smoke test: 2 steps of" in done.stdout
    assert max(len(line) for line in done.stdout.splitlines() if not line.startswith("Wrote ")) <= 80
    assert "torch==" in path.read_text()


def test_subprocess_watch_redraws_until_ctrl_c():
    # Ctrl-C as a terminal gives it, also when the tests run with SIGINT ignored (`cmd &`)
    proc = subprocess.Popen([sys.executable, "-m", "amp_magics", "status", "--watch", "0.05", "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        frames = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert frames[1]["taken_at"] > frames[0]["taken_at"]
        proc.send_signal(signal.SIGINT)
        # read on while it ends, so that a full pipe can never hold up its exit
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
