"""The organ table: label value, name, colour and standard (SNOMED-CT / DICOM) terminology.

Label values follow AbdomenCT-1K: 0 background, 1 liver, 2 kidneys (left and right in one label), 3 spleen,
4 pancreas. The model's class index equals the label value.
"""
from __future__ import annotations

from dataclasses import dataclass

#: SNOMED-CT "Anatomical Structure" category shared by every organ.
CATEGORY = ("SCT", "123037004", "Anatomical Structure")


@dataclass(frozen=True)
class Organ:
    """One segmented structure.

    Attributes
    ----------
    label : int, value in label maps and class index of the model.
    name : str, short machine name (``"liver"``).
    display_name : str, name shown to users (``"Liver"``).
    color : (3,) int tuple, RGB 0–255 (DICOM master list colours).
    snomed_type : (scheme, code, meaning) of the anatomic type.
    snomed_modifier : (scheme, code, meaning) or ``None``.
    """

    label: int
    name: str
    display_name: str
    color: tuple
    snomed_type: tuple
    snomed_modifier: tuple | None = None


ORGANS = (
    Organ(1, "liver", "Liver", (221, 130, 101), ("SCT", "10200004", "Liver")),
    Organ(2, "kidneys", "Kidneys", (185, 102, 83), ("SCT", "64033007", "Kidney"),
          ("SCT", "51440002", "Right and left")),
    Organ(3, "spleen", "Spleen", (157, 108, 162), ("SCT", "78961009", "Spleen")),
    Organ(4, "pancreas", "Pancreas", (249, 180, 111), ("SCT", "15776009", "Pancreas")),
)
#: Class names in model output order (index = label value).
CLASS_NAMES = ("background",) + tuple(o.name for o in ORGANS)
NUM_CLASSES = len(CLASS_NAMES)


def organ_by_name(name: str) -> Organ:
    """The organ called ``name`` (case-insensitive); ``ValueError`` listing the valid names otherwise."""
    for organ in ORGANS:
        if organ.name == name.lower():
            return organ
    raise ValueError(f"unknown organ {name!r}; expected one of {[o.name for o in ORGANS]}")
