"""A non-editable install carries the whole package, the Triton kernels (``kernels/`` installed
as ``tec_fast.kernels``) included. The C++ build is skipped here (TEC_FAST_NO_EXT_BUILD=1): the
editable install of the test command already builds it, and the fallback must then warn once.

The install runs from a copy of the source tree in a temporary folder: setuptools writes
``build/`` and ``*.egg-info`` beside ``setup.py``, and the checkout must stay clean."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# what the build itself produces, caches, and environments: not part of the source
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", "runs", "*.so", "_build_info.json")


def _build_outputs(folder: str) -> dict:
    """Every file and folder under what a build writes at the top of a source tree (``build/``,
    ``dist/``, ``*.egg-info``), with its modification time: a build into an existing ``build/``
    rewrites files inside it."""
    found = {}
    for name in os.listdir(folder):
        if name in ("build", "dist") or name.endswith(".egg-info"):
            top = os.path.join(folder, name)
            found[top] = os.stat(top).st_mtime_ns
            for dirpath, dirnames, filenames in os.walk(top):
                for entry in dirnames + filenames:
                    path = os.path.join(dirpath, entry)
                    found[path] = os.lstat(path).st_mtime_ns
    return found


def test_non_editable_install_has_the_kernels(tmp_path):
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    before = _build_outputs(ROOT)
    env = {**os.environ, "TEC_FAST_NO_EXT_BUILD": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                           "--target", str(target), str(source)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "tec_fast" / "kernels" / "relation_loss.py").is_file()
    code = ("import tec_fast, tec_fast.kernels.relation_loss, tec_fast.kernels.encoder_adapter, tec_fast.packing; "
            "print(tec_fast.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
                         check=True, capture_output=True, text=True)
    assert out.stdout.strip().startswith(str(target))
    assert _build_outputs(ROOT) == before  # nothing was written into the checkout (no build/, *.egg-info)
