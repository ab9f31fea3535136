import gc
import os

import pytest
import torch

# Bit-exactness on CPU needs a fixed thread count (reduction order depends on it).
torch.set_num_threads(1)

try:
    from hypothesis import settings
except ImportError:  # only tests/test_hostile_flags.py needs it (the `test` extra)
    pass
else:
    # The same inputs on every run, so CI fails only when the code changed. Bugs the search
    # found are pinned as regression tests; HYPOTHESIS_PROFILE=explore searches afresh.
    settings.register_profile("ci", derandomize=True, database=None)
    settings.register_profile("explore", derandomize=False, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _young_heap():
    """After each test, what survives is moved out of the garbage collector's reach
    (gc.freeze). Else every collection, ours and the automatic ones during training, walks
    the whole heap of a long session (torch, IPython, transformers, dynamo: over a million
    objects), which took more of the suite's time than the tests themselves."""
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture
def ip():
    """A real IPython shell with the extension loaded; `ip.run(src)` re-raises cell errors."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "amp_magics")
    shell.run_line_magic("config", "AmpMagics.view = 'text'")

    def run(src):
        result = shell.run_cell(src)
        result.raise_error()
        return result.result

    shell.run = run
    yield shell
    shell.run_line_magic("unload_ext", "amp_magics")
    shell.reset(new_session=False)
    InteractiveShell.clear_instance()
