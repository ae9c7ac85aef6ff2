"""SCONetLib.infer: Segmenter geometry, coarse-to-fine decoding, probabilities, budgets, errors and cancellation.

Three kinds of model are used:

* an *oracle* whose logits are an analytic label field in LPS (ellipsoids), to check that labels land in the right
  physical place on any output grid (expected values come from SimpleITK's own index → physical transform);
* an *organ model*: the real SCONet decoder reading a hand-made feature grid holding the phantom's one-hot labels,
  so the label field has organ shapes (Dice 0.8–0.9 against the phantom) and realistic boundaries;
* a seeded random SCONet saved as a tiny checkpoint, for loading and the end-to-end path.
"""
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SCONetLib import infer
from SCONetLib.checkpoint import CheckpointError, default_weights_path, save_checkpoint
import SCONetLib.checkpoint as checkpoint_module
from SCONetLib.geometry import Grid, ObjectFrame
from SCONetLib.device import resolve_device
from SCONetLib.infer import Segmenter
from SCONetLib.model import ModelConfig, SCONet
from SCONetLib.phantom import make_phantom
from SCONetLib.points import PointCloud
from SCONetLib.progress import Cancelled

from directions import DIRECTIONS

# ---------------------------------------------------------------------------------------------- helpers / fixtures


# (label, centre offset from the volume centre (LPS mm), semi-axes (mm)); later entries overwrite earlier ones.
ELLIPSOIDS = ((1, (-30.0, 5.0, 10.0), (45.0, 35.0, 30.0)), (2, (35.0, 20.0, -10.0), (14.0, 12.0, 22.0)),
              (3, (40.0, -15.0, 15.0), (20.0, 15.0, 18.0)), (4, (0.0, -5.0, 0.0), (40.0, 7.0, 9.0)))


def _analytic_labels(xyz_lps, centre_lps):
    """(N,) uint8 labels of the ellipsoid scene and (N,) distance of each point to the nearest surface level."""
    labels = np.zeros(len(xyz_lps), dtype=np.uint8)
    margin = np.full(len(xyz_lps), np.inf)
    for label, offset, axes in ELLIPSOIDS:
        level = np.sum(((xyz_lps - np.asarray(centre_lps) - offset) / axes) ** 2, axis=1)
        labels[level < 1.0] = label
        margin = np.minimum(margin, np.abs(level - 1.0))
    return labels, margin


def _sitk_voxel_centres(image):
    """(K·J·I, 3) LPS of every voxel centre via SimpleITK's own transform, in C (KJI) order."""
    size = image.GetSize()
    m = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    origin = np.array(image.TransformIndexToPhysicalPoint((0, 0, 0)))
    for axis in range(3):   # the matrix must agree with SimpleITK on every axis
        unit = [0, 0, 0]
        unit[axis] = 1
        np.testing.assert_allclose(np.array(image.TransformIndexToPhysicalPoint(unit)) - origin, m[:, axis],
                                   atol=1e-9)
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    return np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1) @ m.T + origin


class OracleModel(torch.nn.Module):
    """Model stand-in whose logits are the one-hot ellipsoid labels at the query's LPS position.

    The object frame is inverted with SimpleITK's box centre (not SCONetLib.geometry), so a wrong axis order,
    sign or centre in the inference path shows up as misplaced labels.
    """

    def __init__(self, image):
        super().__init__()
        self.config = ModelConfig()
        size = np.asarray(image.GetSize(), dtype=float)
        self.centre_lps = np.array(image.TransformContinuousIndexToPhysicalPoint(tuple((size - 1.0) / 2.0)))
        self.encode_calls = 0
        self.decode_calls = 0

    def encode(self, points):
        self.encode_calls += 1
        return torch.zeros(1, 1)

    def decode(self, queries, grid):
        self.decode_calls += 1
        xyz_lps = queries[0].double().numpy() * self.config.scale_mm * np.array([-1.0, -1.0, 1.0]) + self.centre_lps
        labels, _ = _analytic_labels(xyz_lps, self.centre_lps)
        return torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), 5).float()[None]


def _fake_cloud(image, n_points=50_000, seed=0, progress=None, implementation="auto", device="cpu"):
    """Cheap stand-in for extract_point_cloud: 64 voxel centres (the oracle ignores points)."""
    grid = Grid.of(image)
    ijk = np.random.default_rng(seed).uniform(0, np.asarray(grid.size) - 1, size=(64, 3))
    return PointCloud.from_descriptors(grid.index_to_lps(ijk), np.zeros((64, 48), np.float32))


