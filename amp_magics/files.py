"""Files written so that a crash or Ctrl-C never leaves half of one behind."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO


# The mode open() would give a new file (mkstemp's is 0600, unreadable to a team sharing the
# folder). The umask is read at import, before any thread of ours could create files.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False,
                 prefix: str = ".amp_") -> str:
    """Call `write(file)` on a temporary file in the target's folder, then rename it over
    `path` (one atomic step on POSIX and Windows). Returns the path written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
