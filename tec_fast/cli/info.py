"""``python -m tec_fast.info``: versions, the compiled extension, and which backend each op and
the attention would use on this machine (with the reasons the others were skipped)."""
from __future__ import annotations

import json
import platform
import sys

import torch

from tec_fast.cli.flags import Parser


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:  # not installed, or its compiled part does not load
        return f"not available ({type(exc).__name__})"


def collect() -> dict:
    from tec_fast.ops import dispatch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "apex": _version("apex"),
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "kernel_mode": dispatch.kernel_mode(),
        "ops": {},
    }
    for op, (backend, reasons) in dispatch.dispatch_report(device.type).items():  # ViT-B/16, bf16
        info["ops"][op] = {"backend": backend, "skipped_because": reasons}
    try:
        from tec_fast import packing
        info["extension"] = packing.extension_status()
        info["packing"] = {"cpu": packing.backend("cpu"), "cuda": packing.backend("cuda")}
    except Exception as exc:
        info["extension"] = {"built": False, "reason": f"{type(exc).__name__}: {exc}"}
    from tec_fast.ops.attention import packed_attention_backend

    packed, skipped = packed_attention_backend(device, torch.bfloat16)
    info["attention"] = {
        "dense": "torch.nn.functional.scaled_dot_product_attention",
        "packed": packed,
        "packed_skipped_because": skipped,
    }
    return info


def main(argv=None) -> int:
    parser = Parser(
        prog="python -m tec_fast.info",
        description="Print versions, the compiled extension's status and the backend each op and the "
                    "attention would use here (and why the faster ones were skipped).")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key in ("python", "torch", "torch_cuda", "triton", "xformers", "apex", "device", "kernel_mode"):
        print(f"{key:<12} {info[key]}")
    ext = info["extension"]
    print(f"{'extension':<12} " + ", ".join(f"{k}={v}" for k, v in ext.items()))
    for dev, how in info.get("packing", {}).items():
        print(f"{'packing ' + dev:<12} {how}")
    print("\nop                 backend    why not the fast path")
    for op, d in info["ops"].items():
        print(f"{op:<18} {d['backend']:<10} {'; '.join(d['skipped_because']) or '-'}")
    att = info["attention"]
    print(f"\nattention (dense)  {att['dense']}\nattention (packed) {att['packed']}"
          + (f" (skipped: {'; '.join(att['packed_skipped_because'])})" if att["packed_skipped_because"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
