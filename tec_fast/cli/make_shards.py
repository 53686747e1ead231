"""``python -m tec_fast.make_shards SRC OUT``: an image folder as webdataset-style tar shards that
``python -m tec_fast.train --data`` reads (``OUT/shard-{000000..N}.tar``).

Each image is stored as its file's bytes (nothing re-encoded: the pixels the trainer sees are the
same as from the folder) with its label in ``<key>.cls``; ``OUT/classes.txt`` holds the class
names and ``OUT/shards.json`` what was written (the absolute pattern to pass to ``--data``,
counts, bytes, the files skipped). A source file that cannot be read or is empty is skipped with
a warning naming it (the summary counts them). The shards are written under temporary names and
renamed once all of them are complete: a write that fails leaves OUT as it was. Writing into a
folder that already holds shards of the same prefix replaces them: the ones numbered past the
last shard written are removed when the write is complete (the command lists them), so the
folder read as ``--data`` holds this write alone. Other prefixes in OUT share its classes.txt: a
write whose classes differ is refused. OUT may not be inside the image folder read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tec_fast.cli.errors import run_command
from tec_fast.cli.flags import POSITIVE, Parser, existing_dir, makeable_dir
from tec_fast.data.folder import image_root


def build_parser() -> Parser:
    p = Parser(prog="python -m tec_fast.make_shards",
               description="Copy an image folder (SRC/train/<class>/*.jpg, class folders, or a flat folder) into "
                           "uncompressed tar shards for python -m tec_fast.train --data: one member per image "
                           "(the file as it is) and one per label (<key>.cls), plus classes.txt and shards.json "
                           "(the --data pattern, counts, bytes).")
    p.add_argument("src", metavar="SRC", type=image_folder,
                   help="the image folder (SRC/train used where it exists): class folders with images "
                        "anywhere below them, or images directly inside")
    p.add_argument("out", metavar="OUT", type=makeable_dir,
                   help="folder for the shards (created; shards of the same prefix there are replaced: those "
                        "numbered past the last one written are removed once the write is complete)")
    p.add_argument("--prefix", default="shard", type=shard_prefix,
                   help="shard file names: PREFIX-000000.tar, ... (default %(default)s); prefixes in one OUT "
                        "share its classes.txt, so a write whose classes differ is refused")
    p.add_argument("--max-images", type=POSITIVE, default=5000, metavar="N",
                   help="images per shard at most (default %(default)s)")
    p.add_argument("--max-mb", type=POSITIVE, default=1024, metavar="MB",
                   help="shard file size in MB (2^20 bytes, tar headers included) at most, unless one image "
                        "is larger (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    return p


def image_folder(text: str) -> str:
    """SRC: an existing folder holding images where ``write_shards`` looks for them
    (``holds_images``: stops at the first one, so an empty folder is refused at parse time without
    listing a full one)."""
    from tec_fast.data.folder import IMG_EXTENSIONS, holds_images

    existing_dir(text)
    root = image_root(text)
    try:
        found = holds_images(text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{root!r}: cannot read it: {exc.strerror or exc}") from None
    if not found:
        raise argparse.ArgumentTypeError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {root!r}, neither in "
                                         f"class folders nor directly inside")
    return text


def output_folder(p: Parser, out: str) -> None:
    """OUT made (with the folders above it) and writable, and no ``classes.txt`` in it that is not an
    earlier write's (``foreign_classes_file``): refused naming OUT, before any image is read."""
    from tec_fast.data.shards import NOT_OURS, foreign_classes_file

    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        p.refuse("OUT", f"{out!r}: cannot make the folder: {exc.strerror or exc}")
    if not os.access(out, os.W_OK | os.X_OK):
        p.refuse("OUT", f"{out!r}: the folder is not writable")
    if foreign_classes_file(out):
        p.refuse("OUT", f"{os.path.join(out, 'classes.txt')!r} {NOT_OURS}")


