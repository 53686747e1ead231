"""benchmarks/run_device.sh parses, and every script it runs exists (its flags are checked against
each script's --help by `DRY_RUN=1 bash benchmarks/run_device.sh`, which takes a minute)."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "run_device.sh")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_device_parses_and_its_scripts_exist():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    text = open(SCRIPT).read().replace("\\\n", " ")  # continuation lines joined
    stages = re.findall(r"^stage (\S+) (\d+) (\d+) (.*)$", text, flags=re.M)
    names = [s[0] for s in stages]
    for needed in ("step", "gpu_tests", "ops", "dispatch_table", "host_overhead", "packed", "report"):
        assert needed in names, needed
    for _, cap, minimum, cmd in stages:
        assert int(minimum) <= int(cap)
        for path in re.findall(r"benchmarks/\w+\.py", cmd):
            assert os.path.isfile(os.path.join(ROOT, path)), path
        for mod in re.findall(r"-m (benchmarks\.\w+)", cmd):
            assert os.path.isfile(os.path.join(ROOT, *mod.split(".")) + ".py"), mod
    step = next(s for s in stages if s[0] == "step")[3]
    assert "--batch-sizes 32 64 128 256" in step and "--cuda-graph" in step
    assert "--ratios 0.6:0.9" in next(s for s in stages if s[0] == "packed")[3]


def test_gpu_tests_stage_runs_every_gpu_test_file():
    """The gpu_tests stage names its test paths (the ops' tests first): every file with a test
    marked gpu is under one of them."""
    text = open(SCRIPT).read().replace("\\\n", " ")
    cmd = next(line for line in text.splitlines() if line.startswith("stage gpu_tests "))
    paths = [p.rstrip("/") for p in re.findall(r"\btests/\S*", cmd)]
    assert paths and paths[0] == "tests/ops/test_ops_gpu.py", paths
    marked = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in files:
            path = os.path.join(folder, name)
            if name.startswith("test_") and name.endswith(".py") and "mark.gpu" in open(path).read():
                marked.append(os.path.relpath(path, ROOT))
    assert len(marked) >= 9
    missed = [m for m in marked if not any(m == p or m.startswith(p + "/") for p in paths)]
    assert not missed, f"gpu-marked tests the gpu_tests stage does not run: {missed}"
