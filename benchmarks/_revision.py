"""Run a timing snippet against the ``clustermass`` of an older git revision (for ``--compare-rev``).

``git archive REV src`` is unpacked into a temporary directory and ``snippet`` runs in a
subprocess with that ``src`` first on ``PYTHONPATH`` (and this ``benchmarks`` directory on
``sys.path``, for the benchmarks' own input generators); the snippet's last stdout line is JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_at_revision(rev: str, snippet: str, arg) -> object:
    """The JSON printed last by ``snippet`` (given ``json.dumps(arg)`` as ``sys.argv[1]``) at ``rev``."""
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        arch = subprocess.run(["git", "-C", str(here.parent), "archive", rev, "src"], check=True,
                              capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=arch, check=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tmp) / "src"), str(here)])}
        res = subprocess.run([sys.executable, "-c", snippet, json.dumps(arg)], env=env, capture_output=True,
                             text=True)
    if res.returncode != 0:
        raise RuntimeError(f"the snippet failed at {rev}:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