def shard_prefix(text: str) -> str:
    """A plain file-name prefix: not empty, no '/', no braces (the --data pattern uses them)."""
    if not text or "/" in text or os.sep in text or "{" in text or "}" in text:
        raise argparse.ArgumentTypeError(f"must be a plain file-name prefix (not empty, no '/', no braces), "
                                         f"got {text!r}")
    return text


def _main(argv) -> int:
    from tec_fast.data.shards import write_shards
    from tec_fast.training.monitor import table

    p = build_parser()
    args = p.parse_args(argv)
    images = os.path.realpath(image_root(args.src))
    out = os.path.realpath(args.out)
    if out == images or out.startswith(images + os.sep):
        p.refuse("OUT", f"{args.out!r} is inside the image folder being read ({images}); write the shards elsewhere")
    output_folder(p, args.out)
    t0, shown = time.perf_counter(), [0.0]
    live = sys.stderr.isatty()  # a terminal: one line redrawn; a log file: a line every 10 s

    def show(n: int, end: str = "") -> None:
        text = f"{n} images, {n / max(time.perf_counter() - t0, 1e-9):.0f} img/s"
        print(f"\r{text}" if live else text, end=end if live else "\n", file=sys.stderr, flush=True)

    def progress(n: int) -> None:
        now = time.perf_counter()
        if not args.no_progress and now - shown[0] > (0.5 if live else 10.0):
            shown[0] = now
            show(n)

    try:
        r = write_shards(args.src, args.out, prefix=args.prefix, max_images=args.max_images,
                         max_bytes=args.max_mb * 1024 * 1024, on_image=progress)
    except OSError as exc:  # a file the write could not read (SRC) or write (OUT), named
        if shown[0] and live:
            print(file=sys.stderr)  # end the progress line drawn so far
        raise OSError(f"{_argument_of(exc, image_root(args.src), args.out)}{exc.strerror or exc}"
                      + (f": {exc.filename!r}" if exc.filename else "")) from exc
    seconds = time.perf_counter() - t0
    if not args.no_progress:
        show(r["images"], end="\n")  # the line ends on the final count, not the last one shown
    for path in r["removed"]:
        why = ("an earlier write's shard, numbered past the last one written" if path.endswith(".tar")
               else "an earlier write's class names; SRC has no class folders")
        print(f"removed {path} ({why})")
    record = {"pattern": os.path.abspath(r["pattern"]), "shards": len(r["shards"]), "images": r["images"],
              "bytes": r["bytes"], "image_bytes": r["image_bytes"], "classes": len(r["classes"]), "seconds": seconds,
              "source": os.path.abspath(args.src), "removed": r["removed"],
              "skipped": {os.path.abspath(path): why for path, why in r["skipped"].items()}}
    tmp = os.path.join(args.out, "shards.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "shards.json"))
    size = f"{r['bytes'] / 2 ** 20:.1f} MB (2^20 bytes)"
    skipped = f"{len(r['skipped'])}" + (f" unreadable or empty (first: {next(iter(r['skipped']))}; shards.json "
                                        f"lists them all)" if r["skipped"] else "")
    print(table(["", ""], [["shards", record["shards"]], ["images", record["images"]], ["skipped", skipped],
                           ["classes", record["classes"]], ["size", size],
                           ["time", f"{seconds:.1f} s"], ["train with", f"--data '{record['pattern']}'"]],
                title="make_shards", align="ll"))
    return 0


def _argument_of(exc: OSError, images: str, out: str) -> str:
    """``argument SRC: `` or ``argument OUT: `` for a file error under that folder, else nothing.
    Paths compared as written, not resolved: a link under SRC that points elsewhere is SRC's."""
    if exc.filename:
        path = os.path.abspath(os.fsdecode(exc.filename))
        images, out = os.path.abspath(images), os.path.abspath(out)
        for name, folder in sorted((("OUT", out), ("SRC", images)), key=lambda nf: -len(nf[1])):  # innermost
            if path == folder or path.startswith(folder + os.sep):
                return f"argument {name}: "
    return ""


def main(argv=None) -> int:
    """Exit status 0, or 2 with one ``error:`` line for a bad input."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
