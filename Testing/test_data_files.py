"""The vendored test data (Testing/data): every file is the one its README describes, and the real CT is usable."""
import hashlib
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SCONetLib.data import LABEL_MAP_PRESETS, apply_label_map
from SCONetLib.io import read_image
from SCONetLib.labels import ORGANS

DATA = Path(__file__).resolve().parent / "data"


def test_files_match_the_checksums_in_the_readme():
    listed = dict((name, digest) for digest, name in
                  re.findall(r"^([0-9a-f]{64})  (\S+)$", (DATA / "README.md").read_text(encoding="utf-8"), re.M))
    present = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file()} - {
        "README.md", "real/LICENSE-Apache-2.0.txt"}
    assert set(listed) == present
    for name, digest in listed.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


def test_real_ct_and_its_labels_share_a_grid_and_hold_every_organ():
    ct = read_image(DATA / "real" / "example_ct_sm.nii.gz")
    labels = read_image(DATA / "real" / "example_seg.nii.gz")
    assert ct.GetSize() == labels.GetSize() == (122, 101, 30)
    np.testing.assert_allclose(ct.GetSpacing(), (3.0, 3.0, 3.0), atol=1e-4)
    np.testing.assert_allclose(ct.GetOrigin(), labels.GetOrigin(), atol=1e-4)
    hu = sitk.GetArrayViewFromImage(ct)
    assert hu.min() <= -900 and hu.max() >= 200                   # air and bone: CT in HU
    ours = apply_label_map(sitk.GetArrayViewFromImage(labels), LABEL_MAP_PRESETS["totalsegmentator"])
    assert set(np.unique(ours)) == {0} | {organ.label for organ in ORGANS}
