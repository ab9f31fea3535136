"""%%amp_train in real Jupyter kernels: the widget view, the saved snapshot, interrupts."""
import base64
import queue
import re
import time

import nbclient
import nbformat
import pytest
from jupyter_client.manager import start_new_kernel

pytestmark = pytest.mark.notebook

SETUP = """\
import torch, torch.nn.functional as F
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
train_loader = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(50)]
"""
OVERFLOW = "train_loader[7] = (train_loader[7][0] * 1e6, train_loader[7][1])  # overflows fp16\n"
BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)"


class RecordingClient(nbclient.NotebookClient):
    """Keeps every iopub message, to see what the kernel displayed before updates replaced it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.messages = []

    def process_message(self, msg, cell, cell_index):
        self.messages.append((cell_index, msg))
        return super().process_message(msg, cell, cell_index)


def execute(cells, **hooks):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    client = RecordingClient(nb, timeout=120, kernel_name="python3", **hooks)
    client.execute()
    return nb, client.messages


def test_widget_view_then_static_snapshot():
    nb, messages = execute(["%load_ext amp_magics", SETUP + OVERFLOW,
                            f"%%amp_train --dtype fp16 --epochs 2 --name '<b>mine</b>' -o run\n{BODY}",
                            "print(run.status, len(run.history), sum(r['skipped'] for r in run.history))"])
    shown = [m for i, m in messages if i == 2 and m["msg_type"] == "display_data"]
    assert any("application/vnd.jupyter.widget-view+json" in m["content"]["data"] for m in shown)
    updates = [m for i, m in messages if i == 2 and m["msg_type"] == "update_display_data"]
    assert updates, "the live widget must be replaced by a snapshot"

    (output,) = nb.cells[2].outputs  # the saved notebook keeps only the static snapshot
    snapshot = output["data"]["text/html"]
    # Charts are SVG images (an untrusted notebook strips inline <svg>); the summary says the rest.
    assert "<svg" not in snapshot and snapshot.count("data:image/svg+xml;base64,") == 3
    charts = [base64.b64decode(c).decode() for c in re.findall(r"base64,([\w+/=]+)", snapshot)]
    assert any("Loss scale" in c and "skipped step (2)" in c for c in charts)
    assert "finished" in snapshot and "&lt;b&gt;mine&lt;/b&gt;" in snapshot
    assert "<b>mine</b>" not in snapshot
    assert nb.cells[3].outputs[0]["text"].split() == ["finished", "100", "2"]


def test_background_run_while_other_cells_execute():
    nb, messages = execute([
        "%load_ext amp_magics", SETUP + "import time",
        f"%%amp_train --dtype fp32 --epochs 1000 --background -o run\ntime.sleep(0.01)\n{BODY}",
        "for _ in range(200):  # this cell runs while the other one trains\n"
        "    if len(run.history) > 10:\n        break\n    time.sleep(0.05)\n"
        "print('still', run.status, len(run.history) > 10)",
        "%amp_stop",
        "print(run.status)",
    ])
    assert [o["text"].strip() for o in nb.cells[3].outputs] == ["still running True"]
    assert nb.cells[5].outputs[0]["text"].strip() == "interrupted"
    # The dashboard was shown in the training cell and its snapshot replaced it there.
    shown = [m for i, m in messages if i == 2 and m["msg_type"] == "display_data"]
    assert any("application/vnd.jupyter.widget-view+json" in m["content"]["data"] for m in shown)
    shown = [o["data"] for o in nb.cells[2].outputs if o["output_type"] == "display_data"]
    snapshot = [d["text/html"] for d in shown if "amp-dashboard" in d["text/html"]]
    assert len(snapshot) == 1 and "interrupted" in snapshot[0]
    assert "data:image/svg+xml;base64," in snapshot[0]
    # The Run the cell returned was rewritten when it ended: no "started ... Stop it" left.
    (notice,) = [d for d in shown if "amp-dashboard" not in d["text/html"]]
    assert "interrupted" in notice["text/html"] and "started at" not in notice["text/html"]
    assert notice["text/plain"].startswith("<Run 'run") and "running" not in notice["text/plain"]
    assert not [o for o in nb.cells[2].outputs if o["output_type"] == "execute_result"]


def test_a_failed_background_run_shows_its_traceback_in_its_own_cell():
    """Known only once the run's views have ended, the traceback rewrites the Run the cell
    returned, in that cell (output printed from the run's thread would land in whichever cell
    is executing then); %amp_wait prints it too.

    The step fails only once the %amp_wait cell runs: the thread's updates carry the parent of
    the cell executing when they are sent, and nbclient drops those sent between two cells."""
    nb, _ = execute([
        "%load_ext amp_magics", SETUP + "import threading\nwaiting = threading.Event()",
        "%%amp_train --dtype fp32 --background -o run\nx, y = batch\n"
        "if step == 3:\n    waiting.wait(60)\n    raise ValueError('boom at step 3')\n"
        "loss = F.cross_entropy(model(x), y)",
        "waiting.set()\n%amp_wait",
    ])
    shown = [o["data"] for o in nb.cells[2].outputs if o["output_type"] == "display_data"]
    (notice,) = [d for d in shown if "amp-dashboard" not in d["text/html"]]
    assert "failed" in notice["text/html"] and "Cell In[3], line 5" in notice["text/html"]
    assert "----&gt; 5     raise ValueError(&#x27;boom at step 3&#x27;)" in notice["text/html"]
    assert notice["text/plain"].endswith("ValueError: boom at step 3")
    assert "\x1b[" not in notice["text/plain"] and "amp_magics" not in notice["text/plain"]
    assert "Cell In[3], line 5" in "".join(o.get("text", "") for o in nb.cells[3].outputs)


def test_a_background_run_that_ends_between_two_cells_leaves_its_snapshot(tmp_path):
    """nbclient (nbconvert --execute, papermill) reads only the executing cell's messages; the
    run's rewrites sent while no cell executes are sent again when the next cell starts."""
    ended = tmp_path / "ended"  # written once the run's thread has done all it does

    def between_cells(cell, cell_index, execute_reply):  # nbclient's hook after each cell
        deadline = time.monotonic() + 60
        while cell_index == 2 and not ended.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    nb, _ = execute([
        "%load_ext amp_magics",
        SETUP + "import threading\nfrom amp_magics.training import registry\n"
        "def when_it_has_ended():\n"
        "    for _, done in registry.background_runs():\n        done.wait(60)\n"
        f"    open({str(ended)!r}, 'w').close()",
        "%%amp_train --dtype fp32 --background -o run\nx, y = batch\n"
        "if step == 3:\n    threading.Thread(target=when_it_has_ended).start()\n"
        "    raise ValueError('boom')\n"
        "loss = F.cross_entropy(model(x), y)",
        "print(run.status)",
    ], on_cell_executed=between_cells)
    assert ended.exists() and nb.cells[3].outputs[0]["text"].strip() == "failed"
    shown = [o["data"] for o in nb.cells[2].outputs if o["output_type"] == "display_data"]
    assert all("text/html" in d and "widget-view" not in str(d) for d in shown), shown
    (snapshot,) = [d for d in shown if "amp-dashboard" in d["text/html"]]
    (notice,) = [d for d in shown if "amp-dashboard" not in d["text/html"]]
    assert "failed" in snapshot["text/html"] and "ValueError: boom" in notice["text/plain"]


