import gc

import pytest
import torch

# Bit-exactness on CPU needs a fixed thread count (reduction order depends on it).
torch.set_num_threads(1)


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
    gc.collect()