def _image(direction, size=(40, 36, 18), spacing=(2.5, 3.0, 5.0), origin=(-60.0, 35.0, 120.0)):
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.asarray(direction).ravel()))
    return image


@pytest.fixture
def oracle_segmenter(monkeypatch):
    monkeypatch.setattr(infer, "extract_point_cloud", _fake_cloud)

    def make(image):
        model = OracleModel(image)
        segmenter = Segmenter.from_model(model)
        segmenter.prepare(image)
        return segmenter, model
    return make


@pytest.fixture(scope="module")
def phantom():
    """96 × 96 × 32 phantom at 3 × 3 × 5 mm, randomly oriented (seed 3 gives an oblique grid)."""
    return make_phantom(3, size=(96, 96, 32), spacing=(3.0, 3.0, 5.0), random_orientation=True)


def _organ_model(truth):
    """Seeded SCONet whose feature grid holds the one-hot labels of ``truth`` and whose decoder favours them."""
    torch.manual_seed(0)
    model = SCONet()
    cfg = model.config
    r = cfg.grid_resolution
    grid, frame = Grid.of(truth), ObjectFrame.of(Grid.of(truth), cfg.scale_mm)
    nodes = (np.arange(r) / (r - 1) - 0.5) * (1.0 + cfg.padding + 0.001)   # decoder grid nodes, object frame
    z, y, x = np.meshgrid(nodes, nodes, nodes, indexing="ij")
    ijk = np.rint(grid.lps_to_index(frame.object_to_lps(np.stack([x.ravel(), y.ravel(), z.ravel()], 1))))
    inside = np.all((ijk >= 0) & (ijk < np.asarray(grid.size)), axis=1)
    ijk = np.clip(ijk, 0, np.asarray(grid.size) - 1).astype(int)
    labels = np.where(inside, sitk.GetArrayViewFromImage(truth)[ijk[:, 2], ijk[:, 1], ijk[:, 0]], 0)
    features = torch.zeros(1, cfg.c_dim, r, r, r)
    features[0, :5] = torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), 5).T.reshape(5, r, r, r)
    with torch.no_grad():
        model.decoder.fc_c[0].weight[:5, :5] += 4.0 * torch.eye(5)
        model.decoder.fc_out.weight[:5, :5] += torch.eye(5)
    model.encode_calls = 0

    def encode(points):
        model.encode_calls += 1
        return features.clone()
    model.encode = encode
    return model


@pytest.fixture(scope="module")
def organ_segmenter(phantom):
    ct, truth = phantom
    segmenter = Segmenter.from_model(_organ_model(truth), n_points=2000)
    segmenter.prepare(ct)
    return segmenter


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, SCONet(), metadata={"note": "random test model"})
    return path


def _array(image):
    return sitk.GetArrayFromImage(image)


# ---------------------------------------------------------------------------------------------- device


@pytest.mark.parametrize("device, expected", [("cpu", "cpu"), ("CPU", "cpu"), (torch.device("cpu"), "cpu"),
                                              ("auto", "cuda" if torch.cuda.is_available() else "cpu")])
def test_resolve_device(device, expected):
    assert resolve_device(device).type == expected