def wait_for_steps(kc, msg_id, at_least, timeout=120.0):
    """Read the cell's progress line from iopub until it shows `at_least` steps done."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "error":
            raise AssertionError(f"the training cell failed: {msg['content']['evalue']}")
        if msg["msg_type"] == "stream":
            text += msg["content"]["text"]
            steps = [int(n.replace(",", "")) for n in re.findall(r"\bstep ([\d,]+)", text)]
            if steps and max(steps) >= at_least:
                return max(steps)
    raise AssertionError(f"no progress line with step >= {at_least} in {timeout:.0f} s; "
                         f"the cell printed: {text[-500:]!r}")


def test_kernel_interrupt_stops_at_a_step_boundary():
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        def run(code, timeout=60):
            return kc.execute_interactive(code, timeout=timeout, output_hook=lambda m: None)

        run("%load_ext amp_magics\n%config AmpMagics.view = 'text'")
        run(SETUP + "import time\nbefore = None")
        msg_id = kc.execute(f"%%amp_train --dtype fp32 --epochs 1000 -o run\n"
                            f"time.sleep(0.005)\n{BODY}")
        wait_for_steps(kc, msg_id, at_least=6)  # then the interrupt lands mid-training
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "ok"  # ended cleanly, not a KeyboardInterrupt

        outputs = []
        run("ref = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), "
            "torch.nn.Linear(32, 3))\n"
            "torch.manual_seed(0)\n"
            "ref = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), "
            "torch.nn.Linear(32, 3))\n"
            "opt = torch.optim.SGD(ref.parameters(), lr=0.1)\n"
            "n = len(run.history)\n"
            "for i in range(n):\n"
            "    x, y = train_loader[i % 50]\n"
            "    opt.zero_grad(); F.cross_entropy(ref(x), y).backward(); opt.step()\n"
            "same = all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))")
        kc.execute_interactive("print(run.status, len(run.history) > 5, same)", timeout=60,
                               output_hook=lambda m: outputs.append(m))
        text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert text.split() == ["interrupted", "True", "True"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_traceback_names_the_cell_by_its_own_number():
    """The body's frames are the cell's own: `Cell In[3]` for the third cell, as its prompt."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in [
        "%load_ext amp_magics", SETUP,
        f"%%amp_train --dtype fp32 --no-plot\nx, y = batch\nraise ValueError('boom')\n{BODY}"]]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    cell = nb.cells[2]
    (error,) = [o for o in cell.outputs if o.output_type == "error"]
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error.traceback))
    named = set(re.findall(r"Cell In\[(\d+)\]", text))
    assert named == {str(cell.execution_count)}, text
    assert "----> 3 raise ValueError('boom')" in text


