"""The SCONet network: point encoder (:mod:`.encoder`), 3D U-Net (:mod:`.unet3d`), implicit decoder
(:mod:`.decoder`), assembled with its configuration in :mod:`.sconet`.

Typical use::

    model = build_model("A")                       # or SCONet(grid_resolution=32)
    grid = model.encode(points)                    # (B, N, 51) object frame → (B, 32, R, R, R)
    logits = model.decode(queries, grid)           # (B, M, 3) object frame → (B, M, 5)
"""
from .encoder import SURF_FEATURES, cell_index, normalize_to_unit_cube
from .sconet import MODEL_PRESETS, SCONet, ModelConfig, build_model, load_reference_state_dict

__all__ = ["SCONet", "ModelConfig", "MODEL_PRESETS", "build_model", "load_reference_state_dict",
           "normalize_to_unit_cube", "cell_index", "SURF_FEATURES"]