@pytest.mark.parametrize("device, error, match", [
    ("gpu", ValueError, "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:x", ValueError, "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("mps", ValueError, "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (0, TypeError, "device must be a string"),
])
def test_resolve_device_rejects(device, error, match):
    with pytest.raises(error, match=match):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_unavailable_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")


# ---------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", DIRECTIONS)
def test_labels_land_in_place_on_the_input_grid(oracle_segmenter, name):
    image = _image(DIRECTIONS[name])
    segmenter, model = oracle_segmenter(image)
    out = segmenter.segment(dense=True)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert out.GetSize() == image.GetSize()
    assert out.GetSpacing() == image.GetSpacing()       # exactly, not approximately
    assert out.GetOrigin() == image.GetOrigin()
    assert out.GetDirection() == image.GetDirection()
    expected, margin = _analytic_labels(_sitk_voxel_centres(image), model.centre_lps)
    clear = margin > 1e-4                                  # not within float32 rounding of a surface
    np.testing.assert_array_equal(_array(out).ravel()[clear], expected[clear])
    assert set(np.unique(expected)) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("name, spacing", [("identity", 1.7), ("flipped_xy", (2.0, 1.25, 3.0)),
                                           ("oblique", (4.1, 2.2, 2.6)), ("permuted", 6.0)])
def test_labels_land_in_place_at_another_spacing(oracle_segmenter, name, spacing):
    image = _image(DIRECTIONS[name])
    segmenter, model = oracle_segmenter(image)
    out = segmenter.segment(spacing=spacing, dense=True)
    new = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    assert out.GetSize() == tuple(int(n) for n in np.maximum(1, np.round(extent / new)))
    np.testing.assert_allclose(out.GetSpacing(), new)
    assert out.GetDirection() == image.GetDirection()
    # the physical box: same low corner, high corner within half a new voxel per axis
    lo_in = image.TransformContinuousIndexToPhysicalPoint((-0.5,) * 3)
    lo_out = out.TransformContinuousIndexToPhysicalPoint((-0.5,) * 3)
    np.testing.assert_allclose(lo_out, lo_in, atol=1e-9)
    hi_in = np.array(image.TransformContinuousIndexToPhysicalPoint(tuple(np.asarray(image.GetSize()) - 0.5)))
    hi_out = np.array(out.TransformContinuousIndexToPhysicalPoint(tuple(np.asarray(out.GetSize()) - 0.5)))
    along_axes = np.abs(np.array(image.GetDirection()).reshape(3, 3).T @ (hi_out - hi_in))
    assert np.all(along_axes <= new / 2 + 1e-9)
    expected, margin = _analytic_labels(_sitk_voxel_centres(out), model.centre_lps)
    clear = margin > 1e-4
    np.testing.assert_array_equal(_array(out).ravel()[clear], expected[clear])


def test_coarse_to_fine_reproduces_the_oracle(oracle_segmenter):
    image = _image(DIRECTIONS["oblique"], size=(120, 110, 40), spacing=(1.2, 1.1, 2.0))
    segmenter, model = oracle_segmenter(image)
    fine = _array(segmenter.segment(spacing=0.9))
    dense = _array(segmenter.segment(spacing=0.9, dense=True))
    assert np.mean(fine == dense) >= 0.9999


# ---------------------------------------------------------------------------------------------- coarse to fine


@pytest.mark.parametrize("spacing", [None, (2.5, 2.5, 4.0)])
def test_coarse_to_fine_agrees_with_dense(organ_segmenter, phantom, spacing, monkeypatch):
    evaluated = []
    decode = organ_segmenter._decode

    def counting(state, out, flat, progress, **outputs):
        evaluated.append(out.voxel_count() if flat is None else len(flat))
        return decode(state, out, flat, progress, **outputs)
    monkeypatch.setattr(organ_segmenter, "_decode", counting)
    fast = _array(organ_segmenter.segment(spacing))
    fast_queries = sum(evaluated)
    dense = _array(organ_segmenter.segment(spacing, dense=True))
    assert fast.shape == dense.shape
    assert np.mean(fast == dense) >= 0.999
    # the label field is organ-like (every organ present), and coarse to fine really skipped most voxels
    fractions = np.bincount(dense.ravel(), minlength=5) / dense.size
    assert np.all(fractions[1:] > 0.003) and fractions[0] < 0.95
    assert fast_queries < 0.5 * dense.size


def test_organ_model_matches_the_phantom(organ_segmenter, phantom):
    """The organ model is a meaningful test subject: its labels overlap the phantom's truth."""
    from SCONetLib.metrics import dice
    _, truth = phantom
    labels = _array(organ_segmenter.segment())
    scores = [dice(labels, _array(truth), label) for label in (1, 2, 3, 4)]
    assert min(scores) > 0.6, scores


def test_spacing_changes_do_not_reencode(organ_segmenter):
    model = organ_segmenter.model
    before = model.encode_calls
    sizes = [organ_segmenter.segment(s).GetSize() for s in (None, 4.0, (6.0, 6.0, 10.0))]
    organ_segmenter.probabilities(8.0)
    assert model.encode_calls == before
    assert sizes[0] == (96, 96, 32) and sizes[1] == (72, 72, 40) and sizes[2] == (48, 48, 16)


@pytest.mark.parametrize("spacing_mm, expected", [
    ((2.5, 0.8, 0.8), [(2, 8, 8), (2, 4, 4), (2, 2, 2), (1, 1, 1)]),
    ((3.0, 3.0, 3.0), [(2, 2, 2), (1, 1, 1)]),
    ((5.0, 1.0, 10.0), [(1, 8, 1), (1, 4, 1), (1, 2, 1), (1, 1, 1)]),
    ((2.0, 5.0, 5.0), [(4, 1, 1), (2, 1, 1), (1, 1, 1)]),
    ((20.0, 20.0, 20.0), [(1, 1, 1)]),
])
def test_stride_levels(spacing_mm, expected):
    assert infer._stride_levels(spacing_mm, 13.76) == expected


def test_lattice_keeps_the_last_voxel():
    np.testing.assert_array_equal(infer._lattice(10, 4), [0, 4, 8, 9])
    np.testing.assert_array_equal(infer._lattice(9, 4), [0, 4, 8])
    np.testing.assert_array_equal(infer._lattice(1, 8), [0])


# ---------------------------------------------------------------------------------------------- probabilities


def test_probabilities(organ_segmenter):
    probs, entropy = organ_segmenter.probabilities(spacing=4.0)
    labels = organ_segmenter.segment(spacing=4.0, dense=True)
    assert probs.GetNumberOfComponentsPerPixel() == 5
    assert probs.GetPixelID() == sitk.sitkVectorFloat32 and entropy.GetPixelID() == sitk.sitkFloat32
    for image in (probs, entropy):
        assert image.GetSize() == labels.GetSize() and image.GetOrigin() == labels.GetOrigin()
        assert image.GetDirection() == labels.GetDirection() and image.GetSpacing() == labels.GetSpacing()
    p = _array(probs)                       # (K, J, I, 5)
    h = _array(entropy)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-5)
    assert np.mean(p.argmax(axis=-1) == _array(labels)) > 0.9999
    expected = -np.sum(p * np.log(np.clip(p, 1e-30, None)), axis=-1) / math.log(5)
    np.testing.assert_allclose(h, expected, atol=1e-5)
    assert 0.0 <= h.min() and h.max() <= 1.0


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("spacing", [0, -1.0, float("nan"), float("inf"), (1.0, 2.0), (1.0, 0.0, 1.0), "2",
                                     True, [[1.0]] * 4])
