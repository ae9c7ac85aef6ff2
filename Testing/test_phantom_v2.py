"""Tests of the phantom generator's version 2 (domain randomisation): every randomised quantity covers its
stated range over many seeds, outputs record the version and the draws, variants really appear in the images,
and version 1 is unchanged."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from SCONetLib import phantom
from SCONetLib.geometry import Grid
from SCONetLib.labels import organ_by_name

SEEDS = range(400)


@pytest.fixture(scope="module")
def draws():
    """The drawn quantities of 400 seeds at 256 × 256 in plane (no rendering: milliseconds per seed)."""
    return [phantom.phantom_parameters(seed, size=(256, 256, None)) for seed in SEEDS]


def test_every_randomised_quantity_covers_its_stated_range(draws):
    assert set(draws[0]) == set(phantom.RANGES_V2)
    for name, stated in phantom.RANGES_V2.items():
        values = [d[name] for d in draws]
        if name == "organ_scale":
            values = [v for triple in values for v in triple]
        if isinstance(stated[0], (str, bool)):
            assert set(values) == set(stated), name
            continue
        low, high = stated
        span = high - low
        assert min(values) >= low - 1e-9 and max(values) <= high + 1e-9, (name, min(values), max(values))
        assert min(values) <= low + 0.1 * span and max(values) >= high - 0.1 * span, (name, min(values), max(values))


def test_every_contrast_phase_and_its_hu_ranges_are_used(draws):
    phases = [d["phase"] for d in draws]
    for name, probability in phantom.PHASES.items():
        assert abs(phases.count(name) / len(phases) - probability) < 0.08, name
    assert all(d["excreted_contrast"] <= (d["phase"] == "delayed") for d in draws)
    assert all(d["slice_thickness_mm"] >= d["slice_spacing_mm"] - 1e-9 or d["slice_thickness_mm"] == 5.0
               for d in draws)


def test_outputs_record_version_and_draws_and_same_seed_repeats():
    kwargs = {"size": (64, 56, None), "version": 2, "max_slices": 24}
    ct, labels = phantom.make_phantom(11, **kwargs)
    again, _ = phantom.make_phantom(11, **kwargs)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(again))
    for image in (ct, labels):
        assert image.GetMetaData("sconet_phantom_version") == "2"
        assert json.loads(image.GetMetaData("sconet_phantom_parameters")) == \
            json.loads(json.dumps(phantom.phantom_parameters(11, **kwargs)))
    assert Grid.of(ct) == Grid.of(labels) and ct.GetSize()[2] <= 24
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2, 3, 4}


def _seed_where(condition, **kwargs):
    return next(s for s in range(2000) if condition(phantom.phantom_parameters(s, **kwargs)))


def test_a_resected_spleen_is_absent_from_the_labels():
    kwargs = {"size": (96, 96, 100), "spacing": (4.0, 4.0, 4.0), "random_orientation": False, "version": 2}
    seed = _seed_where(lambda d: d["missing"] == "spleen", **kwargs)
    _, labels = phantom.make_phantom(seed, **kwargs)
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=5)
    assert counts[organ_by_name("spleen").label] == 0 and counts[organ_by_name("liver").label] > 0


def test_arterial_phase_enhances_kidney_cortex_over_medulla_and_noncontrast_does_not():
    kwargs = {"size": (96, 96, 100), "spacing": (4.0, 4.0, 4.0), "random_orientation": False, "version": 2}
    means = {}
    for phase in ("arterial", "non-contrast"):
        seed = _seed_where(lambda d: d["phase"] == phase and d["missing"] == "none" and d["lesions"] == 0
                           and not d["metal"], **kwargs)
        ct, labels = phantom.make_phantom(seed, **kwargs)
        hu, lab = sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(labels)
        means[phase] = float(np.median(hu[lab == organ_by_name("kidneys").label]))
    assert means["arterial"] > means["non-contrast"] + 60


def test_version_1_images_are_unchanged():
    """Known answer: the digest of a version-1 phantom as generated before version 2 existed."""
    ct, _ = phantom.make_phantom(1003, size=(128, 128, None))
    assert hashlib.md5(sitk.GetArrayViewFromImage(ct).tobytes()).hexdigest() == "a975f009d398f7f670e633dfb61d2b68"
    assert ct.GetMetaData("sconet_phantom_version") == "1"


@pytest.mark.parametrize("kwargs, match", [({"version": 3}, "version must be one of"),
                                            ({"version": True}, "version must be one of"),
                                            ({"max_slices": 1}, "max_slices must be an integer >= 2 or None")])
def test_bad_version_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        phantom.make_phantom(0, size=(32, 32, 4), **kwargs)
