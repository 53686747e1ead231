"""A non-editable install carries the whole package, the Triton kernels (``kernels/`` installed
as ``tec_fast.kernels``) included. The C++ build is skipped here (TEC_FAST_NO_EXT_BUILD=1): the
editable install of the test command already builds it, and the fallback must then warn once.
With a CUDA torch and nvcc, a CUDA part that fails to build leaves the install to go on without it.

The install runs from a copy of the source tree in a temporary folder: setuptools writes
``build/`` and ``*.egg-info`` beside ``setup.py``, and the checkout must stay clean."""
import json
import os
import shutil
import subprocess
import sys

import pytest

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


def _cuda_torch_and_nvcc() -> bool:
    import torch
    return bool(torch.version.cuda) and shutil.which("nvcc") is not None


@pytest.mark.skipif(not _cuda_torch_and_nvcc(), reason="the CUDA part is only attempted with a CUDA torch and nvcc")
def test_a_failed_cuda_part_still_installs(tmp_path):
    """Where the optional CUDA part fails to build (here: an architecture nvcc does not know),
    the install goes on without it and says why; an in-place build, as an editable install makes,
    copies only the extensions that built into the source tree (it used to fail on the missing
    CUDA module)."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "1.0"}  # no such architecture
    env.pop("FORCE_CUDA", None)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=source, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "installing without the CUDA part" in proc.stderr
    assert list((source / "tec_fast").glob("_C.*.so")) and not list((source / "tec_fast").glob("_C_cuda.*.so"))
    with open(source / "tec_fast" / "_build_info.json") as f:
        info = json.load(f)
    assert info["cpu"]["built"] and not info["cuda"]["built"] and info["cuda"]["reason"].startswith("build failed")