def test_bad_spacing(organ_segmenter, spacing):
    with pytest.raises(ValueError, match="spacing must be one or three positive finite numbers"):
        organ_segmenter.segment(spacing)


@pytest.mark.parametrize("spacing", [1e-3, 1e-300, (1e-4, 5.0, 5.0)])
def test_absurdly_small_spacing_is_refused_before_allocating(organ_segmenter, spacing):
    with pytest.raises(ValueError, match=r"would be .* voxels .* choose a larger spacing"):
        organ_segmenter.segment(spacing)
    with pytest.raises(ValueError, match=r"would be .* voxels"):
        organ_segmenter.probabilities(spacing)


def test_memory_budget_uses_available_memory(organ_segmenter, monkeypatch):
    monkeypatch.setattr(infer, "_available_memory", lambda: 10 * 2**20)    # 10 MiB free
    with pytest.raises(ValueError, match=r"72 × 72 × 40 = 207,360 voxels .* of the 10\.0 MiB available"):
        organ_segmenter.probabilities(4.0)
    assert organ_segmenter.segment(4.0).GetSize() == (72, 72, 40)      # 6 bytes/voxel still fits


def test_nan_image_is_refused():
    image = sitk.GetImageFromArray(np.full((8, 20, 20), -1000.0, np.float32))
    image[3, 4, 5] = float("nan")
    segmenter = Segmenter.from_model(SCONet())
    with pytest.raises(ValueError, match="NaN or infinite"):
        segmenter.prepare(image)
    assert not segmenter.is_prepared


@pytest.mark.filterwarnings("ignore:image intensities range")
@pytest.mark.parametrize("array", [np.full((8, 24, 24), -1000, np.int16), np.zeros((1, 24, 24), np.int16)])
def test_empty_or_tiny_volume_is_refused(array):
    segmenter = Segmenter.from_model(SCONet())
    with pytest.raises(ValueError, match="no edges|at least 2 voxels"):
        segmenter.prepare(sitk.GetImageFromArray(array))


