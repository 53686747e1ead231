"""Webdataset-style tar shards as a dataset, and the writer that makes them from an image folder.

A shard is an uncompressed tar; the members of one sample share a key (the member path up to the
first dot of its file name): ``000000123.jpg`` + ``000000123.cls`` (the label as decimal text).
The image is the sample's member with the first of the image extensions jpg, jpeg, png, webp,
ppm, pgm, bmp, tif, tiff in that order, wherever it stands in the tar (keys without one are left
out, with a warning); the label comes from ``cls`` / ``cls.txt`` / ``label`` / ``label.txt`` (-1
without one).
Class names: ``classes.txt`` (one per line, label order) beside the first shard, when present.

Shards are read by offset, not streamed: opening the dataset reads every tar header once (measured
here: 14 000 samples of image + label per second and core, one process per core over the shards)
and ``ds[i]`` is one ``pread`` of the member. So shards behave as
a folder does: the trainer's seeded permutation split across ranks, per-sample seeds that do not
depend on the worker count, resume at any step, and the same skip-and-count rule for members that
do not decode (``ImageDataset``). A shard cut short loses only the members past the cut (a warning
names it).

``shards-{0000..0099}.tar`` (zero-padded ranges) and ``{a,b}`` lists expand like bash braces.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

from tec_fast.data.dataset import ImageDataset, read_file

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
LABEL_EXTS = ("cls", "cls.txt", "label", "label.txt")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
# names a pattern may expand to: far above any real shard set, and the list (and the check that
# each file exists) still fits in seconds and a few hundred MB
MAX_BRACE_NAMES = 1_000_000


def brace_count(pattern: str) -> int:
    """How many names ``expand_braces(pattern)`` gives, counted without making them."""
    n = 1
    for body in _BRACE.findall(pattern):
        rng = _RANGE.fullmatch(body)
        n *= max(int(rng.group(2)) - int(rng.group(1)) + 1, 1) if rng else len(body.split(","))
    return n


def expand_braces(pattern: str) -> List[str]:
    """``a-{00..02}.tar`` -> [a-00.tar, a-01.tar, a-02.tar] (width of the first bound kept);
    ``{x,y}`` -> both; several groups multiply out; no braces -> [pattern]. A pattern of more
    than ``MAX_BRACE_NAMES`` names is refused before any is made."""
    count = brace_count(pattern)
    if count > MAX_BRACE_NAMES:
        raise ValueError(f"shard pattern {pattern!r} expands to {count} names, more than the "
                         f"{MAX_BRACE_NAMES} allowed: check its ranges")
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = _RANGE.fullmatch(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} runs backwards")
        width = len(rng.group(1))
        items = [str(v).zfill(width) for v in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"brace group {{{body}}} in {pattern!r} is neither a range N..M nor a list a,b")
    return [p for item in items for p in expand_braces(head + item + tail)]


def shard_paths(spec: Union[str, Sequence[str]]) -> List[str]:
    """The shard files of ``spec``: a folder (its ``*.tar``, sorted), a path, a brace pattern, or
    a list of those. ValueError naming what is missing."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: List[str] = []
    for s in specs:
        if os.path.isdir(s):
            found = sorted(glob.glob(os.path.join(s, "*.tar")))
            if not found:
                raise ValueError(f"no .tar shards in the folder {s!r}")
            _one_write(s, found)
            paths.extend(found)
            continue
        expanded = expand_braces(s)
        missing = [p for p in expanded if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"shard pattern {s!r}: {len(missing)} of {len(expanded)} files do not exist "
                             f"(first: {missing[0]!r})")
        paths.extend(expanded)
    if not paths:
        raise ValueError(f"no shards in {spec!r}")
    return paths


