"""Direction matrices (columns = image axes in LPS) shared by the geometry-sensitive tests."""
import numpy as np


def rotation(axis: int, degrees: float) -> np.ndarray:
    """(3, 3) rotation by ``degrees`` about coordinate axis ``axis`` (0 x, 1 y, 2 z)."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped_xy": np.diag([-1.0, -1.0, 1.0]),
    "permuted": np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, -1]]),
    "oblique": rotation(2, 17) @ rotation(0, -8),
}
