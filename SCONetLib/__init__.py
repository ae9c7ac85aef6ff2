"""SCONet engine: convolutional occupancy networks for multi-organ segmentation of abdominal CT.

Pipeline: ``io`` (read a CT) → ``points`` (Canny edge points + 3D SURF descriptors) → ``model`` (SCONet:
point encoder, 3D U-Net feature grid, occupancy decoder) → ``infer`` (label maps at any spacing) →
``train`` / ``evaluate``. ``phantom`` makes synthetic abdominal CTs for demos and tests.
Importable without 3D Slicer.
"""
__version__ = "0.1.0"