def _one_write(folder: str, found: List[str]) -> None:
    """Refuse a folder holding the shards of several make_shards prefixes (``a-000000.tar`` and
    ``b-000000.tar``): read whole, it would mix writes that share one ``classes.txt``."""
    firsts = [m.group(1) for p in found if (m := re.fullmatch(r"(.+)-0{6}\.tar", os.path.basename(p)))]
    if len(firsts) > 1:
        patterns = []
        for prefix in firsts:
            last = max(int(m.group(1)) for p in found
                       if (m := re.fullmatch(re.escape(prefix) + r"-(\d{6})\.tar", os.path.basename(p))))
            patterns.append(repr(shard_pattern(folder, prefix, last)))
        raise ValueError(f"the folder {folder!r} holds the shards of {len(firsts)} prefixes "
                         f"({', '.join(firsts)}): give one of them as a pattern: {', '.join(patterns)}")


def is_shard_spec(spec: str) -> bool:
    """Whether ``--data`` names tar shards: a .tar path or pattern, or a folder whose ``.tar``
    files are not beside images (a flat image folder with an archive is a folder) and whose
    subfolders hold no images. Where they do, the folder is an image folder (ImageNet's folder
    beside its download archives) and a warning names the .tar files it leaves unread."""
    if spec.endswith(".tar") or (_BRACE.search(spec) and ".tar" in spec):
        return True
    if not os.path.isdir(spec):
        return False
    from tec_fast.data.folder import holds_images

    entries = [e for e in os.scandir(spec) if not e.name.startswith(".")]
    tars = sorted(e.name for e in entries if e.name.endswith(".tar") and e.is_file())
    if not tars or any(e.is_file() and e.name.lower().rsplit(".", 1)[-1] in IMAGE_EXTS for e in entries):
        return False
    image_dirs = sorted(e.name for e in entries if e.is_dir() and holds_images(e.path))
    if image_dirs:
        warnings.warn(f"{spec!r} holds folders of images ({', '.join(image_dirs[:3])}"
                      f"{', ...' if len(image_dirs) > 3 else ''}) and {len(tars)} .tar files ({', '.join(tars[:3])}"
                      f"{', ...' if len(tars) > 3 else ''}): read as an image folder, the .tar files left unread "
                      f"(to read them as shards, give them by path or brace pattern)", RuntimeWarning, stacklevel=2)
        return False
    return True


def _split_key(name: str) -> Tuple[str, str]:
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower() if dot else ""


def _tar_number(field: bytes) -> int:
    """A tar header's numeric field (octal text, or GNU base-256); ``tarfile.ReadError`` when it
    is neither (the bytes are not a tar header)."""
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes of 8 GiB and more)
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"not a tar header (numeric field {field!r})") from None


# what a compressed file starts with: shards must be plain tar, read by offset
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


