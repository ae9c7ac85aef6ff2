"""The point stage in torch (SCONetLib.points.canny_torch, surf3d_torch) against SimpleITK's Canny and the NumPy SURF.

Parity checked here on the CPU (and on CUDA when present): Canny edge voxels agree with ``canny_points`` (Jaccard
≥ 99.5 %, in fact voxel for voxel) on phantoms and on the real CT; torch SURF matches the golden vectors of the
original tool within the existing tolerance and the NumPy implementation to float32 rounding; whole point clouds
agree whatever the implementation.
"""
import importlib
import multiprocessing

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SCONetLib.geometry import ras_to_lps
from SCONetLib.phantom import make_phantom
from SCONetLib.points import (canny_points, canny_points_torch, extract_point_cloud, surf3d, surf3d_torch)
from SCONetLib.points.canny_torch import canny_edges, gaussian_kernel, hysteresis, hysteresis_sparse
from SCONetLib.points.cloud import AUTO_IMPLEMENTATION, choose_implementations
from SCONetLib.progress import Cancelled

from directions import DIRECTIONS
from testdata import data_file
from test_points import _blob_image, _small_ct, BLOB_CENTRE

surf3d_torch_module = importlib.import_module("SCONetLib.points.surf3d_torch")
CPU = torch.device("cpu")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: Issue 11's parity requirement on Canny edge voxels.
MIN_JACCARD = 0.995
#: The golden README's tolerance for 3D SURF (per point, max |diff| / max |reference|).
SURF_TOLERANCE = 1e-3


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard index of two (N, 3) point sets (compared exactly)."""
    a, b = {tuple(p) for p in np.round(a, 6)}, {tuple(p) for p in np.round(b, 6)}
    return len(a & b) / len(a | b)


# ---------------------------------------------------------------------------------------------------- Canny
CANNY_CASES = {
    "phantom": lambda: make_phantom(7, size=(96, 96, 32), spacing=(4.0, 4.0, 3.5), random_orientation=False)[0],
    "phantom_oblique": lambda: make_phantom(7, size=(96, 96, 32), spacing=(4.0, 4.0, 3.5),
                                            random_orientation=True)[0],
    "phantom_fine": lambda: make_phantom(2, size=(180, 150, 24), spacing=(0.74, 0.66, 4.25),
                                         random_orientation=False)[0],
    "small_ct_3_taps_in_z": _small_ct,
    "real_ct": lambda: sitk.ReadImage(str(data_file("real/example_ct_sm.nii.gz"))),
}


@pytest.fixture(scope="module", params=sorted(CANNY_CASES))
def canny_case(request):
    image = CANNY_CASES[request.param]()
    return request.param, image, canny_points(image)


@pytest.mark.parametrize("device", DEVICES)
def test_canny_torch_finds_simpleitks_edges(canny_case, device):
    name, image, reference = canny_case
    points = canny_points_torch(image, device=device)
    jaccard = _jaccard(points, reference)
    assert jaccard >= MIN_JACCARD, f"{name}: Jaccard {jaccard:.5f}"
    # listed in the same order (first image axis slowest); with SimpleITK 2.5 (ITK 5.4) the very same voxels
    shared = {tuple(p) for p in np.round(points, 6)} & {tuple(p) for p in np.round(reference, 6)}
    np.testing.assert_array_equal(*[[p for p in np.round(x, 6) if tuple(p) in shared] for x in (points, reference)])


def test_canny_edges_do_not_depend_on_the_slab_size():
    image = _small_ct()
    volume = torch.from_numpy(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)))
    spacing = image.GetSpacing()
    edges = [canny_edges(volume, spacing, 2.0, (20.0, 50.0), 0.01, slab_voxels=v) for v in (1, 7 * 64 * 56, 10**9)]
    assert edges[0].any()
    for other in edges[1:]:
        assert torch.equal(other, edges[0])


def test_canny_edges_of_noise_match_simpleitk():
    """Many short, branching edges: the hysteresis and zero-crossing ties are exercised everywhere."""
    noise = np.random.default_rng(1).normal(0.0, 400.0, (12, 70, 80)).astype(np.float32)
    image = sitk.GetImageFromArray(noise)
    image.SetSpacing((1.1, 0.9, 2.0))
    expected = sitk.GetArrayFromImage(sitk.CannyEdgeDetection(image, 20.0, 50.0, [2.0] * 3, [0.01] * 3)) > 0
    edges = canny_edges(torch.from_numpy(noise), image.GetSpacing(), 2.0, (20.0, 50.0), 0.01).numpy()
    assert expected.sum() > 1000
    assert (edges & expected).sum() / (edges | expected).sum() >= MIN_JACCARD


@pytest.mark.parametrize("spacing", [0.75, 0.65625, 1.6, 2.5, 4.0, 0.2])
def test_gaussian_kernel_is_simpleitks(spacing):
    """The kernel equals the impulse response of SimpleITK's DiscreteGaussian (variance 2 mm², error 0.01)."""
    impulse = np.zeros((3, 3, 129))
    impulse[1, 1, 64] = 1.0
    image = sitk.GetImageFromArray(impulse)
    image.SetSpacing((spacing, 1e3, 1e3))                  # the other two kernels are (1e-6, 1 - 2e-6, 1e-6)
    response = sitk.GetArrayFromImage(sitk.DiscreteGaussian(image, [2.0] * 3, 32, 0.01, True))[1, 1]
    response /= response.sum()
    kernel = gaussian_kernel(2.0 / spacing ** 2, 0.01)
    radius = len(kernel) // 2
    assert radius <= 32 and np.all(response[:64 - radius] == 0) and np.all(response[65 + radius:] == 0)
    np.testing.assert_allclose(response[64 - radius:65 + radius], kernel, rtol=1e-12, atol=1e-16)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)


