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
