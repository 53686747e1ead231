"""A non-editable install carries the whole package, the Triton kernels (``kernels/`` installed
as ``tec_fast.kernels``) included. The C++ build is skipped here (TEC_FAST_NO_EXT_BUILD=1): the
editable install of the test command already builds it, and the fallback must then warn once."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_non_editable_install_has_the_kernels(tmp_path):
    target = tmp_path / "site"
    env = {**os.environ, "TEC_FAST_NO_EXT_BUILD": "1"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                    "--target", str(target), ROOT], check=True, env=env, capture_output=True, text=True)
    assert (target / "tec_fast" / "kernels" / "relation_loss.py").is_file()
    code = ("import tec_fast, tec_fast.kernels.relation_loss, tec_fast.kernels.encoder_adapter, tec_fast.packing; "
            "print(tec_fast.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
                         check=True, capture_output=True, text=True)
    assert out.stdout.strip().startswith(str(target))