def _compression(path: str) -> Optional[str]:
    """The compression ``path`` starts with (gzip, bzip2, xz, zstd), or None."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((name for magic, name in _COMPRESSED if head.startswith(magic)), None)


def _checksum_ok(hdr: bytes) -> bool:
    """Whether the 512-byte ``hdr`` carries its own checksum (``tarfile.ReadError`` when its
    checksum field is not a number)."""
    return _tar_number(hdr[148:156]) == sum(hdr) - sum(hdr[148:156]) + 256


def _starts_as_tar(path: str) -> bool:
    """Whether ``path`` begins with a valid tar header: a shard damaged further on (cut inside
    its first member), not a file that is no tar at all."""
    with open(path, "rb") as f:
        hdr = f.read(512)
    try:
        return len(hdr) == 512 and _checksum_ok(hdr)
    except tarfile.ReadError:
        return False


def scan_tar(path: str):
    """Yield (member name, data offset, size, data or None) of the regular files of an uncompressed
    tar, reading only the headers (ustar, GNU long names, pax paths) and, in the same read, the data
    of members of at most 512 bytes (labels). Raises ``tarfile.ReadError`` at a header that is not
    one (bad checksum, cut short) or at the file's end without the end-of-archive blocks (a shard
    cut at a block boundary)."""
    end = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        pos, long_name = 0, None
        while pos + 512 <= end:
            f.seek(pos)
            block = f.read(1024)
            hdr = block[:512]
            if hdr.count(0) == 512:
                return  # the end-of-archive blocks
            if not _checksum_ok(hdr):
                raise tarfile.ReadError(f"bad header checksum at byte {pos}")
            size, kind = _tar_number(hdr[124:136]), hdr[156:157]
            data = pos + 512
            nxt = data + (size + 511) // 512 * 512
            small = block[512:512 + size] if size <= 512 else None
            if kind in (b"L", b"x"):  # the next member's long name (GNU) or pax records
                text = small if small is not None else os.pread(f.fileno(), size, data)
                if kind == b"L":
                    long_name = text.split(b"\0", 1)[0]
                else:
                    for record in text.split(b"\n"):
                        key, _, value = record.partition(b"=")
                        if key.endswith(b" path"):
                            long_name = value
            elif kind in (b"0", b"\0", b"7"):
                name = hdr[:100].split(b"\0", 1)[0]
                if hdr[257:263] == b"ustar\0" and hdr[345:346] != b"\0":
                    name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
                if long_name is not None:
                    name, long_name = long_name, None
                if data + size > end:
                    raise tarfile.ReadError(f"member {name.decode('utf-8', 'replace')!r} is cut short")
                yield name.decode("utf-8", "replace"), data, size, small
            elif kind != b"g":  # directories, links, devices: not samples
                long_name = None
            pos = nxt
    if pos < end and pos + 512 > end:
        raise tarfile.ReadError(f"cut short inside a header at byte {pos}")
    if pos >= end:  # every tar ends with two zero blocks: without them it was cut at a block boundary
        raise tarfile.ReadError(f"no end-of-archive blocks: cut short at byte {end}")


def _index(path: str):
    """``index_shard``'s entries, the warning of a shard that stops parsing (or None), and the
    keys left out for want of an image member ((count, first key, their members' extensions) or
    None): returned, not warned, so that ``index_shards`` warns in the calling process (a pool
    worker's warnings never reach it)."""
    found: Dict[str, Dict[str, Tuple[int, int]]] = {}
    labels: Dict[str, str] = {}
    order: List[str] = []
    note = None
    try:
        for name, offset, size, small in scan_tar(path):
            key, ext = _split_key(name)
            if key not in found:
                found[key] = {}
                order.append(key)
            found[key][ext] = (offset, size)
            if ext in LABEL_EXTS and small is not None and key not in labels:
                labels[key] = small.decode("ascii", "replace").strip()
    except tarfile.ReadError as exc:
        if not order and not _starts_as_tar(path):
            packed = _compression(path)
            if packed:
                raise ValueError(f"{path!r} is not a readable uncompressed tar shard (it is {packed}-compressed; "
                                 f"shards are read by offset: decompress it first)") from exc
            raise ValueError(f"{path!r} is not a readable uncompressed tar shard ({exc})") from exc
        note = f"tar shard {path} is unreadable after {len(order)} keys ({exc}); using those"
    out, lost = [], []
    for key in order:
        image = next((found[key][e] for e in IMAGE_EXTS if e in found[key]), None)
        if image is not None:
            out.append((key, image, labels.get(key)))
        else:
            lost.append(key)
    exts = sorted({e or "none" for key in lost for e in found[key]})
    return out, note, (len(lost), lost[0], exts) if lost else None


def index_shard(path: str) -> List[Tuple[str, Tuple[int, int], Optional[str]]]:
    """[(key, (offset, size) of the image member, label text or None)] in tar order, for the keys
    that have an image. A shard that stops parsing keeps what came before (with a warning), and
    so does one cut inside its first member (none kept); a file that is no tar is refused."""
    return index_shards([path])[0]


def index_shards(paths: List[str], processes: Optional[int] = None) -> list:
    """``index_shard`` of every path; in a pool of ``processes`` (default: one per core, at most
    one per shard) when there are several shards: header parsing is Python, bound by one core.
    Warns here for each shard that stops parsing, and once for all keys left out because no
    member of theirs has an image extension (``IMAGE_EXTS``)."""
    processes = min(len(paths), os.cpu_count() or 1) if processes is None else processes
    if processes <= 1 or len(paths) < 2:
        results = [_index(p) for p in paths]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method)) as pool:
            results = list(pool.map(_index, paths))
    for _, note, _ in results:
        if note:
            warnings.warn(note, RuntimeWarning)
    lost = [(path, keys) for path, (_, _, keys) in zip(paths, results) if keys]
    if lost:
        (path, (n, key, _)), more = lost[0], sum(keys[0] for _, keys in lost[1:])
        exts = sorted({e for _, keys in lost for e in keys[2]})
        warnings.warn(f"tar shard {path}: {n} keys (first: {key!r}) have no member with an image extension "
                      f"({', '.join(IMAGE_EXTS)}; theirs: {', '.join(exts)}) and are left out"
                      + (f", and {more} more in {len(lost) - 1} other shards" if more else ""), RuntimeWarning)
    return [entries for entries, _, _ in results]