def test_absurd_variance_gives_no_edges_like_itk():
    """A variance beyond the float64 range of e^t (a 12-voxel axis resampled to 256) gives a NaN kernel: no edges."""
    assert np.isnan(gaussian_kernel(910.0, 0.01)).all()
    with pytest.warns(UserWarning, match="Hounsfield"):
        with pytest.raises(ValueError, match="no edges"):
            canny_points_torch(sitk.GetImageFromArray(np.zeros((10, 12, 12), np.int16)))


def _random_masks(seed: int, shape=(9, 23, 31), density=0.3):
    rng = np.random.default_rng(seed)
    candidates = rng.random(shape) < density
    seeds = candidates & (rng.random(shape) < 0.02)
    return torch.from_numpy(candidates), torch.from_numpy(seeds)


@pytest.mark.parametrize("seed, density", [(0, 0.3), (1, 0.15), (2, 0.6), (3, 0.0)])
def test_sparse_hysteresis_equals_labelling(seed, density):
    candidates, seeds = _random_masks(seed, density=density)
    expected = hysteresis(candidates, seeds)
    np.testing.assert_array_equal(hysteresis_sparse(candidates, seeds).numpy(), expected.numpy())
    # a known answer: a diagonal chain touching a seed survives entirely, an unseeded one vanishes
    chain = torch.zeros(4, 5, 5, dtype=torch.bool)
    for n in range(4):
        chain[n, n, n] = True
    chain[0, 4, 0] = True
    seed = torch.zeros_like(chain)
    seed[3, 3, 3] = True
    for function in (hysteresis, hysteresis_sparse):
        kept = function(chain, seed)
        assert kept[[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]].all() and not kept[0, 4, 0]


# ---------------------------------------------------------------------------------------------------- 3D SURF
@pytest.fixture(scope="module", params=["a", "b"])
def golden(request):
    reference = dict(np.load(data_file(f"golden/surf3d/surf3d_volume_{request.param}.npz")))
    image = sitk.ReadImage(str(data_file(f"golden/surf3d/volume_{request.param}.nii.gz")))
    return image, reference


@pytest.mark.parametrize("device", DEVICES)
def test_surf3d_torch_matches_the_original_tool(golden, device):
    image, reference = golden
    points = ras_to_lps(reference["points_world"])
    computed = surf3d_torch(image, points, device=device)
    assert computed.shape == (500, 48) and computed.dtype == np.float32
    errors = np.abs(computed - reference["descriptor"]).max(axis=1) / np.abs(reference["descriptor"]).max(axis=1)
    assert errors.max() <= SURF_TOLERANCE
    np.testing.assert_allclose(computed, surf3d(image, points), rtol=2e-7, atol=1e-6)


@pytest.mark.parametrize("direction", ["identity", "oblique", "permuted"])
@pytest.mark.parametrize("scale_mm", [2.0, 4.0, 6.5])
def test_surf3d_torch_equals_numpy(direction, scale_mm):
    """Same descriptors as the NumPy implementation, for oblique volumes and for int64 running sums (6.5 mm)."""
    image = _blob_image(DIRECTIONS[direction], np.int16)
    points = BLOB_CENTRE + np.random.default_rng(5).uniform(-12.0, 12.0, (120, 3))
    np.testing.assert_allclose(surf3d_torch(image, points, scale_mm), surf3d(image, points, scale_mm),
                               rtol=2e-7, atol=1e-6)


