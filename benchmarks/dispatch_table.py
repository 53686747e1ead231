"""Write the measured dispatch table of a GPU class from its per-op benchmark rows.

``TEC_FAST_KERNELS=auto`` takes an op's Triton path on a GPU only where this table says the
Triton path was faster than the plain-torch reference on that GPU class (``tec_fast.ops.dispatch``
reads ``tec_fast/ops/measured/<class>.json`` at import). The rows come from
``benchmarks/bench_ops.py`` (``<op>_fwd`` and ``<op>_fwdbwd``, providers ``triton`` and
``reference``, timed in one process, eager timing, not CUDA-graph replays); for every op and pass
the newest run that has both providers at one shape, dtype and commit is taken, and its speedup
(reference ms / Triton ms) is written with the shape, dtype, commit and timestamp it was measured
at. ``benchmarks/run_device.sh`` runs this after the op benchmarks; the file is committed.

    python -m benchmarks.dispatch_table                              # this GPU's results file
    python -m benchmarks.dispatch_table --results benchmarks/results/NVIDIA_H200.jsonl
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Dict, List, Optional

from benchmarks.common import REPO, format_table, make_parser, results_dir

PASSES = {"fwd": "forward", "fwdbwd": "forward + backward"}


def read_rows(path: str) -> List[Dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not a JSON line ({exc})") from None
    return rows


def build_table(rows: List[Dict], ops: List[str], dtype: str = "bf16") -> Dict[str, Dict[str, dict]]:
    """Op -> pass -> entry, from ``bench_ops`` rows (see the module docstring). Rows measured
    before an op's ``kernels_changed`` time (``tec_fast/ops/registry.py``) describe kernels it no
    longer has and are left out."""
    from tec_fast.ops.registry import OPS
    since = {name: spec.kernels_changed for name, spec in OPS.items() if spec.kernels_changed}
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for r in rows:
        bench, provider = r.get("bench", ""), r.get("provider")
        op, _, pss = bench.rpartition("_")
        if op not in ops or pss not in PASSES or provider not in ("triton", "reference"):
            continue
        if op in since and r.get("timestamp", "") < since[op]:
            continue
        if r.get("dtype") != dtype or r.get("timing", "eager") != "eager" or not r.get("median_ms"):
            continue
        key = (op, pss, r.get("shape"), r.get("commit"))
        best = groups.setdefault(key, {}).get(provider)
        if best is None or r.get("timestamp", "") >= best.get("timestamp", ""):
            groups[key][provider] = r
    table: Dict[str, Dict[str, dict]] = {}
    for (op, pss, shape, commit), pair in groups.items():
        if set(pair) != {"triton", "reference"}:
            continue
        t, ref = pair["triton"], pair["reference"]
        stamp = max(t.get("timestamp", ""), ref.get("timestamp", ""))
        current = table.get(op, {}).get(pss)
        if current is not None and current["timestamp"] > stamp:
            continue
        table.setdefault(op, {})[pss] = dict(
            speedup=round(ref["median_ms"] / t["median_ms"], 4), pass_=PASSES[pss], shape=shape, dtype=dtype,
            triton_ms=t["median_ms"], reference_ms=ref["median_ms"], commit=commit, timestamp=stamp)
    for entries in table.values():
        for e in entries.values():
            e["pass"] = e.pop("pass_")
    return table


def write_atomic(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def device_name_flag(text: str) -> str:
    """``--device-name``: a GPU's name as CUDA reports it ("NVIDIA H200") or a GPU class (h200),
    kept as given, refused where it is not a GPU class ``tec_fast.ops.dispatch`` knows
    (``GPU_CLASSES`` or one with a measured table): the check of ``python -m tec_fast.info --gpu``.
    A made-up name would write a table no GPU ever reads."""
    from tec_fast.cli.info import gpu_class_flag

    gpu_class_flag(text)  # ArgumentTypeError: empty, or an unknown class (with the known ones)
    return text.strip()


def main(argv: Optional[List[str]] = None) -> int:
    from tec_fast.ops import dispatch
    from tec_fast.ops.registry import OPS
    p = make_parser("dispatch_table", __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    p.add_argument("--results", default=None,
                   help="bench_ops rows (JSON lines); default: benchmarks/results/<this GPU>.jsonl")
    p.add_argument("--device-name", default=None, type=device_name_flag,
                   help="the GPU's name, e.g. 'NVIDIA H200', or its class (H200): the table is written for "
                        "its class; a name that is no known GPU class is refused (default: read from "
                        "--results' rows)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="the activation dtype whose rows decide (default bf16, the training dtype)")
    p.add_argument("--out-dir", default=dispatch.MEASURED_DIR, type=results_dir,
                   help="where <class>.json is written (made if missing; default tec_fast/ops/measured)")
    args = p.parse_args(argv)
    results = args.results
    if results is None:
        import torch
        if not torch.cuda.is_available():
            p.error("--results is required without a CUDA device")
        from benchmarks.common import device_name
        results = os.path.join(REPO, "benchmarks", "results", f"{device_name('cuda')}.jsonl")
    if not os.path.isfile(results):
        p.error(f"--results: no file {results}")
    try:
        rows = read_rows(results)
    except ValueError as exc:
        p.error(f"--results: {exc}")
    name = args.device_name or next((r["device"] for r in rows if r.get("device")), None)
    if not name:
        p.error(f"--device-name: {results} names no device; pass one")
    gpu = dispatch.gpu_class(name.replace("_", " "))
    table = build_table(rows, list(OPS), args.dtype)
    if not table:
        p.error(f"{results} holds no bench_ops rows with both providers in {args.dtype}")
    out = os.path.join(args.out_dir, f"{gpu}.json")
    write_atomic(out, dict(gpu_class=gpu, device=name, dtype=args.dtype, min_speedup=dispatch.MIN_SPEEDUP,
                           source=os.path.relpath(os.path.abspath(results), REPO),
                           written_by="benchmarks/dispatch_table.py", ops=table))
    summary = [dict(op=op, **{"pass": e["pass"]}, speedup=e["speedup"], shape=e["shape"], commit=e["commit"],
                    auto="triton" if e["speedup"] >= dispatch.MIN_SPEEDUP else "reference")
               for op, entries in sorted(table.items()) for e in entries.values()]
    print(format_table(summary, ["op", "pass", "speedup", "auto", "shape", "commit"]))
    missing = [op for op in OPS if op not in table]
    if missing:
        print(f"unmeasured (auto runs the reference): {', '.join(missing)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