class TarShardDataset(ImageDataset):
    """Images in webdataset-style tar shards: ``ds[i] -> (image, label)`` exactly as
    ``ImageFolderDataset`` gives for the same files (transforms, ``uint8``, native resolution,
    skip-and-count: ``ImageDataset``). ``spec``: see ``shard_paths``; ``processes``: for reading
    the shards' headers (``index_shards``)."""

    kind = "tar shards"

    def __init__(self, spec: Union[str, Sequence[str]], img_size: int = 224, train: bool = True,
                 strict: bool = False, native_patch: Optional[int] = None, max_patches: Optional[int] = None,
                 min_patches: int = 1, uint8: bool = False, processes: Optional[int] = None,
                 drop_unreadable: bool = False):
        super().__init__(img_size, train, strict, uint8, native_patch, max_patches, min_patches, drop_unreadable)
        self.shards = shard_paths(spec)
        self.root = spec if isinstance(spec, str) else ", ".join(spec)
        indexes = index_shards(self.shards, processes)
        self._where: List[Tuple[int, int, int]] = []  # (shard, offset, size) per sample
        names, labels = [], []
        for s, entries in enumerate(indexes):
            for key, (off, size), label in entries:
                self._where.append((s, off, size))
                names.append(f"{self.shards[s]}:{key}")
                labels.append(self._label(s, label, key))
        if not names:
            raise ValueError(f"TarShardDataset: no images ({', '.join(IMAGE_EXTS)}) in the {len(self.shards)} "
                             f"shards of {self.root!r}")
        self._init_samples(names, labels, read_classes(os.path.dirname(self.shards[0])))
        self._fds: Dict[int, int] = {}
        self._pid = os.getpid()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return fd

    def _label(self, shard: int, text: Optional[str], key: str) -> int:
        if text is None:
            return -1
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"tar shard {self.shards[shard]}: the label of {key!r} is not an integer: "
                             f"{text[:40]!r}") from None

    def _read(self, i: int) -> bytes:
        shard, offset, size = self._where[i]
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"member cut short: {len(data)} of {size} bytes (truncated shard)")
        return data

    def __del__(self):
        if getattr(self, "_pid", None) != os.getpid():
            return  # a worker's copy: the descriptors in it are the parent's
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def read_classes(folder: str) -> List[str]:
    """Class names from ``folder/classes.txt`` (one per line) or ``folder/classes.json`` (a list), else []."""
    txt, js = os.path.join(folder, "classes.txt"), os.path.join(folder, "classes.json")
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    if os.path.isfile(js):
        with open(js, encoding="utf-8") as f:
            return [str(c) for c in json.load(f)]
    return []


# ------------------------------------------------------------------------------- writing
_TAR_BLOCK, _TAR_RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE  # 512-byte blocks, 10 240-byte records
_SHARD_NAME = re.compile(r"(.+)-\d{6}\.tar")  # a shard of any prefix
NOT_OURS = "is not an earlier write's (no *-NNNNNN.tar shards beside it); move it away or choose another output folder"


def foreign_classes_file(output: str) -> bool:
    """Whether ``output`` holds a ``classes.txt`` beside no shard at all: not an earlier write's,
    so ``write_shards`` refuses it rather than replace or remove it."""
    names = os.listdir(output)
    return "classes.txt" in names and not any(_SHARD_NAME.fullmatch(n) for n in names)


