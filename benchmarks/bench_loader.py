"""The data loader before and after, in one run on the same JPEGs.

Providers:
- ``baseline``: the pipeline the trainer had before (PIL decode at full size, PIL bicubic
  RandomResizedCrop, flip, float32 normalised in the worker), written out here;
- ``engine_pil``: the engine's pipeline with PIL as the JPEG decoder (uint8 out, DCT-scaled decode
  when the crop allows, torch's uint8 bicubic);
- ``engine``: the same with libjpeg-turbo through ``simplejpeg`` when it is installed (what the
  trainer uses);
- ``decode_pil`` / ``decode_simplejpeg``: decoding alone, the ceiling;
- ``engine_gpu_decode`` (``--gpu-decode``, on a GPU machine): the workers send the files, each batch
  is decoded, cropped and normalised on the GPU (``--decode gpu``); its img/s includes the GPU work.

Measured per provider: images per CPU-second in one process and thread through the trainer's
per-sample seeding (``SeededSamples``): the per-core rate, robust to other work on the machine;
then through the trainer's DataLoader (``build_loader``) with 1 and 2 workers: images/s of the
process (wall clock: depends on how busy the machine is) and images per worker CPU-second (from
``/proc``); and the bytes per image that cross the worker -> main process boundary.

    python -m benchmarks.bench_loader --make-jpegs /tmp/jpegs   # 1024 ImageNet-like JPEGs (--jpegs), then measure
    python -m benchmarks.bench_loader --data /tmp/jpegs --workers 1 2 --results benchmarks/results/loader.jsonl
    python -m benchmarks.bench_loader --make-jpegs /tmp/jpegs --workers 2 4 8 --gpu-decode   # on a GPU machine

Prints a table; appends one JSON line per measurement to ``--results``.
"""
from __future__ import annotations

import io
import os
import sys
import time
from typing import Dict, List

import numpy as np
import torch

from benchmarks.common import append_jsonl, complete_row, device_name, format_table, make_parser, results_dir
from tec_fast.data.decode import EncodedImage, to_rgb, turbo_decoder
from tec_fast.data.folder import IMG_EXTENSIONS, ImageFolderDataset, holds_images, image_root
from tec_fast.cli.flags import NON_NEGATIVE, POSITIVE, existing_dir, output_file, real
from tec_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_box
from tec_fast.training.config import FitConfig
from tec_fast.training.loader_bench import bench_loader
from tec_fast.training.sampling import SeededSamples, mix_seed


# ------------------------------------------------------------------------------ providers
class _Raw:
    def __init__(self, data: bytes):
        self.data = data


class BaselineFolder(ImageFolderDataset):
    """The trainer's dataset before: PIL decode at full size (``to_rgb``), RandomResizedCrop with
    PIL's bicubic ``resize(box=...)``, flip, float32 normalised with the ImageNet statistics."""

    def __init__(self, root: str, img_size: int):
        super().__init__(root, img_size, train=True)
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def encoded(self, i: int):
        return _Raw(self._read(i))  # the file's bytes; PIL reads the header below, as it did

    def _transform(self, image, index):
        from PIL import Image

        img = to_rgb(Image.open(io.BytesIO(image.data)))
        S = self.img_size
        left, top, w, h = random_resized_crop_box(img.width, img.height)
        img = img.resize((S, S), Image.BICUBIC, box=(left, top, left + w, top + h))
        if torch.rand(()) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std


class PILFolder(ImageFolderDataset):
    """The engine's pipeline with PIL as the JPEG decoder."""

    def encoded(self, i: int) -> EncodedImage:
        return EncodedImage(self._read(i), use_turbo=False)


def providers(root: str, size: int) -> Dict[str, torch.utils.data.Dataset]:
    out = {"baseline": BaselineFolder(root, size), "engine_pil": PILFolder(root, size, train=True, uint8=True)}
    if turbo_decoder() is not None:
        out["engine"] = ImageFolderDataset(root, size, train=True, uint8=True)
    return out


