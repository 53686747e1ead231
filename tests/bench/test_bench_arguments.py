"""The benchmark scripts refuse, while parsing and before anything is measured or written, what
they used to end in a traceback after the measurement (or let through): an output path that
cannot be written, a mask ratio that leaves the model no visible patch, an input folder without
images, an empty list, an unknown GPU class. Each refusal is one ``error: argument --FLAG: ...``
line with exit status 2. Every flag of every script explains itself in --help."""
import importlib
import json

import pytest
from conftest import refused_in_one_line

import benchmarks.common

SCRIPTS = ("bench_ops", "bench_step", "bench_packed", "bench_packing", "bench_loader", "host_overhead",
           "profile_step", "traffic", "compile_report", "dispatch_table", "report", "flops", "gemm_epilogue")


def _refused(capsys, module: str, argv, flag: str) -> str:
    return refused_in_one_line(importlib.import_module(f"benchmarks.{module}").main, argv, capsys, flag)


@pytest.fixture
def afile(tmp_path):
    path = tmp_path / "afile"
    path.write_text("not a folder\n")
    return path


# (script, the rest of a cheap command line, the output flag)
RESULT_DIRS = [
    ("bench_ops", ["--op", "layer_norm", "--device", "cpu"], "--results-dir"),
    ("bench_step", ["--preset", "tiny", "--device", "cpu", "--no-baseline"], "--results-dir"),
    ("bench_packed", ["--preset", "tiny", "--device", "cpu"], "--results-dir"),
    ("bench_packing", ["--small", "--device", "cpu"], "--results-dir"),
    ("profile_step", ["--preset", "tiny", "--device", "cpu", "--no-baseline"], "--results-dir"),
    ("profile_step", ["--preset", "tiny", "--device", "cpu", "--no-baseline"], "--trace"),
    ("gemm_epilogue", ["--offline"], "--results-dir"),
    ("bench_loader", ["--data", "."], "--make-jpegs"),
]
RESULT_FILES = [
    ("bench_loader", ["--data", "."], "--results"),
    ("traffic", ["--model", "tiny"], "--results"),
]
OPTIONAL_FILES = [  # '' means "no file" here
    ("host_overhead", ["--skip-step", "--ops", "layer_norm"], "--out"),
    ("compile_report", ["--sizes", "vitb", "--arch", "90"], "--out"),
]


@pytest.mark.parametrize("module, argv, flag", RESULT_DIRS + RESULT_FILES + OPTIONAL_FILES)
def test_an_output_path_under_a_file_is_refused_before_measuring(module, argv, flag, afile, capsys):
    if flag == "--make-jpegs":
        argv = []  # --make-jpegs and --data are exclusive
    line = _refused(capsys, module, argv + [flag, str(afile / "sub" / "x.jsonl")], flag)
    assert f"{str(afile)!r} is a file, not a folder" in line
    assert afile.read_text() == "not a folder\n"


@pytest.mark.parametrize("module, argv, flag", RESULT_DIRS)
def test_a_results_dir_that_is_a_file_or_empty_is_refused(module, argv, flag, afile, capsys):
    if flag == "--make-jpegs":
        argv = []
    assert "is a file, not a folder" in _refused(capsys, module, argv + [flag, str(afile)], flag)
    if flag != "--trace":  # '' is --trace's default: no trace
        assert "got an empty string" in _refused(capsys, module, argv + [flag, ""], flag)


@pytest.mark.parametrize("module, argv, flag", RESULT_FILES + OPTIONAL_FILES)
def test_a_results_file_that_is_a_folder_is_refused(module, argv, flag, tmp_path, capsys):
    assert "is a folder; give a file name" in _refused(capsys, module, argv + [flag, str(tmp_path)], flag)
    if (module, argv, flag) in RESULT_FILES:
        assert "got an empty string" in _refused(capsys, module, argv + [flag, ""], flag)
    assert not list(tmp_path.iterdir())


def test_trace_and_rows_go_where_asked(tmp_path, capsys):
    from benchmarks import profile_step
    out, trace = tmp_path / "new" / "rows", tmp_path / "traces"
    profile_step.main(["--preset", "tiny", "--device", "cpu", "--no-baseline", "--batch", "2", "--steps", "1",
                       "--warmup", "0", "--top", "2", "--results-dir", str(out), "--trace", str(trace)])
    assert (out / "profile.jsonl").is_file() and [p.name for p in trace.iterdir()] == ["trace_engine_B2.json"]


