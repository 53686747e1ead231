"""The datasets in one import: the embedded demo set (``tec_fast.data.demo``), image folders
(``tec_fast.data.folder``), tar shards (``tec_fast.data.shards``) and local Hugging Face folders
(``tec_fast.data.hf``), all decoded by ``tec_fast.data.decode``; ``open_dataset`` picks one for
a ``--data`` value."""
from tec_fast.data.dataset import ImageDataset
from tec_fast.data.decode import to_rgb
from tec_fast.data.demo import (DEMO_CLASSES, DEMO_SIZE, DemoArrays, DemoDataset, demo_arrays,
                                demo_datasets)
from tec_fast.data.folder import (IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, ImageFolderDataset,
                                  UnreadableImage, find_samples, random_resized_crop_box)
from tec_fast.data.hf import HFImageDataset
from tec_fast.data.shards import TarShardDataset, write_shards
from tec_fast.data.sources import open_dataset
from tec_fast.data.transforms import normalize

__all__ = ["to_rgb", "DEMO_CLASSES", "DEMO_SIZE", "DemoArrays", "DemoDataset", "demo_arrays",
           "demo_datasets", "IMAGENET_MEAN", "IMAGENET_STD", "IMG_EXTENSIONS", "ImageDataset",
           "ImageFolderDataset", "TarShardDataset", "HFImageDataset", "open_dataset", "write_shards",
           "normalize", "UnreadableImage", "find_samples", "random_resized_crop_box"]
