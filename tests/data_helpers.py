"""Small image sets on disk for the data tests: a class folder of JPEGs (and one PNG), the same
images as tar shards and as a Hugging Face folder (Arrow, as ``save_to_disk`` writes it, and Parquet)."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def smooth_image(rng, w: int, h: int) -> np.ndarray:
    """A photo-like [h, w, 3] uint8 image: smooth colour gradients plus mild noise (JPEG-friendly)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a, b, c = rng.uniform(0.02, 0.2, size=3)
    base = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * (xx + yy))], -1)
    img = 127.5 + 100 * base + rng.normal(0, 6, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(root, n: int = 12, classes=("cat", "dog"), size=(40, 30), png_every: int = 0, seed: int = 0):
    """``root/<class>/imgNN.jpg`` (every ``png_every``-th a PNG), sizes alternating landscape /
    portrait. Returns the root as str."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = size if i % 2 == 0 else size[::-1]
        folder = os.path.join(str(root), classes[i % len(classes)])
        os.makedirs(folder, exist_ok=True)
        png = png_every and i % png_every == png_every - 1
        Image.fromarray(smooth_image(rng, w, h)).save(
            os.path.join(folder, f"img{i:02d}.{'png' if png else 'jpg'}"), quality=90)
    return str(root)


def write_hf_arrow(folder, root, dataset_dict: bool = False):
    """The images of the class folder ``root`` as a ``save_to_disk`` folder (Arrow stream file,
    state.json, dataset_info.json with a ClassLabel); ``dataset_dict``: inside a DatasetDict's train/."""
    import pyarrow as pa

    from tec_fast.data.folder import find_samples

    samples, classes = find_samples(str(root))
    table = _table(samples)
    target = os.path.join(str(folder), "train") if dataset_dict else str(folder)
    os.makedirs(target, exist_ok=True)
    with pa.ipc.new_stream(os.path.join(target, "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    with open(os.path.join(target, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}, f)
    with open(os.path.join(target, "dataset_info.json"), "w") as f:
        json.dump({"features": {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": classes}}}, f)
    if dataset_dict:
        with open(os.path.join(str(folder), "dataset_dict.json"), "w") as f:
            json.dump({"splits": ["train"]}, f)
    return str(folder)


def write_hf_parquet(folder, root, row_group_size: int = 5):
    """The same as Parquet under ``folder/data/`` with the ``huggingface`` schema metadata."""
    import pyarrow.parquet as pq

    from tec_fast.data.folder import find_samples

    samples, classes = find_samples(str(root))
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": classes}}}}
    table = _table(samples).replace_schema_metadata({"huggingface": json.dumps(meta)})
    os.makedirs(os.path.join(str(folder), "data"), exist_ok=True)
    pq.write_table(table, os.path.join(str(folder), "data", "train-00000-of-00001.parquet"),
                   row_group_size=row_group_size)
    return str(folder)


def _table(samples):
    import pyarrow as pa

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = []
    for path, _ in samples:
        with open(path, "rb") as f:
            images.append({"bytes": f.read(), "path": os.path.basename(path)})
    return pa.table({"image": pa.array(images, type=image_type),
                     "label": pa.array([label for _, label in samples], type=pa.int64())})