def test_surf3d_torch_does_not_depend_on_the_slab_size():
    image = _blob_image()
    points = BLOB_CENTRE + np.random.default_rng(2).uniform(-12.0, 12.0, (60, 3))
    whole = surf3d_torch_module._surf3d_torch(image, points, 4.0, CPU, slab_voxels=10**9)
    thin = surf3d_torch_module._surf3d_torch(image, points, 4.0, CPU, slab_voxels=100_000)
    np.testing.assert_array_equal(thin, whole)


def test_surf3d_torch_checks_its_input_and_reports_progress():
    image = _blob_image(size=(8, 8, 8))
    assert surf3d_torch(image, np.zeros((0, 3))).shape == (0, 48)
    with pytest.raises(ValueError, match="scale_mm must be a positive number"):
        surf3d_torch(image, np.zeros((1, 3)), 0.0)
    with pytest.raises(ValueError, match=r"got shape \(4, 2\)"):
        surf3d_torch(image, np.zeros((4, 2)))
    with pytest.raises(TypeError, match="SimpleITK.Image"):
        surf3d_torch(np.zeros((8, 8, 8)), np.zeros((1, 3)))
    seen = []
    points = BLOB_CENTRE + np.random.default_rng(2).uniform(-12.0, 12.0, (30, 3))
    surf3d_torch_module._surf3d_torch(_blob_image(), points, 4.0, CPU, progress=lambda f, m: seen.append(f),
                                      slab_voxels=50_000)
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 3

    def cancel(fraction, message):
        raise Cancelled()
    with pytest.raises(Cancelled):
        surf3d_torch(_blob_image(), points, progress=cancel)


# ---------------------------------------------------------------------------------------------------- the cloud
@pytest.fixture(scope="module")
def small_ct():
    return _small_ct()


@pytest.mark.parametrize("implementation", ["torch", "auto"])
def test_point_clouds_agree_whatever_the_implementation(small_ct, implementation):
    reference = extract_point_cloud(small_ct, n_points=3000, seed=7, implementation="numpy")
    cloud = extract_point_cloud(small_ct, n_points=3000, seed=7, implementation=implementation)
    _assert_same_cloud(cloud, reference)


def _assert_same_cloud(cloud, reference):
    """Same points; int8 descriptors equal but for rare one-step flips of the truncation (float32 rounding)."""
    np.testing.assert_array_equal(cloud.xyz_lps, reference.xyz_lps)
    steps = np.abs(cloud.surf_int8.astype(int) - reference.surf_int8)
    assert steps.max() <= 1 and np.mean(steps == 0) >= 0.999
    np.testing.assert_allclose(cloud.surf_scale, reference.surf_scale, rtol=1e-6)


def test_implementation_choice():
    assert choose_implementations("auto", "cpu") == AUTO_IMPLEMENTATION["cpu"]
    assert choose_implementations("auto", torch.device("cuda", 1)) == {"canny": "torch", "surf3d": "torch"}
    assert choose_implementations("numpy", "cuda") == {"canny": "numpy", "surf3d": "numpy"}
    with pytest.raises(ValueError, match=r"implementation must be one of \['auto', 'numpy', 'torch'\], got 'gpu'"):
        choose_implementations("gpu")
    with pytest.raises(ValueError, match="implementation must be one of"):
        extract_point_cloud(_blob_image(size=(8, 8, 8)), implementation="itk")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cloud_equals_cpu_cloud(small_ct):
    reference = extract_point_cloud(small_ct, n_points=3000, seed=7, implementation="numpy")
    cloud = extract_point_cloud(small_ct, n_points=3000, seed=7, device="cuda")
    _assert_same_cloud(cloud, reference)


def _cloud_in_child(queue, image_array, implementation):
    image = sitk.GetImageFromArray(image_array)
    image.SetSpacing((3.0, 3.0, 4.0))
    queue.put(len(extract_point_cloud(image, n_points=500, implementation=implementation).xyz_lps))


@pytest.mark.parametrize("implementation", ["auto", "torch"])
def test_point_stage_runs_in_a_forked_worker(small_ct, implementation):
    """After torch's intra-op threads ran in this process, a forked worker (``ProcessPoolExecutor`` on Linux, as the
    training cache uses) must not hang in the point stage: GNU OpenMP cannot start a parallel region there."""
    torch.randn(4_000_000).exp_()                       # an intra-op parallel region in the parent
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_cloud_in_child,
                            args=(queue, sitk.GetArrayFromImage(small_ct), implementation))
    child.start()
    child.join(timeout=180)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the point stage hung in a forked process")
    assert child.exitcode == 0 and queue.get(timeout=5) == 500
