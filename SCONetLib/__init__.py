"""SCONet engine: convolutional occupancy networks for multi-organ segmentation of abdominal CT.

Pipeline: ``io`` (read a CT) → ``points`` (Canny edge points + 3D SURF descriptors) → ``model`` (SCONet:
point encoder, 3D U-Net feature grid, occupancy decoder) → ``infer`` (label maps at any spacing) →
``train`` / ``evaluate``. ``phantom`` makes synthetic abdominal CTs for demos and tests.
Importable without 3D Slicer; the public names below are imported lazily so that ``import SCONetLib`` stays cheap
(torch is only loaded when a model is needed).

Examples
--------
>>> from SCONetLib import Segmenter, make_phantom           # doctest: +SKIP
>>> ct, truth = make_phantom(seed=0)                         # doctest: +SKIP
>>> segmenter = Segmenter()     # bundled phantom-trained model, CUDA if available  # doctest: +SKIP
>>> segmenter.prepare(ct)       # edge points + SURF + feature grid, once per CT     # doctest: +SKIP
>>> labels = segmenter.segment(spacing=1.5)  # same physical box, 1.5 mm voxels     # doctest: +SKIP
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "Segmenter": "SCONetLib.infer",
    "extract_point_cloud": "SCONetLib.points",
    "load_checkpoint": "SCONetLib.checkpoint",
    "make_phantom": "SCONetLib.phantom",
    "read_image": "SCONetLib.io",
    "write_image": "SCONetLib.io",
    "SCONet": "SCONetLib.model",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'SCONetLib' has no attribute {name!r}")