def test_host_overhead_empty_out_still_means_no_file(tmp_path, capsys, monkeypatch):
    """--out '' writes nothing (the run itself is stubbed: only the writing is under test)."""
    from benchmarks import host_overhead
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    def run(args, ops, device, write):
        write([dict(table="op", op="x")])
        return [dict(table="op", op="x")]
    monkeypatch.setattr(host_overhead, "_run", run)
    monkeypatch.chdir(tmp_path)
    assert host_overhead.main(["--skip-step", "--ops", "layer_norm", "--out", ""]) == 0
    assert "appended" not in capsys.readouterr().out and not list(tmp_path.iterdir())
    assert host_overhead.main(["--skip-step", "--ops", "layer_norm", "--out", str(tmp_path / "a" / "h.jsonl")]) == 0
    assert json.loads((tmp_path / "a" / "h.jsonl").read_text())["op"] == "x"


# --- mask ratios the model would refuse ---------------------------------------------------------
@pytest.mark.parametrize("module, argv, flag", [
    ("bench_step", ["--preset", "tiny", "--device", "cpu", "--mask-ratio", "0.99"], "--mask-ratio"),
    ("profile_step", ["--preset", "tiny", "--device", "cpu", "--mask-ratio", "0.99"], "--mask-ratio"),
    ("traffic", ["--model", "tiny", "--no-save", "--mask-ratio", "0.99"], "--mask-ratio"),
    ("traffic", ["--model", "vit_b", "tiny", "--no-save", "--mask-ratio", "0.99"], "--mask-ratio"),
    ("bench_packed", ["--preset", "tiny", "--device", "cpu", "--ratios", "0.99:0.99"], "--ratios"),
    ("bench_packed", ["--preset", "tiny", "--device", "cpu", "--ratios", "0.5:0.99"], "--ratios"),
    ("flops", ["--model", "tiny", "--mask-ratio", "0.99"], "--mask-ratio"),
    ("flops", ["--mask-ratio", "0.995"], "--mask-ratio"),  # ViT-B/16 at 224: 196 patches
])
def test_a_mask_ratio_leaving_no_visible_patch_is_refused(module, argv, flag, tmp_path, capsys):
    out = ["--results-dir", str(tmp_path)] if module not in ("traffic", "flops") else []
    line = _refused(capsys, module, argv + out, flag)
    assert "leaves no visible patch" in line
    assert not list(tmp_path.iterdir())


def test_a_mask_ratio_leaving_one_patch_is_accepted(capsys):
    from benchmarks import flops
    flops.main(["--model", "tiny", "--mask-ratio", "0.98"])  # int(64 x 0.02) = 1
    assert "(1 visible)" in capsys.readouterr().out
    flops.main(["--mask-ratio", "0.99"])  # int(196 x 0.01) = 1
    assert "(1 visible)" in capsys.readouterr().out


