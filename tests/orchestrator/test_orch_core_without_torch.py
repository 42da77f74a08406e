"""`core` and `pipeline` import in the orchestrator environment, where torch is not installed."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import subprocess
import sys


def test_torch_is_not_installed_here():
    assert importlib.util.find_spec("torch") is None
    assert importlib.util.find_spec("transformers") is None


def test_every_core_module_imports_without_torch():
    import facial_r1_core

    names = [m.name for m in pkgutil.iter_modules(facial_r1_core.__path__, "facial_r1_core.")]
    assert names
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "import facial_r1_pipeline.iteration, facial_r1_pipeline.promotion\n"
        "assert 'torch' not in sys.modules\n"
        "from facial_r1_core.parser import parse_completion\n"
        "p = parse_completion('<think>AU6 and AU12.</think><answer>happiness</answer>')\n"
        "assert p.format_valid and p.emotions == ('happiness',), p\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_facial_r1_command_lists_pipeline_verbs():
    exe = __import__("pathlib").Path(sys.executable).with_name("facial-r1")
    proc = subprocess.run([str(exe), "pipeline", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for verb in ("prepare-data", "version-data", "render-k8s", "summary", "demo"):
        assert verb in proc.stdout
