"""Real datasets as in-memory tensors: loading, stratified splits, digests and ZCA.

Everything downstream (experts, distillation, evaluation) consumes a :class:`DatasetBundle`
from :func:`load_dataset`, so dataset quirks stay inside this package.
"""

from pdd_ray.data.bundle import DatasetBundle
from pdd_ray.data.folders import reorganize_tiny_imagenet_val
from pdd_ray.data.registry import DATASETS, load_dataset
from pdd_ray.data.split import dataset_digest, stratified_split
from pdd_ray.data.zca import ZCA

__all__ = [
    "DATASETS",
    "DatasetBundle",
    "ZCA",
    "dataset_digest",
    "load_dataset",
    "reorganize_tiny_imagenet_val",
    "stratified_split",
]
