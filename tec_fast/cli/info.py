"""``python -m tec_fast.info``: versions, the compiled extension, and which backend each op and
the attention would use on this machine (with the reasons the others were skipped, and the
measured Triton/reference speed ratio behind each choice ``TEC_FAST_KERNELS=auto`` makes on a GPU)."""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from tec_fast.cli.errors import run_command
from tec_fast.cli.flags import Parser


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:  # not installed, or its compiled part does not load
        return f"not available ({type(exc).__name__})"


def _ratio(entry) -> str:
    return f"{entry['speedup']:.2f}x" if entry else "-"


def collect(gpu: str = None) -> dict:
    """Everything the command prints; ``gpu`` names a GPU class whose measured table the op
    choices follow (default: this machine's GPU; on a CPU-only machine the ops run on CPU)."""
    from tec_fast.ops import dispatch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda or gpu else "cpu")
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "apex": _version("apex"),
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "kernel_mode": dispatch.kernel_mode(),
        "gpu_class": gpu or (dispatch.gpu_class(torch.cuda.get_device_name(0)) if cuda else None),
        "measured_tables": sorted(dispatch.load_tables()),
        "ops": {},
    }
    measured = dispatch.measured_report(device.type, gpu=gpu)
    # ViT-B/16 sizes, bf16, training (forward + backward); measured: Triton speed / reference speed
    for op, (backend, reasons) in dispatch.dispatch_report(device.type, gpu=gpu).items():
        m = measured.get(op, {})
        info["ops"][op] = {"backend": backend, "skipped_because": reasons,
                           "measured_fwd": m.get("fwd"), "measured_fwdbwd": m.get("fwdbwd")}
    try:
        from tec_fast import packing
        info["extension"] = packing.extension_status()
        info["packing"] = {"cpu": packing.backend("cpu"), "cuda": packing.backend("cuda")}
    except Exception as exc:
        info["extension"] = {"built": False, "reason": f"{type(exc).__name__}: {exc}"}
    try:
        from tec_fast.kernels._common import launch_path
        info["launch"] = launch_path()
    except Exception as exc:  # Triton does not import: no kernel launches at all
        info["launch"] = f"no Triton kernels ({type(exc).__name__}: {exc})"
    from tec_fast.ops.attention import packed_attention_backend

    packed, skipped = packed_attention_backend(torch.device("cuda" if cuda else "cpu"), torch.bfloat16)
    info["attention"] = {
        "dense": "torch.nn.functional.scaled_dot_product_attention",
        "packed": packed,
        "packed_skipped_because": skipped,
    }
    return info


def gpu_class_flag(text: str) -> str:
    """``--gpu``: a GPU class (any case: h200 is H200) or a device name as CUDA reports it
    ("NVIDIA H100 80GB HBM3"), as the class ``dispatch.gpu_class`` files it under; an unknown
    class is refused with the known ones."""
    from tec_fast.ops import dispatch

    name = text.strip()
    if not name:
        raise argparse.ArgumentTypeError("empty GPU class")
    measured = sorted(dispatch.load_tables())
    known = sorted(set(dispatch.GPU_CLASSES) | set(measured))
    cls = {c.upper(): c for c in known}.get(name.upper()) or dispatch.gpu_class(name.upper())
    if cls not in known:
        raise argparse.ArgumentTypeError(f"unknown GPU class {text!r} (known: {', '.join(known)}; with a "
                                         f"measured table: {', '.join(measured) or 'none'})")
    return cls


def main(argv=None) -> int:
    """The command: exit status 0, 2 for a refused flag or setting (one ``error:`` line, e.g. an
    unknown ``TEC_FAST_KERNELS``)."""
    return run_command(_main, argv)


def _main(argv=None) -> int:
    parser = Parser(
        prog="python -m tec_fast.info",
        description="Print versions, the compiled extension's status and the backend each op and the "
                    "attention would use here (and why the faster ones were skipped).")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--gpu", default=None, metavar="CLASS", type=gpu_class_flag,
                        help="show the op choices auto makes on this GPU class (e.g. H200, any case: its "
                             "measured table in tec_fast/ops/measured/), even without that GPU here")
    args = parser.parse_args(argv)
    info = collect(args.gpu)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key in ("python", "torch", "torch_cuda", "triton", "xformers", "apex", "device", "kernel_mode"):
        print(f"{key:<12} {info[key]}")
    ext = info["extension"]
    print(f"{'extension':<12} " + ", ".join(f"{k}={v}" for k, v in ext.items()))
    for dev, how in info.get("packing", {}).items():
        print(f"{'packing ' + dev:<12} {how}")
    print(f"{'launches':<12} {info['launch']}")
    gpu = info["gpu_class"]
    print(f"\nops at ViT-B/16 sizes, bf16, training; measured = reference time / Triton time on "
          f"{gpu or 'no GPU'} (tables: {', '.join(info['measured_tables']) or 'none'})")
    print(f"{'op':<18} {'backend':<10} {'fwd':>6} {'fwd+bwd':>8}  why not the fast path")
    for op, d in info["ops"].items():
        print(f"{op:<18} {d['backend']:<10} {_ratio(d['measured_fwd']):>6} {_ratio(d['measured_fwdbwd']):>8}  "
              f"{'; '.join(d['skipped_because']) or '-'}")
    att = info["attention"]
    print(f"\nattention (dense)  {att['dense']}\nattention (packed) {att['packed']}"
          + (f" (skipped: {'; '.join(att['packed_skipped_because'])})" if att["packed_skipped_because"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
