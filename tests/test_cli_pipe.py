"""A reader that has gone away (``diffalign recipes | head -1``) ends the command quietly: no
BrokenPipeError traceback (issue #29's "no traceback unless asked")."""

import os
import subprocess
import sys


def test_closed_pipe_is_no_traceback():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write fails, deterministically
    try:
        proc = subprocess.run([sys.executable, "-m", "diffalign.cli", "recipes"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141
