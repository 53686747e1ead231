"""benchmarks/run_device.sh parses, and every script it runs exists (its flags are checked against
each script's --help by `DRY_RUN=1 bash benchmarks/run_device.sh`, which takes a minute); its
--help, its refusal of arguments and of a bad BUDGET_S, and its exit status 1 when a stage failed
(dry runs, under tmp_path: nothing is written into the repository)."""
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
    for needed in ("step", "gpu_tests_ops", "gpu_tests_engine", "ops", "dispatch_table", "host_overhead",
                   "packed", "report"):
        assert needed in names, needed
    # what the engine runs in auto mode comes from this run's table: it is written before any stage
    # that times the engine (the step, host overhead, packed, profile)
    for timed in ("step", "host_overhead", "packed", "profile", "per_weight_casts"):
        assert names.index("ops") < names.index("dispatch_table") < names.index(timed), timed
    for _, cap, minimum, cmd in stages:
        assert int(minimum) <= int(cap)
        for path in re.findall(r"benchmarks/\w+\.py", cmd):
            assert os.path.isfile(os.path.join(ROOT, path)), path
        for mod in re.findall(r"-m (benchmarks\.\w+)", cmd):
            assert os.path.isfile(os.path.join(ROOT, *mod.split(".")) + ".py"), mod
    step = next(s for s in stages if s[0] == "step")[3]
    assert "--batch-sizes 32 64 128 256" in step and "--cuda-graph" in step
    assert "--ratios 0.6:0.9" in next(s for s in stages if s[0] == "packed")[3]


def test_gpu_tests_stages_run_every_gpu_test_file():
    """The gpu_tests stages name their test paths (the ops' tests in a stage of their own, so that
    compiling every kernel cannot use up the engine tests' time): every file with a test marked
    gpu is under one of them, and no path is run twice."""
    text = open(SCRIPT).read().replace("\\\n", " ")
    cmds = {line.split()[1]: line for line in text.splitlines() if line.startswith("stage gpu_tests")}
    assert set(cmds) == {"gpu_tests_ops", "gpu_tests_engine"}
    ops, engine = ([p.rstrip("/") for p in re.findall(r"\btests/\S*", cmds[name])]
                   for name in ("gpu_tests_ops", "gpu_tests_engine"))
    assert ops and ops[0] == "tests/ops/test_ops_gpu.py" and all(p.startswith("tests/ops/") for p in ops), ops
    assert engine and not any(p.startswith("tests/ops") for p in engine), engine
    paths = ops + engine
    assert len(set(paths)) == len(paths)
    marked = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in files:
            path = os.path.join(folder, name)
            if name.startswith("test_") and name.endswith(".py") and "mark.gpu" in open(path).read():
                marked.append(os.path.relpath(path, ROOT))
    assert len(marked) >= 9
    missed = [m for m in marked if not any(m == p or m.startswith(p + "/") for p in paths)]
    assert not missed, f"gpu-marked tests the gpu_tests stage does not run: {missed}"


def _run(tmp_path, *args, **env):
    """``bash run_device.sh ARGS`` as a dry run whose logs and packed results stay under tmp_path."""
    full = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "LOGS": str(tmp_path / "logs"), **env}
    return subprocess.run(["bash", SCRIPT, *args], env=full, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_header_and_runs_nothing(tmp_path, flag):
    r = _run(tmp_path, flag, DRY_RUN="")  # not a dry run: --help alone keeps the suite from starting
    assert r.returncode == 0, r.stderr
    assert "The whole GPU suite in one command" in r.stdout and "BUDGET_S" in r.stdout
    assert "set -uo" not in r.stdout and not r.stdout.startswith("#")  # the comment text, not the code
    assert "===" not in r.stdout and not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("args", [["--budget", "10"], ["now"]])
def test_an_argument_is_refused_in_one_line_before_anything_runs(tmp_path, args):
    r = _run(tmp_path, *args, DRY_RUN="")
    assert r.returncode == 2
    assert r.stderr.startswith("error: run_device.sh takes no arguments") and r.stderr.count("\n") == 1
    assert r.stdout == "" and not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("budget", ["1x", "abc", "0", "-5", " ", "1e3"])
def test_a_bad_budget_is_refused_naming_budget_s(tmp_path, budget):
    r = _run(tmp_path, BUDGET_S=budget)
    assert r.returncode == 2
    assert r.stderr.startswith("error: BUDGET_S must be a positive whole number") and r.stderr.count("\n") == 1
    assert r.stdout == "" and not (tmp_path / "logs").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_stage_skipped_for_budget_exits_0(tmp_path):
    """A 1 s budget skips every stage: nothing failed, exit 0 (skipped is not a failure)."""
    r = _run(tmp_path, BUDGET_S="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skip step" in r.stdout and "not ok" not in r.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_stages_that_fail_make_the_run_exit_1_after_every_stage_ran(tmp_path):
    """PYTHON that does not exist: each of our scripts' --help fails (dry_bad_flags). Every stage
    still runs (report, the last one, included), then the run exits 1 naming them."""
    r = _run(tmp_path, PYTHON=str(tmp_path / "no_such_python"))
    assert r.returncode == 1, r.stdout + r.stderr
    stages = (tmp_path / "out").glob("device_logs/*/stages.jsonl")
    lines = [ln for f in stages for ln in f.read_text().splitlines()]
    assert any('"stage": "report"' in ln and "dry_bad_flags" in ln for ln in lines), lines
    last = r.stdout.strip().splitlines()[-1]
    assert "stage(s) not ok: info (dry_bad_flags); ops (dry_bad_flags); dispatch_table (dry_bad_flags); step (dry_bad_flags);" in last
    assert last.endswith("report (dry_bad_flags)")
    assert "build" not in last  # pip's flags are not checked: dry_ok
