"""The datasets in one import: the embedded demo set (``tec_fast.data.demo``) and image folders
(``tec_fast.data.folder``, decoded by ``tec_fast.data.decode``)."""
from tec_fast.data.decode import to_rgb
from tec_fast.data.demo import (DEMO_CLASSES, DEMO_SIZE, DemoArrays, DemoDataset, demo_arrays,
                                demo_datasets)
from tec_fast.data.folder import (IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, ImageFolderDataset,
                                  UnreadableImage, find_samples, random_resized_crop_box)

__all__ = ["to_rgb", "DEMO_CLASSES", "DEMO_SIZE", "DemoArrays", "DemoDataset", "demo_arrays",
           "demo_datasets", "IMAGENET_MEAN", "IMAGENET_STD", "IMG_EXTENSIONS", "ImageFolderDataset",
           "UnreadableImage", "find_samples", "random_resized_crop_box"]