def _check_shared_classes(output: str, prefix: str, root: str, classes: List[str]) -> None:
    """Refuse (ValueError) to write ``classes`` into ``output`` where shards of another prefix
    are labelled by a ``classes.txt`` naming others: the one file is every prefix's there."""
    others = sorted({m.group(1) for n in os.listdir(output) if (m := _SHARD_NAME.fullmatch(n))} - {prefix})
    old = read_classes(output) if os.path.isfile(os.path.join(output, "classes.txt")) else classes
    if others and old != classes:
        there, here = (", ".join(c[:4]) + (", ..." if len(c) > 4 else "") or "none" for c in (old, classes))
        raise ValueError(f"write_shards: {os.path.join(output, 'classes.txt')!r} names the classes of the shards "
                         f"of prefix {', '.join(others)} there ({there}), and {root!r} has others ({here}): the "
                         f"prefixes in a folder share its classes.txt; write prefix {prefix!r} into another folder")


def _member_bytes(size: int) -> int:
    """What a tar member of ``size`` data bytes takes in the archive: its header block and its
    data padded to whole blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _archive_bytes(members: int) -> int:
    """The size of an archive whose members take ``members`` bytes: the two zero blocks that end
    it, the whole padded to whole records (what ``tarfile`` writes)."""
    return -(-(members + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def write_shards(root: str, output: str, prefix: str = "shard", max_images: int = 5000,
                 max_bytes: int = 1 << 30, on_image=None) -> dict:
    """Copy the images of the folder ``root`` (the layout ``ImageFolderDataset`` reads) into tar
    shards ``output/prefix-NNNNNN.tar`` of at most ``max_images`` images and ``max_bytes`` bytes
    each (tar headers and padding counted; a single image larger than that gets a shard of its
    own): per image ``<key>.<ext>`` (the file's bytes, not re-encoded) and ``<key>.cls`` (its
    label; none for a flat folder), plus ``classes.txt``. A file that cannot be read (a broken
    link, no permission) or is empty is skipped with a warning naming it (the trainer would skip
    it too; the whole write is not lost over it). The shards are written under temporary
    names and renamed only once all of them are complete, so a write that fails leaves the folder
    as it was (an earlier write's shards included). After a complete write, shards of the same
    prefix numbered past the last one written (an earlier, larger write) are removed, and so is a
    ``classes.txt`` a flat folder has no use for: a folder read as ``--data`` then holds this
    write alone. A ``classes.txt`` in ``output`` beside no shards at all is not an earlier
    write's: refused (ValueError) rather than replaced or removed, and so is a write whose
    classes differ from the ``classes.txt`` that shards of another prefix there are labelled by.
    ``on_image(n_done)``: progress callback. Returns {shards, pattern, images, bytes (of the
    shard files), image_bytes, classes, removed (the paths removed), skipped ({path: why})}."""
    import io

    from tec_fast.data.folder import IMG_EXTENSIONS, find_samples, image_root
    if not os.path.isdir(root):
        raise ValueError(f"write_shards: root {root!r} is not a directory")
    for name, v in (("max_images", max_images), ("max_bytes", max_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"write_shards: {name} must be a positive int, got {v!r}")
    if not prefix or "/" in prefix or "{" in prefix:
        raise ValueError(f"write_shards: prefix must be a plain file-name prefix, got {prefix!r}")
    root = image_root(root)
    samples, classes = find_samples(root)
    if not samples:
        raise ValueError(f"write_shards: no images ({', '.join(IMG_EXTENSIONS)}) in {root!r}")
    os.makedirs(output, exist_ok=True)
    classes_txt = os.path.join(output, "classes.txt")
    if foreign_classes_file(output):
        raise ValueError(f"write_shards: {classes_txt!r} {NOT_OURS}")
    _check_shared_classes(output, prefix, root, classes)
    _remove_unfinished(output, prefix)
    shards: List[str] = []
    written: List[str] = []  # complete shards, still under their temporary names
    state = {"tar": None, "tmp": None, "count": 0, "bytes": 0}
    total = 0
    skipped: Dict[str, str] = {}

    def close():
        if state["tar"] is not None:
            state["tar"].close()
            written.append(state["tmp"])
            state["tar"] = None

    def add(tar, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))

    try:
        for i, (path, label) in enumerate(samples):
            try:
                data = read_file(path)
                why = "" if data else "empty file (0 bytes)"
            except OSError as exc:  # reading the source; an error of the write itself still ends it
                why = exc.strerror or str(exc)
            if why:
                skipped[path] = why
                warnings.warn(f"skipping unreadable image {path}: {why}; not written to the shards", RuntimeWarning)
                continue
            member = _member_bytes(len(data)) + (_member_bytes(len(str(label))) if label >= 0 else 0)
            full = state["count"] >= max_images or (
                state["count"] > 0 and _archive_bytes(state["bytes"] + member) > max_bytes)
            if state["tar"] is None or full:
                close()
                shards.append(os.path.join(output, f"{prefix}-{len(shards):06d}.tar"))
                state.update(tmp=shards[-1] + ".tmp", count=0, bytes=0)
                state["tar"] = tarfile.open(state["tmp"], "w", format=tarfile.USTAR_FORMAT)
            key = f"{i:09d}"
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            add(state["tar"], f"{key}.{ext}", data)
            if label >= 0:
                add(state["tar"], f"{key}.cls", str(label).encode())
            state["count"] += 1
            state["bytes"] += member
            total += len(data)
            if on_image is not None:
                on_image(i + 1)
        close()
    except BaseException:  # nothing of this write is left behind; an earlier write's shards stay
        if state["tar"] is not None:
            state["tar"].close()
            written.append(state["tmp"])
        for tmp in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    if not shards:
        raise ValueError(f"write_shards: none of the {len(samples)} images in {root!r} is readable "
                         f"(first: {samples[0][0]}: {skipped[samples[0][0]]})")
    for tmp, path in zip(written, shards):
        os.replace(tmp, path)
    removed = _remove_stale_shards(output, prefix, len(shards))
    if classes:
        tmp = classes_txt + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(c + "\n" for c in classes))
        os.replace(tmp, classes_txt)
    elif os.path.isfile(classes_txt):  # an earlier write's class names would label these images
        os.remove(classes_txt)
        removed.append(classes_txt)
    pattern = shard_pattern(output, prefix, len(shards) - 1)
    return {"shards": shards, "pattern": pattern, "images": len(samples) - len(skipped),
            "bytes": sum(os.path.getsize(p) for p in shards), "image_bytes": total, "classes": classes,
            "removed": removed, "skipped": skipped}


def shard_pattern(folder: str, prefix: str, last: int) -> str:
    """The ``--data`` pattern of ``folder/prefix-000000.tar`` .. ``prefix-<last>.tar``."""
    return os.path.join(folder, f"{prefix}-{{{0:06d}..{last:06d}}}.tar" if last > 0 else f"{prefix}-000000.tar")


def _remove_unfinished(output: str, prefix: str) -> None:
    """Remove ``output/prefix-NNNNNN.tar.tmp``: shards of a write that was killed before its
    renames."""
    name = re.compile(re.escape(prefix) + r"-\d{6}\.tar\.tmp")
    for e in os.scandir(output):
        if e.is_file() and name.fullmatch(e.name):
            os.remove(e.path)


def _remove_stale_shards(output: str, prefix: str, written: int) -> List[str]:
    """Remove ``output/prefix-NNNNNN.tar`` numbered ``written`` and up (left by an earlier write
    of more shards); returns their paths, in order."""
    name = re.compile(re.escape(prefix) + r"-(\d{6})\.tar")
    stale = sorted(e.path for e in os.scandir(output)
                   if e.is_file() and (m := name.fullmatch(e.name)) and int(m.group(1)) >= written)
    for path in stale:
        os.remove(path)
    return stale
