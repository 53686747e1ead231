"""benchmarks/bench_loader.py runs end to end on a tiny folder and writes its rows."""
from __future__ import annotations

import json

from data_helpers import write_folder


def test_bench_loader_smoke(tmp_path, capsys):
    from benchmarks.bench_loader import main

    data = write_folder(tmp_path / "imgs", n=6, size=(40, 30))
    out = tmp_path / "loader.jsonl"
    assert main(["--data", data, "--img-size", "16", "--batch-size", "2", "--images", "4", "--workers", "1",
                 "--seconds", "0.3", "--repeats", "1", "--results", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert by[("baseline", "in_process")]["bytes_per_image"] == 3 * 16 * 16 * 4       # float32
    assert by[("engine_pil", "in_process")]["bytes_per_image"] == 3 * 16 * 16          # uint8
    assert by[("engine_pil", "workers=1")]["bytes_ratio"] == by[("baseline", "workers=1")]["bytes_per_image"] / \
        by[("engine_pil", "workers=1")]["bytes_per_image"]
    assert all(r["device"].startswith("cpu-") and r["bench"] == "loader" for r in rows)
    assert "speedup_per_core" in capsys.readouterr().out


def test_bench_loader_makes_as_many_jpegs_as_asked(tmp_path, capsys):
    """--jpegs sets how many --make-jpegs writes (a lent GPU's stage has seconds, not minutes, for
    it); with --data it is refused."""
    import glob

    import pytest

    from benchmarks.bench_loader import main

    out = tmp_path / "loader.jsonl"
    assert main(["--make-jpegs", str(tmp_path / "jpegs"), "--jpegs", "5", "--img-size", "16", "--images", "4",
                 "--workers", "--repeats", "1", "--providers", "engine", "--results", str(out)]) == 0
    assert len(glob.glob(str(tmp_path / "jpegs" / "*" / "*.jpg"))) == 5
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "jpegs"), "--jpegs", "5", "--results", str(out)])
    assert "argument --jpegs: goes with --make-jpegs" in capsys.readouterr().err
