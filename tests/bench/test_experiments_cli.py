"""The command lines of ``benchmarks/experiments/*``: ``python -m benchmarks.experiments.<name>`` in
the usage line, every flag with help text, and a bad value refused while parsing in one
``error: argument --FLAG: ...`` line with exit status 2 (no traceback after minutes of work)."""
from __future__ import annotations

import importlib
import json

import pytest
from conftest import refused_in_one_line

NAMES = ("block_routes", "launch_path_split", "layer_norm_split", "step_host_split", "demo_seeds", "demo_tune",
         "repro")


def _module(name):
    return importlib.import_module(f"benchmarks.experiments.{name}")



@pytest.mark.parametrize("name", NAMES)
def test_usage_names_the_module_and_an_unknown_flag_is_one_line(name, capsys):
    main = _module(name).main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks.experiments.{name} ")
    argv = ["tec", "--bogus"] if name == "demo_tune" else ["--bogus"]
    err = refused_in_one_line(main, argv, capsys)
    assert "unrecognized arguments: --bogus" in err and f"python -m benchmarks.experiments.{name} --help" in err


@pytest.mark.parametrize("name", ["demo_seeds", "demo_tune", "repro"])
def test_every_flag_has_help_text(name):
    parser = _module(name).build_parser()
    for action in parser._actions:
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"


@pytest.mark.parametrize("name, argv, flag", [
    ("demo_tune", ["tec", "--threads", "0"], "--threads"),
    ("demo_tune", ["tec", "--tec-steps", "0"], "--tec-steps"),
    ("demo_tune", ["tec", "--batch-size", "-1"], "--batch-size"),
    ("demo_tune", ["mae", "--mae-steps", "0"], "--mae-steps"),
    ("demo_tune", ["tec", "--mask-ratio", "1"], "--mask-ratio"),
    ("demo_tune", ["tec", "--tec-lr", "nan"], "--tec-lr"),
    ("demo_tune", ["tec", "--seed", "x"], "--seed"),
    ("repro", ["--seeds", "abc"], "--seeds"),
    ("repro", ["--seeds", "0,0"], "--seeds"),
    ("repro", ["--budgets", "0"], "--budgets"),
    ("repro", ["--jobs", "0"], "--jobs"),
    ("repro", ["--threads", "0"], "--threads"),
    ("repro", ["--finetune-epochs", "0"], "--finetune-epochs"),
    ("repro", ["--reuse", "runs/{x}"], "--reuse"),
    ("demo_seeds", ["--seeds", "1,x"], "--seeds"),
    ("block_routes", ["--reps", "0"], "--reps"),
    ("block_routes", ["--steps", "-1"], "--steps"),
    ("step_host_split", ["--steps", "0"], "--steps"),
    ("launch_path_split", ["--calls", "0"], "--calls"),
    ("layer_norm_split", ["--calls", "x"], "--calls"),
])
def test_bad_values_are_refused_while_parsing(name, argv, flag, capsys):
    err = refused_in_one_line(_module(name).main, argv, capsys)
    assert err.startswith(f"error: argument {flag}: "), err


def test_demo_seeds_refuses_a_collect_folder_that_is_missing_or_unfinished(tmp_path, capsys):
    from benchmarks.experiments import demo_seeds
    err = refused_in_one_line(demo_seeds.main, ["--collect", str(tmp_path / "missing")], capsys)
    assert err.startswith("error: argument --collect: ") and "no such folder" in err
    err = refused_in_one_line(demo_seeds.main, ["--collect", str(tmp_path)], capsys)
    assert err.startswith("error: argument --collect: ") and "results.json" in err


def test_repro_report_only_says_what_it_writes_and_no_plot_writes_nothing(tmp_path, capsys, monkeypatch):
    """--report-only trains nothing, but it does write the plot: its help says so, and --no-plot
    (or --plot FILE) keeps benchmarks/results/repro.png as it is."""
    from benchmarks.experiments import repro
    from tec_fast.demo.recipe import PLANS
    report_only = next(a for a in repro.build_parser()._actions if "--report-only" in a.option_strings)
    assert "plot" in report_only.help and "run nothing" not in report_only.help
    rows = tmp_path / "repro.jsonl"
    plan = PLANS["default"].to_dict()
    rows.write_text("".join(json.dumps({"model": m, "seed": s, "budget": 1, "knn": 0.5, "linear": 0.6,
                                        "finetune": 0.7, "plan": plan}) + "\n"
                            for m in ("tec", "base") for s in (0, 1)))
    monkeypatch.setattr(repro, "RESULTS", str(rows))
    written = []
    monkeypatch.setattr(repro, "plot", lambda summary, path: written.append(path) or path)
    assert repro.main(["--report-only", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| 1x | tec | 2 | 50.0 ± 0.0 | 60.0 ± 0.0 | 70.0 ± 0.0 |" in out and "plot:" not in out
    assert written == []
    assert repro.main(["--report-only", "--plot", str(tmp_path / "sub" / "r.png")]) == 0
    assert written == [str(tmp_path / "sub" / "r.png")] and (tmp_path / "sub").is_dir()
    assert f"plot: {tmp_path / 'sub' / 'r.png'}" in capsys.readouterr().out
    err = refused_in_one_line(repro.main, ["--report-only", "--no-plot", "--plot", str(tmp_path / "r.png")], capsys)
    assert err.startswith("error: argument --no-plot: ")


def test_demo_tune_shows_progress_on_stderr(tmp_path, capsys):
    """A tiny plan, 2 steps: the training's progress line and the per-phase lines on stderr, the
    row in --out (not in benchmarks/results)."""
    from benchmarks.experiments import demo_tune
    out = tmp_path / "tune.jsonl"
    assert demo_tune.main(["tec", "--plan", "tiny", "--tec-steps", "2", "--tag", "t", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "[1/2] training the tec stage (2 steps, seed 0)" in captured.err
    assert "[tec] 2/2" in captured.err and "[2/2] evaluated in" in captured.err
    assert "tec t seed 0: 2 steps" in captured.out
    row = json.loads(out.read_text())
    assert row["tag"] == "t" and row["steps"] == 2
