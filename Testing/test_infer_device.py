"""SCONetLib.infer on the device: the batched SCONet decoder, reduced precision, the torch refinement, and parity of
the whole pipeline (torch point stage + device decoding) with the NumPy point stage and ``model.decode``.

Everything runs on the CPU here, as the CUDA path is the same code; the CUDA-only checks run when a GPU exists.
"""
import copy
import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SCONetLib import infer
from SCONetLib.infer import Segmenter, _GridDecoder, _refine
from SCONetLib.model import SCONet
from SCONetLib.phantom import make_phantom

from testdata import data_file

#: Issue 11's parity requirement on final labels.
MIN_LABEL_AGREEMENT = 0.999


class PlainDecode(torch.nn.Module):
    """An SCONet seen only through ``config``, ``encode`` and ``decode``: the segmenter then calls ``model.decode``
    per chunk, as before the batched decoder existed (the reference for parity)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def encode(self, points):
        return self.inner.encode(points)

    def decode(self, queries, grid):
        return self.inner.decode(queries, grid)


@pytest.fixture(scope="module")
def bundled():
    return Segmenter(device="cpu").model


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(3, size=(96, 96, 32), spacing=(3.0, 3.0, 5.0), random_orientation=True)[0]


def _labels(image):
    return sitk.GetArrayFromImage(image)


# ---------------------------------------------------------------------------------------------- batched decoder


def test_grid_decoder_computes_the_models_logits():
    torch.manual_seed(3)
    model = SCONet().eval()
    for block in model.decoder.blocks:                       # fc_1 starts at zero: make every layer matter
        torch.nn.init.normal_(block.fc_1.weight, std=0.2)
    grid = torch.randn(1, 32, 32, 32, 32)
    queries = torch.rand(20_000, 3) * 1.5 - 0.75             # partly outside the cube: border features
    with torch.inference_mode():
        expected = model.decode(queries[None], grid)[0]
        logits = _GridDecoder(model.decoder, grid)(queries)
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    top2 = expected.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(logits.argmax(1)[clear], expected.argmax(1)[clear]) and clear.float().mean() > 0.99


def test_other_models_go_through_decode(bundled):
    state_logits = infer._logits_function(PlainDecode(bundled), torch.zeros(1, 32, 32, 32, 32), None)
    assert not isinstance(state_logits, _GridDecoder)
    assert isinstance(infer._logits_function(bundled, torch.zeros(1, 32, 32, 32, 32), None), _GridDecoder)


# ---------------------------------------------------------------------------------------------- precision


@pytest.fixture(scope="module")
def prepared(bundled, phantom):
    segmenter = Segmenter.from_model(bundled, n_points=20_000)
    segmenter.prepare(phantom)
    return segmenter


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_labels_agree_with_float32(bundled, phantom, prepared, precision):
    reduced = Segmenter.from_model(bundled, n_points=20_000, precision=precision)
    reduced.prepare(phantom)
    agreement = np.mean(_labels(reduced.segment()) == _labels(prepared.segment()))
    assert agreement >= MIN_LABEL_AGREEMENT, f"{precision}: {agreement:.5f}"


@pytest.mark.parametrize("option, value, message", [
    ("precision", "fp8", r"precision must be one of \['float32', 'bfloat16', 'float16'\], got 'fp8'"),
    ("implementation", "gpu", r"implementation must be one of \['auto', 'numpy', 'torch'\], got 'gpu'"),
])
def test_bad_options_are_refused(bundled, option, value, message):
    with pytest.raises(ValueError, match=message):
        Segmenter.from_model(bundled, **{option: value})


# ---------------------------------------------------------------------------------------------- device residency


def test_a_segmentation_crosses_to_the_host_once(prepared, monkeypatch):
    """Lattices, masks, queries and labels stay on the device: one ``.cpu()`` per label map (the result)."""
    calls = []
    original = torch.Tensor.cpu

    def counting(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "cpu", counting)
    for spacing in (None, 1.6):
        calls.clear()
        labels = prepared.segment(spacing)
        assert len(calls) == 1 and np.prod(calls[0]) == labels.GetNumberOfPixels()


# ---------------------------------------------------------------------------------------------- refinement


def _refine_by_definition(labels, axes, new_axes, margin):
    """Point by point: label of the coarse point at or below; needed inside (or next to) a cell with mixed corners."""
    shape = labels.shape
    cells = [max(1, n - 1) for n in shape]
    mixed = np.zeros(cells, dtype=bool)
    for c in itertools.product(*(range(n) for n in cells)):
        corners = labels[tuple(slice(ci, ci + 2) for ci in c)]
        mixed[c] = corners.min() != corners.max()
    new_labels = np.zeros([len(a) for a in new_axes], dtype=np.uint8)
    need = np.zeros_like(new_labels, dtype=bool)
    for p in itertools.product(*(range(len(a)) for a in new_axes)):
        index = [new_axes[d][p[d]] for d in range(3)]
        below = [int(np.searchsorted(axes[d], index[d], side="right")) - 1 for d in range(3)]
        new_labels[p] = labels[tuple(below)]
        cell = [min(b, max(0, len(axes[d]) - 2)) for d, b in enumerate(below)]
        reach = 1 if margin else 0
        near = mixed[tuple(slice(max(0, c - reach), c + reach + 1) for c in cell)].any()
        on_old = all(index[d] in axes[d] for d in range(3))
        need[p] = near and not on_old
    return new_labels, need


@pytest.mark.parametrize("margin", [True, False])
@pytest.mark.parametrize("seed, shape, strides", [(0, (9, 13, 17), (2, 4, 4)), (1, (5, 9, 12), (1, 2, 2)),
                                                  (2, (1, 9, 9), (1, 4, 2))])
def test_refine_follows_its_definition(seed, shape, strides, margin):
    rng = np.random.default_rng(seed)
    axes = [infer._lattice(n, s) for n, s in zip(shape, strides)]
    new_axes = [infer._lattice(n, max(1, s // 2)) for n, s in zip(shape, strides)]
    labels = np.zeros([len(a) for a in axes], dtype=np.uint8)
    labels[rng.random(labels.shape) < 0.08] = 2
    expected_labels, expected_need = _refine_by_definition(labels, axes, new_axes, margin)
    new_labels, need = _refine(torch.from_numpy(labels), [torch.from_numpy(a) for a in axes],
                               [torch.from_numpy(a) for a in new_axes], margin)
    np.testing.assert_array_equal(new_labels.numpy(), expected_labels)
    np.testing.assert_array_equal(need.numpy(), expected_need)


# ---------------------------------------------------------------------------------------------- pipeline parity


PARITY_CASES = {
    "phantom": lambda: make_phantom(11, size=(128, 128, 40), spacing=(2.5, 2.5, 4.0), random_orientation=False)[0],
    "phantom_oblique": lambda: make_phantom(3, size=(96, 96, 32), spacing=(3.0, 3.0, 5.0),
                                            random_orientation=True)[0],
    "real_ct": lambda: sitk.ReadImage(str(data_file("real/example_ct_sm.nii.gz"))),
}


@pytest.mark.parametrize("name, implementation", [("phantom", "auto"), ("phantom_oblique", "auto"),
                                                  pytest.param("real_ct", "torch", marks=pytest.mark.slow)])
def test_labels_agree_with_the_numpy_pipeline(bundled, name, implementation):
    """The point stage as chosen for the CPU (``"auto"``) or all in torch (as on CUDA) + the batched decoder, vs the
    NumPy point stage + ``model.decode``: ≥ 99.9 % equal labels, on the input grid and at 2 mm."""
    image = PARITY_CASES[name]()
    reference = Segmenter.from_model(PlainDecode(bundled), implementation="numpy")
    reference.prepare(image)
    segmenter = Segmenter.from_model(bundled, implementation=implementation)
    segmenter.prepare(image)
    for spacing in (None, 2.0):
        agreement = np.mean(_labels(segmenter.segment(spacing)) == _labels(reference.segment(spacing)))
        assert agreement >= MIN_LABEL_AGREEMENT, f"{name} at {spacing}: {agreement:.5f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cuda_labels_agree_with_the_cpu(bundled, phantom, precision):
    cpu = Segmenter.from_model(bundled, implementation="numpy")
    cpu.prepare(phantom)
    cuda = Segmenter.from_model(copy.deepcopy(bundled), device="cuda", precision=precision)
    cuda.prepare(phantom)
    assert cuda.device.type == "cuda"
    assert np.mean(_labels(cuda.segment()) == _labels(cpu.segment())) >= MIN_LABEL_AGREEMENT
