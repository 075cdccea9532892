"""The session process imports only the standard library before its install stage has run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_session_command_imports_only_the_standard_library():
    # -S: no site-packages, so an import of anything installed fails here as it would before
    # the install stage.
    script = (
        "import json, sys\nsys.path.insert(0, sys.argv[1])\n"
        "import dist_llama.session.cli\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", script, str(REPO)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout)
    foreign = [
        m for m in modules if m.split(".")[0] not in {*sys.stdlib_module_names, "__main__", "dist_llama"}
    ]
    assert foreign == []
    # Beside the session: the one error convention, the stage runner and the checkpoint folders' names, all
    # standard library only.
    outside = {m for m in modules if m.startswith("dist_llama.") and not m.startswith("dist_llama.session")}
    assert outside == {"dist_llama.cli", "dist_llama.stages", "dist_llama.checkpoint_folders"}