# --- inputs and lists -----------------------------------------------------------------------------
def test_bench_loader_inputs(tmp_path, afile, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = ["--results", str(tmp_path / "rows.jsonl")]
    assert "no images" in _refused(capsys, "bench_loader", ["--data", str(empty)] + out, "--data")
    assert "no such folder" in _refused(capsys, "bench_loader", ["--data", str(tmp_path / "nope")] + out, "--data")
    assert "a file, not a folder" in _refused(capsys, "bench_loader", ["--data", str(afile)] + out, "--data")
    _refused(capsys, "bench_loader", ["--data", str(empty), "--providers"] + out, "--providers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty"]


def test_traffic_top_must_be_positive(capsys):
    assert "must be >= 1, got 0" in _refused(capsys, "traffic", ["--model", "tiny", "--no-save", "--top", "0"],
                                             "--top")


@pytest.mark.parametrize("argv, flag", [
    (["--sizes", "", "--check"], "--sizes"),
    (["--sizes", ",", "--arch", ","], "--sizes"),
    (["--arch", ",", "--check"], "--arch"),
    (["--dtype", "", "--check"], "--dtype"),
    (["--ops", ",", "--check"], "--ops"),
])
def test_compile_report_refuses_an_empty_list(argv, flag, tmp_path, capsys):
    line = _refused(capsys, "compile_report", argv + ["--out", str(tmp_path / "c.jsonl")], flag)
    assert "names nothing" in line
    assert not list(tmp_path.iterdir())


def test_host_overhead_refusals_are_one_line(capsys):
    assert "no op named" in _refused(capsys, "host_overhead", ["--ops", ","], "--ops")
    assert "unknown ['nope']" in _refused(capsys, "host_overhead", ["--ops", "nope"], "--ops")
    assert "must be >= 1, got 0" in _refused(capsys, "host_overhead", ["--threads", "0"], "--threads")
    with pytest.raises(SystemExit) as e:
        importlib.import_module("benchmarks.host_overhead").main(["--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: unrecognized arguments: --bogus") and err.count("\n") == 1


# --- dispatch_table --device-name -----------------------------------------------------------------
def _ops_rows(path, device="NVIDIA_H200"):
    rows = [dict(bench=f"mlp_{pss}", provider=prov, shape="s", dtype="bf16", median_ms=ms, commit="c",
                 timestamp="2030-01-01T00:00:00+00:00", device=device)
            for pss in ("fwd", "fwdbwd") for prov, ms in (("triton", 1.0), ("reference", 2.0))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dispatch_table_refuses_an_unknown_gpu_class(tmp_path, capsys):
    rows = _ops_rows(tmp_path / "rows.jsonl")
    out = tmp_path / "out"
    line = _refused(capsys, "dispatch_table", ["--results", str(rows), "--device-name", "Bogus GPU",
                                               "--out-dir", str(out)], "--device-name")
    assert "unknown GPU class 'Bogus GPU'" in line and "H100" in line
    assert not out.exists()


@pytest.mark.parametrize("name, cls", [("NVIDIA H100 80GB HBM3", "H100"), ("h200", "H200"), ("NVIDIA_A100", "A100")])
def test_dispatch_table_files_a_known_device_name_under_its_class(name, cls, tmp_path, capsys):
    from benchmarks import dispatch_table
    rows = _ops_rows(tmp_path / "rows.jsonl")
    assert dispatch_table.main(["--results", str(rows), "--device-name", name, "--out-dir", str(tmp_path / "o")]) == 0
    written = json.loads((tmp_path / "o" / f"{cls}.json").read_text())
    assert written["gpu_class"] == cls and written["device"] == name


def test_dispatch_table_out_dir_is_checked(tmp_path, afile, capsys):
    rows = _ops_rows(tmp_path / "rows.jsonl")
    assert "is a file, not a folder" in _refused(capsys, "dispatch_table", ["--results", str(rows), "--out-dir",
                                                                             str(afile)], "--out-dir")


# --- report -----------------------------------------------------------------------------------------
def test_report_refuses_a_missing_or_file_results_dir(tmp_path, afile, capsys):
    assert "no such folder" in _refused(capsys, "report", ["--results-dir", str(tmp_path / "nope")], "--results-dir")
    assert "a file, not a folder" in _refused(capsys, "report", ["--results-dir", str(afile)], "--results-dir")


def test_report_names_the_folder_it_read(tmp_path, capsys):
    from benchmarks import report
    (tmp_path / "cpu.jsonl").write_text(json.dumps(dict(bench="step", device="cpu-x86_64-2c")) + "\n")
    report.main(["--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"CPU rows in `{tmp_path}/`" in out and "`benchmarks/results/`" not in out
    assert report.tables([]).endswith("CPU rows in `benchmarks/results/` are smoke runs, not performance figures.")


def test_report_update_checks_both_files_before_writing(tmp_path, capsys):
    from benchmarks import report
    results = tmp_path / "results"
    results.mkdir()
    marked = "a\n<!-- perf:begin -->\nold\n<!-- perf:end -->\nb\n<!-- host:begin -->\nold\n<!-- host:end -->\n"
    readme, doc = tmp_path / "README.md", tmp_path / "perf.md"
    readme.write_text(marked)
    doc.write_text(marked)
    base = ["--results-dir", str(results), "--update-readme"]
    line = _refused(capsys, "report", base + ["--readme", str(tmp_path / "none.md"), "--doc", str(doc)], "--readme")
    assert "no such file" in line
    doc_line = _refused(capsys, "report", base + ["--readme", str(readme), "--doc", str(results)], "--doc")
    assert "a folder" in doc_line
    (tmp_path / "plain.md").write_text("no markers\n")
    line = _refused(capsys, "report", base + ["--readme", str(readme), "--doc", str(tmp_path / "plain.md")], "--doc")
    assert "has no <!-- perf:begin --> ... <!-- perf:end --> or <!-- host:begin -->" in line
    assert readme.read_text() == marked and doc.read_text() == marked  # nothing half-written
    report.main(base + ["--readme", str(readme), "--doc", str(doc)])
    assert "No GPU results yet" in readme.read_text() and "No host-cost rows yet" in doc.read_text()


# --- the command line itself ------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["report", "dispatch_table", "host_overhead"])
def test_usage_line_and_one_line_refusals(module, capsys):
    mod = importlib.import_module(f"benchmarks.{module}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: python -m benchmarks.{module} ")
    with pytest.raises(SystemExit) as e:
        mod.main(["--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines() == [
        f"error: unrecognized arguments: --bogus (see python -m benchmarks.{module} --help)"]


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_flag_has_help(module, monkeypatch, capsys):
    made = []
    real = benchmarks.common.make_parser

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]
    mod = importlib.import_module(f"benchmarks.{module}")
    monkeypatch.setattr(benchmarks.common, "make_parser", recording)
    if hasattr(mod, "make_parser"):
        monkeypatch.setattr(mod, "make_parser", recording)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    (parser,) = made
    silent = [a.option_strings[0] for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert not silent, f"{module}: flags without help: {silent}"