def test_non_ct_intensities_warn(phantom):
    ct, _ = phantom
    unrescaled = sitk.Cast(ct, sitk.sitkFloat32) + 1024.0     # stored values without the DICOM rescale
    segmenter = Segmenter.from_model(SCONet(), n_points=200)
    with pytest.warns(UserWarning, match="does not look like CT"):
        segmenter.prepare(unrescaled)
    assert segmenter.is_prepared                             # odd but allowed


def test_field_of_view_larger_than_the_model_box_warns(oracle_segmenter):
    image = _image(np.eye(3), size=(60, 60, 20), spacing=(9.0, 9.0, 10.0))     # 540 mm wide, box ±220.2 mm
    with pytest.warns(UserWarning, match=r"exceeds the model's box of ±220\.2 mm.* 3[0-9]\.[0-9]% of the volume"):
        segmenter, _ = oracle_segmenter(image)
    with_warning = segmenter._prepared
    # fraction outside: |x|, |y| ≤ 270 mm, cube ±220.2 → inside fraction (220.2 / 270)² ≈ 0.665 → ~33 % outside
    assert with_warning.fraction_volume_outside == pytest.approx(1 - (440.4 / 540) ** 2, abs=0.03)


def test_field_of_view_inside_the_box_is_silent(oracle_segmenter, recwarn):
    oracle_segmenter(_image(np.eye(3)))
    assert not [w for w in recwarn if "field of view" in str(w.message)]


def test_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Segmenter(weights=tmp_path / "nope.pt", device="cpu")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        Segmenter(weights=corrupt, device="cpu")


def test_bundled_weights_load_by_default():
    assert Segmenter(device="cpu").weights_path == default_weights_path()


def test_missing_bundled_weights_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(checkpoint_module, "DEFAULT_WEIGHTS_NAME", "missing.pt")
    with pytest.raises(FileNotFoundError, match="default SCONet weights are missing"):
        Segmenter(device="cpu")


def test_segment_before_prepare(tiny_checkpoint):
    segmenter = Segmenter(weights=tiny_checkpoint, device="cpu")
    assert segmenter.metadata["note"] == "random test model"
    with pytest.raises(RuntimeError, match="call prepare"):
        segmenter.segment()
    with pytest.raises(RuntimeError, match="call prepare"):
        segmenter.probabilities()


# ---------------------------------------------------------------------------------------------- progress, cancel


def test_progress_is_monotone_and_complete(oracle_segmenter):
    segmenter, _ = oracle_segmenter(_image(np.eye(3)))
    seen = []
    segmenter.segment(spacing=1.0, progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 3


def test_cancelled_prepare_leaves_the_segmenter_unprepared(oracle_segmenter, monkeypatch):
    segmenter, _ = oracle_segmenter(_image(np.eye(3)))
    assert segmenter.is_prepared

    def cancel(fraction, message):
        if fraction >= 0.9:
            raise Cancelled()
    with pytest.raises(Cancelled):
        segmenter.prepare(_image(np.eye(3)), progress=cancel)
    with pytest.raises(RuntimeError, match="call prepare"):
        segmenter.segment()


def test_cancelled_segment_keeps_the_encoding(oracle_segmenter):
    segmenter, model = oracle_segmenter(_image(np.eye(3)))

    def cancel(fraction, message):
        if fraction > 0.3:
            raise Cancelled()
    with pytest.raises(Cancelled):
        segmenter.segment(spacing=1.0, progress=cancel)
    assert segmenter.segment().GetSize() == (40, 36, 18)
    assert model.encode_calls == 1


def test_end_to_end_with_a_checkpoint(tiny_checkpoint, phantom):
    """Real points, real random model from a checkpoint: a uint8 label map with valid labels on the input grid."""
    ct, _ = phantom
    segmenter = Segmenter(weights=tiny_checkpoint, device="cpu", n_points=1000)
    segmenter.prepare(ct)
    labels = segmenter.segment()
    assert labels.GetPixelID() == sitk.sitkUInt8 and Grid.of(labels) == Grid.of(ct)
    assert _array(labels).max() <= 4


def test_bundled_model_coarse_to_fine_agrees_with_dense(phantom):
    ct, truth = phantom
    segmenter = Segmenter(device="cpu")
    segmenter.prepare(ct)
    fast, dense = _array(segmenter.segment()), _array(segmenter.segment(dense=True))
    assert np.mean(fast == dense) >= 0.999