def test_a_stopped_gpu_status_watch_leaves_a_static_snapshot():
    nb, _ = execute(["%load_ext amp_magics", "watch = %gpu_status --watch 0.1",
                     "import time; time.sleep(0.35); watch.stop(); print(watch)"])
    (output,) = nb.cells[1].outputs  # what the saved notebook keeps
    assert "application/vnd.jupyter.widget-view+json" not in output["data"]
    assert "VBox(" not in str(output) and "watch stopped" in output["data"]["text/plain"]
    assert output["data"]["text/html"].startswith('<div class="amp-gpu-status"')
    assert "stopped; .stop() ends it" in nb.cells[2].outputs[0]["text"]


HAND_DDP = """\
import os, tempfile, torch.distributed as dist
from torch.multiprocessing import start_processes

def rank_loop(rank, init_method):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 3))
    for x, y in train_loader[rank::2][:5]:
        F.cross_entropy(net(x), y).backward()
    del net
    dist.destroy_process_group()

folder = tempfile.mkdtemp()
for init_method in (f"file://{folder}/meeting", "tcp://127.0.0.1:{port}"):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    start_processes(rank_loop, args=(init_method.format(port=port),), nprocs=2,
                    start_method="fork")
    print("hand-written DDP done:", init_method.split(":")[0])
"""


def test_a_hand_written_fork_ddp_loop_after_nproc_does_not_hang():
    """A user's own fork-DDP code after `--nproc 2` in the same kernel: nothing our run left
    behind (signal handlers, threads, a store, the frozen gc) stops it from starting."""
    nb, _ = execute(["%load_ext amp_magics", SETUP,
                     f"%%amp_train --dtype bf16 --nproc 2 --steps 5 -o run\n{BODY}",
                     HAND_DDP])
    text = "".join(o.get("text", "") for o in nb.cells[3].outputs)
    assert "hand-written DDP done: file" in text and "hand-written DDP done: tcp" in text