# ---------------------------------------------------------------------------- measurements
def per_core(ds, n: int) -> float:
    """Images per CPU-second of this process, one thread, as a worker computes them."""
    seeded = SeededSamples(ds)
    keys = [(i % len(ds), mix_seed(0, 0, i)) for i in range(n)]
    seeded[keys[0]]  # warm-up (imports, first allocations)
    t0 = time.process_time()
    for k in keys:
        seeded[k]
    return n / (time.process_time() - t0)


def decode_only(root: str, n: int, use_turbo: bool) -> float:
    ds = ImageFolderDataset(root, 8)
    datas = [ds._read(i % len(ds)) for i in range(min(n, len(ds)))]
    t0 = time.process_time()
    for d in datas:
        EncodedImage(d, use_turbo=use_turbo).decode()
    return len(datas) / (time.process_time() - t0)


def make_jpegs(out: str, n: int = 1024, seed: int = 0) -> str:
    """``n`` ImageNet-like JPEGs (500x375, every third one 375x500; quality 90) in 4 class folders:
    random crops (at least half the height) of scikit-learn's two sample photos, resized, flipped."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % 2]
        W, H = photo.size
        size = (375, 500) if i % 3 == 2 else (500, 375)
        aspect = size[0] / size[1]
        h = int(rng.integers(H // 2, H + 1))
        w = int(min(W, h * aspect))
        h = int(w / aspect)
        left, top = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        img = photo.resize(size, Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        folder = os.path.join(out, f"class{i % 4}")
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return out


def main(argv=None) -> int:
    p = make_parser("bench_loader", __doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=existing_dir, help="a folder of JPEGs (class folders)")
    src.add_argument("--make-jpegs", metavar="DIR", type=results_dir,
                     help="write --jpegs ImageNet-like JPEGs to DIR (made if missing), then measure them")
    p.add_argument("--jpegs", type=POSITIVE, default=None,
                   help="how many JPEGs --make-jpegs writes (default 1024; each takes ~20 ms to make)")
    p.add_argument("--img-size", type=POSITIVE, default=224,
                   help="side of the square crop each image is turned into, pixels (default 224)")
    p.add_argument("--batch-size", type=POSITIVE, default=64,
                   help="images per DataLoader batch in the worker measurements (default 64)")
    p.add_argument("--images", type=POSITIVE, default=400, help="images per in-process measurement (default 400)")
    p.add_argument("--workers", type=NON_NEGATIVE, nargs="*", default=[1, 2],
                   help="DataLoader worker counts to measure (default 1 2)")
    p.add_argument("--seconds", type=real(0, lo_open=True), default=10.0,
                   help="at most this long per DataLoader measurement (default 10)")
    p.add_argument("--repeats", type=POSITIVE, default=3,
                   help="rounds over all providers (best and median reported; default 3)")
    p.add_argument("--results", type=output_file, default=os.path.join("benchmarks", "results", "loader.jsonl"),
                   help="JSON-lines file one row per measurement is appended to, relative to the current "
                        "folder (default benchmarks/results/loader.jsonl)")
    p.add_argument("--providers", nargs="+", choices=("decode", "baseline", "engine_pil", "engine"),
                   default=["decode", "baseline", "engine_pil", "engine"],
                   help="which CPU pipelines to measure (default: all; decode = the decode-only ceilings)")
    p.add_argument("--gpu-decode", action="store_true",
                   help="also measure --decode gpu (nvjpeg through torchvision; the batches decoded on cuda)")
    args = p.parse_args(argv)
    if args.gpu_decode:
        from tec_fast.data.gpu_decode import gpu_decode_reasons
        reasons = gpu_decode_reasons("cuda")
        if reasons:
            p.error("argument --gpu-decode: " + "; ".join(reasons))
    if args.data is not None and not holds_images(args.data):  # refused here, not mid-run
        p.refuse("--data", f"no images ({', '.join(IMG_EXTENSIONS)}) found in {image_root(args.data)!r} "
                           f"(neither in class subfolders nor directly inside)")
    if args.data is not None and args.jpegs is not None:
        p.refuse("--jpegs", "goes with --make-jpegs (--data measures the folder's images as they are)")
    root = args.data or make_jpegs(args.make_jpegs, args.jpegs or 1024)
    torch.set_num_threads(1)

    import PIL
    common = {"bench": "loader", "data": os.path.abspath(root), "img_size": args.img_size,
              "batch_size": args.batch_size, "pillow": PIL.__version__,
              "simplejpeg": getattr(turbo_decoder(), "__version__", None), "cores": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0]}
    # rounds interleave the providers, so a change in the machine's load hits them alike; each
    # number is the best round's (throughput's min-time rule) with the median beside it
    runs: Dict[tuple, List[dict]] = {}
    datasets = {k: v for k, v in providers(root, args.img_size).items() if k in args.providers}
    for rnd in range(args.repeats):
        for use_turbo, name in ((False, "decode_pil"), (True, "decode_simplejpeg")):
            if "decode" not in args.providers or (use_turbo and turbo_decoder() is None):
                continue
            print(f"round {rnd + 1}/{args.repeats} {name}: decoding ...", file=sys.stderr)
            runs.setdefault((name, "in_process"), []).append(
                {"img_per_cpu_s": decode_only(root, args.images, use_turbo)})
        for name, ds in datasets.items():
            print(f"round {rnd + 1}/{args.repeats} {name}: in one process ...", file=sys.stderr)
            sample = SeededSamples(ds)[(0, 1)][0]
            runs.setdefault((name, "in_process"), []).append(
                {"img_per_cpu_s": per_core(ds, args.images), "bytes_per_image": sample.numel() * sample.element_size()})
            for w in args.workers:
                print(f"round {rnd + 1}/{args.repeats} {name}: {w} worker(s) ...", file=sys.stderr)
                cfg = FitConfig(name="bench", output_dir="", batch_size=args.batch_size, num_workers=w, seed=0)
                r = bench_loader(ds, cfg, seconds=args.seconds, max_batches=10_000)
                runs.setdefault((name, f"workers={w}"), []).append(
                    {k: r[k] for k in ("img_per_s", "img_per_cpu_s", "bytes_per_image", "images", "seconds")})
        if args.gpu_decode:
            from tec_fast.data.gpu_decode import gpu_decode_inputs
            view, collate = gpu_decode_inputs(ImageFolderDataset(root, args.img_size, train=True, uint8=True))
            for w in args.workers:
                print(f"round {rnd + 1}/{args.repeats} engine_gpu_decode: {w} worker(s) ...", file=sys.stderr)
                cfg = FitConfig(name="bench", output_dir="", batch_size=args.batch_size, num_workers=w, seed=0)
                r = bench_loader(view, cfg, seconds=args.seconds, max_batches=10_000, collate_fn=collate,
                                 device=torch.device("cuda"))
                runs.setdefault(("engine_gpu_decode", f"workers={w}"), []).append(
                    {k: r[k] for k in ("img_per_s", "img_per_cpu_s", "bytes_per_image", "images", "seconds")})
    rows: List[dict] = []
    for (name, mode), found in runs.items():
        row = {**common, "provider": name, "mode": mode, "rounds": len(found)}
        for key in ("img_per_cpu_s", "img_per_s"):
            values = sorted(v[key] for v in found if v.get(key) is not None)
            if values:
                row[key], row[key + "_median"] = values[-1], values[len(values) // 2]
        row["bytes_per_image"] = found[0].get("bytes_per_image")
        rows.append(row)
    rows = [complete_row(r, "cpu") for r in rows]  # the workers' machine; the GPU that decoded is named beside it
    for r in rows:
        if r["provider"] == "engine_gpu_decode":
            r["decode_device"] = device_name(torch.device("cuda"))
    base = {r["mode"]: r for r in rows if r["provider"] == "baseline"}
    for r in rows:
        ref = base.get(r["mode"])
        if ref is not None and r["provider"].startswith("engine"):
            r["speedup_per_core"] = r["img_per_cpu_s"] / ref["img_per_cpu_s"] if r.get("img_per_cpu_s") else None
            r["bytes_ratio"] = ref["bytes_per_image"] / r["bytes_per_image"]
    print(format_table(rows, ["provider", "mode", "img_per_cpu_s", "img_per_cpu_s_median", "img_per_s",
                              "bytes_per_image", "speedup_per_core", "bytes_ratio"]))
    print(f"machine load (1 min) at the start: {common['load_avg_1m']:.2f} on {common['cores']} cores; "
          f"appended {len(rows)} rows to {append_jsonl(rows, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
