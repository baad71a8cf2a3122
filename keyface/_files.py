"""Output files written atomically (a temporary file beside the target, renamed over it when complete).

Plain Python: no torch import here.
"""

from __future__ import annotations

import os
import secrets


def create_temp_beside(path, suffix: str = ".tmp") -> str:
    """Create an empty, uniquely named hidden file in ``path``'s folder and return its path.

    ``tempfile.mkstemp`` creates private files (mode 0600), so an output renamed from one would not
    be readable by the user's other accounts or services the way a normally written file is. This
    file gets mode ``0o666 & ~umask``, like any file the process creates; the kernel applies the
    umask, which is never read or changed here (changing it is process-wide, a race with other
    threads).
    """
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    base = os.path.basename(os.fspath(path))
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")
