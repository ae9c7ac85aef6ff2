"""Training data: datasets of CT/label pairs, their preprocessing cache, and the per-step samples SCONet trains on.

Pipeline
--------
1. **Find the cases** (:func:`find_cases`): an AbdomenCT-1K folder (``volumes/Case_XXXXX_0000.nii.gz`` +
   ``segmentations/Case_XXXXX.nii.gz``), any folder of image/label pairs described by two path patterns with an
   ``{id}`` placeholder, or synthetic phantoms generated once into the cache (:func:`phantom_dataset`).
2. **Split** them (:func:`split_cases`): ``train.lst`` / ``val.lst`` / ``test.lst`` in the dataset folder when
   present, otherwise a seeded 80/10/10 split.
3. **Preprocess** each case once (:func:`prepare_cases`): the point cloud of **all** Canny edge points with their
   int8 SURF descriptors (:meth:`SCONetLib.points.PointCloud.save`) and the label map mapped to SCONet's labels
   (0 background, 1 liver, 2 kidneys, 3 spleen, 4 pancreas) as compressed ``uint8``. Entries are keyed by the
   preprocessing settings and the source files (path, size, modification time), written atomically, built by
   parallel worker processes; a broken case is reported and skipped.
4. **Sample** (:func:`sample_training_example`): per step, ``n_points`` input points drawn with replacement and
   ``n_queries`` voxels drawn uniformly with replacement, both mapped to the model's object frame, with the
   reference's random linear augmentation.

Frames: label voxel index (KJI array order) → ``Grid.index_to_lps`` (LPS mm) → ``ObjectFrame.lps_to_object``
of the **image** grid (the same frame the input points use), see :mod:`SCONetLib.geometry`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from . import __version__
from .validate import check_int, check_keys, check_number
from .geometry import Grid, ObjectFrame
from .io import image_stem, write_json
from .labels import NUM_CLASSES
from .progress import ProgressCallback, report

logger = logging.getLogger(__name__)

#: Version of the cache layout; bump when what is stored changes.
CACHE_VERSION = 1
#: Splits a dataset may define.
SPLITS = ("train", "val", "test")
#: Label maps of public datasets onto SCONet's labels (1 liver, 2 kidneys, 3 spleen, 4 pancreas); every value
#: not listed becomes background.
LABEL_MAP_PRESETS = {
    # AbdomenCT-1K and SCONet's own phantoms already use SCONet's labels.
    "abdomenct1k": {1: 1, 2: 2, 3: 3, 4: 4},
    # TotalSegmentator v2 "total" task: spleen 1, kidney_right 2, kidney_left 3, liver 5, pancreas 7.
    "totalsegmentator": {5: 1, 2: 2, 3: 2, 1: 3, 7: 4},
    # TotalSegmentator v1: spleen 1, kidney_right 2, kidney_left 3, liver 5, pancreas 10.
    "totalsegmentator_v1": {5: 1, 2: 2, 3: 2, 1: 3, 10: 4},
    # BTCV (Multi-Atlas Labeling Beyond the Cranial Vault): spleen 1, right kidney 2, left kidney 3, liver 6,
    # pancreas 11.
    "btcv": {6: 1, 2: 2, 3: 2, 1: 3, 11: 4},
}
#: Path patterns of the dataset layouts :func:`find_cases` knows (``{id}`` is the case id).
LAYOUTS = {
    "abdomenct1k": ("volumes/{id}_0000.nii.gz", "segmentations/{id}.nii.gz"),
    "nnunet": ("imagesTr/{id}_0000.nii.gz", "labelsTr/{id}.nii.gz"),
}
#: Fractions of the seeded split used when a dataset has no list files.
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
#: Keys of the ``phantom`` section of :class:`DataConfig` besides make_phantom's own keyword arguments.
_PHANTOM_SPLIT_KEYS = ("n_train", "n_val", "n_test", "seed")
#: Their defaults.
DEFAULT_PHANTOM_SPLITS = {"n_train": 8, "n_val": 2, "n_test": 2, "seed": 0}


# ============================================================================ configuration

@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from and how it is preprocessed (the ``data:`` section of a training YAML).

    Attributes
    ----------
    source : str
        ``"abdomenct1k"`` (AbdomenCT-1K layout under ``root``), ``"folder"`` (image/label pairs found with
        ``image_pattern`` / ``label_pattern`` under ``root``) or ``"phantom"`` (synthetic phantoms generated into
        the cache, see ``phantom``).
    root : str or None
        Dataset folder (not used for phantoms).
    image_pattern, label_pattern : str
        For ``source="folder"``: paths relative to ``root`` with one ``{id}`` placeholder, e.g.
        ``"imagesTr/{id}_0000.nii.gz"`` and ``"labelsTr/{id}.nii.gz"`` (the default, nnU-Net's layout). The
        placeholder matches any text without a ``/``.
    label_map : str or None
        How the dataset's label values become SCONet's: a preset name from :data:`LABEL_MAP_PRESETS`
        (``"totalsegmentator"``, ``"btcv"`` …) or ``"src:dst,src:dst,…"`` (e.g. ``"6:1,2:2,3:2,1:3,11:4"``);
        unlisted values become background. ``None`` keeps values 0–4 and rejects any other value.
    split_seed : int
        Seed of the split when the dataset has no ``train.lst`` / ``val.lst`` / ``test.lst``.
    split_fractions : (3,) floats
        Train / val / test fractions of that split.
    cache_dir : str or None
        Preprocessing cache; ``None`` means ``<out_dir>/cache`` of the training run.
    workers : int
        Worker processes of the preprocessing (1 runs in the calling process).
    memory_cache_mb : int
        Prepared cases kept in memory during training (least recently used are dropped beyond this size).
    phantom : dict
        For ``source="phantom"``: ``n_train``, ``n_val``, ``n_test`` (cases per split), ``seed`` (seed of the
        first case) and any keyword argument of :func:`SCONetLib.phantom.make_phantom` (``size``, ``spacing``,
        ``random_orientation``, ``noise_hu``, ``blur_voxels``, ``version``, ``max_slices``).
    stream : dict or None
        For ``source="phantom"``: train on an unlimited stream of distinct phantoms generated while training runs
        (:class:`PhantomStream`; keys :data:`STREAM_DEFAULTS`) instead of the ``n_train`` fixed ones, which may
        then be 0. Validation and test phantoms still come from ``phantom``.
    """

    source: str = "abdomenct1k"
    root: str | None = None
    image_pattern: str = LAYOUTS["nnunet"][0]
    label_pattern: str = LAYOUTS["nnunet"][1]
    label_map: str | None = None
    split_seed: int = 0
    split_fractions: tuple = DEFAULT_SPLIT_FRACTIONS
    cache_dir: str | None = None
    workers: int = 1
    memory_cache_mb: int = 2048
    phantom: dict = field(default_factory=lambda: dict(DEFAULT_PHANTOM_SPLITS))
    stream: dict | None = None

    def __post_init__(self):
        if self.source not in ("abdomenct1k", "folder", "phantom"):
            raise ValueError(f"data.source must be 'abdomenct1k', 'folder' or 'phantom', got {self.source!r}")
        if self.source != "phantom" and not self.root:
            raise ValueError(f"data.root (the dataset folder) is required for data.source={self.source!r}")
        for name in ("image_pattern", "label_pattern"):
            if getattr(self, name).count("{id}") != 1:
                raise ValueError(f"data.{name} must contain exactly one '{{id}}' placeholder, "
                                 f"got {getattr(self, name)!r}")
        parse_label_map(self.label_map)  # validates
        fractions = tuple(self.split_fractions)
        if len(fractions) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in fractions) \
                or not 0.999 <= sum(fractions) <= 1.001:
            raise ValueError(f"data.split_fractions must be 3 numbers >= 0 summing to 1 (train, val, test), "
                             f"got {self.split_fractions!r}")
        object.__setattr__(self, "split_fractions", tuple(float(f) for f in fractions))
        check_int("data.workers", self.workers, 1)
        check_int("data.memory_cache_mb", self.memory_cache_mb, 0)
        if self.stream is not None:
            if self.source != "phantom":
                raise ValueError(f"data.stream needs data.source='phantom', got {self.source!r}")
            object.__setattr__(self, "stream", _check_stream_section(self.stream))
        if self.source == "phantom":
            _check_phantom_section(self.phantom, streamed=self.stream is not None)

    @classmethod
    def from_dict(cls, values: Mapping) -> "DataConfig":
        """Config from a ``data:`` mapping; unknown keys raise ``ValueError`` naming them."""
        values = check_keys(values, (f.name for f in dataclasses.fields(cls)), "data")
        if "phantom" in values:
            values["phantom"] = {**DEFAULT_PHANTOM_SPLITS, **dict(values["phantom"] or {})}
        return cls(**values)

    def to_dict(self) -> dict:
        """JSON-compatible dict of the fields."""
        out = dataclasses.asdict(self)
        out["split_fractions"] = list(self.split_fractions)
        return json.loads(json.dumps(out))


def _check_phantom_section(section, streamed: bool = False) -> None:
    from .phantom import make_phantom

    allowed = set(_PHANTOM_SPLIT_KEYS) | (set(inspect.signature(make_phantom).parameters) - {"seed", "progress"})
    check_keys(section, allowed, "data.phantom")
    for key in _PHANTOM_SPLIT_KEYS:
        check_int(f"data.phantom.{key}", section.get(key), 1 if key == "n_train" and not streamed else 0)


#: Keys of the ``data.stream`` section and their defaults (see :class:`PhantomStream`).
STREAM_DEFAULTS = {"seed": 1_000_000, "per_epoch": 16, "reuse": 2, "version": 2, "v1_fraction": 0.0,
                   "size": [128, 320],
                   "aspect": [0.75, 1.0], "max_slices": 120, "surf_points": 40_000, "random_orientation": True}


def _check_stream_section(section) -> dict:
    """The ``data.stream`` section with defaults filled in; ``ValueError`` naming a bad key or value."""
    values = {**STREAM_DEFAULTS, **check_keys(section or {}, STREAM_DEFAULTS, "data.stream")}
    for key in ("seed", "per_epoch", "reuse", "max_slices", "surf_points"):
        check_int(f"data.stream.{key}", values[key], 0 if key == "seed" else 1)
    if values["version"] not in (1, 2):
        raise ValueError(f"data.stream.version must be 1 or 2, got {values['version']!r}")
    check_number("data.stream.v1_fraction", values["v1_fraction"], 0.0, 1.0)
    size, aspect = values["size"], values["aspect"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)
            and 16 <= size[0] <= size[1]):
        raise ValueError(f"data.stream.size must be [low, high] in-plane voxel counts, 16 <= low <= high, got {size!r}")
    if not (isinstance(aspect, (list, tuple)) and len(aspect) == 2 and 0 < aspect[0] <= aspect[1] <= 1):
        raise ValueError(f"data.stream.aspect must be [low, high] with 0 < low <= high <= 1, got {aspect!r}")
    return json.loads(json.dumps(values))


# ============================================================================ label maps

def parse_label_map(spec) -> dict | None:
    """Label map from a preset name, a ``"src:dst,…"`` string or a mapping; ``None`` stays ``None``.

    Returns
    -------
    dict of int to int, or None
        Source label value → SCONet label (0–4). Values not in the map become background.

    Raises
    ------
    ValueError
        Unknown preset, malformed entry, negative source or a target outside 0–4 (the message says which).
    """
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, str):
        if spec.lower() in LABEL_MAP_PRESETS:
            return dict(LABEL_MAP_PRESETS[spec.lower()])
        items = []
        for entry in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", entry)
            if match is None:
                raise ValueError(f"label map {spec!r}: entry {entry!r} is not 'source:target'; use e.g. "
                                 f"'1:1,2:2,3:2' or a preset {sorted(LABEL_MAP_PRESETS)}")
            items.append((int(match.group(1)), int(match.group(2))))
    else:
        raise TypeError(f"label_map must be a preset name, a 'src:dst,...' string or a mapping, got {spec!r}")
    mapping = {}
    for source, target in items:
        if isinstance(source, bool) or not isinstance(source, (int, np.integer)) or source < 0:
            raise ValueError(f"label map source values must be integers >= 0, got {source!r}")
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < NUM_CLASSES:
            raise ValueError(f"label map target of {source} must be an integer in 0..{NUM_CLASSES - 1}, "
                             f"got {target!r}")
        if source in mapping and mapping[source] != target:
            raise ValueError(f"label map gives source value {source} two targets ({mapping[source]}, {target})")
        mapping[int(source)] = int(target)
    return mapping


def apply_label_map(labels: np.ndarray, mapping: dict | None) -> np.ndarray:
    """SCONet labels (uint8, same shape) of a label array.

    Parameters
    ----------
    labels : array of integers (any shape; float arrays must hold whole numbers)
    mapping : dict from :func:`parse_label_map`, or None to keep 0–4 as they are.

    Raises
    ------
    ValueError
        Negative or fractional values, or (``mapping=None``) a value above 4 — pass a label map then.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ValueError("label values must be whole numbers; is this an intensity image rather than labels?")
        labels = labels.astype(np.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"label values must be >= 0, found {low}")
    if mapping is None:
        if high >= NUM_CLASSES:
            raise ValueError(f"label value {high} is outside SCONet's 0..{NUM_CLASSES - 1}; give a label map (a "
                             f"preset {sorted(LABEL_MAP_PRESETS)} or 'src:dst,...')")
        return labels.astype(np.uint8)
    table = np.zeros(max(high, max(mapping, default=0)) + 1, dtype=np.uint8)
    for source, target in mapping.items():
        table[source] = target
    return table[labels]


# ============================================================================ datasets and splits

@dataclass(frozen=True)
class Case:
    """One image/label pair.

    Attributes
    ----------
    case_id : str
        Identifier (``Case_00001``), unique in its dataset.
    image, label : Path
        CT volume and label map files.
    """

    case_id: str
    image: Path
    label: Path


def find_cases(root, layout: str = "abdomenct1k", image_pattern: str | None = None,
               label_pattern: str | None = None) -> tuple[list[Case], list[dict]]:
    """Image/label pairs of a dataset folder.

    Parameters
    ----------
    root : str or Path
        Dataset folder.
    layout : str
        ``"abdomenct1k"`` (``volumes/{id}_0000.nii.gz``, ``segmentations/{id}.nii.gz``; an image stem without
        ``_0000`` such as AbdomenCT-1K's ``Case_00442_0000_2`` pairs with the stem minus its first ``_0000``),
        ``"nnunet"``, or ``"pattern"`` with both patterns given.
    image_pattern, label_pattern : str, optional
        Paths relative to ``root`` with one ``{id}``; override the layout's.

    Returns
    -------
    cases : list of Case, sorted by id
    problems : list of dict
        ``{"case_id", "image", "label", "reason"}`` for images without a label file (they are not in ``cases``).

    Raises
    ------
    FileNotFoundError
        ``root`` does not exist, or no image matches the pattern.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if layout not in LAYOUTS and layout != "pattern":
        raise ValueError(f"layout must be one of {sorted(LAYOUTS) + ['pattern']}, got {layout!r}")
    default_image, default_label = LAYOUTS.get(layout, (None, None))
    image_pattern = image_pattern or default_image
    label_pattern = label_pattern or default_label
    if image_pattern is None or label_pattern is None:
        raise ValueError("layout 'pattern' needs image_pattern and label_pattern")
    images = {}
    if layout == "abdomenct1k" and image_pattern == default_image:
        # AbdomenCT-1K: the id is the image stem minus its "_0000" channel tag (Case_00442_0000_2 → Case_00442_2)
        for path in sorted((root / "volumes").glob("*.nii.gz")):
            stem = image_stem(path.name)
            case_id = re.sub(r"_0000(?=_|$)", "", stem, count=1)
            if case_id != stem:
                images[case_id] = path
    else:
        prefix, suffix = image_pattern.split("{id}")
        id_regex = re.compile(re.escape(prefix) + r"([^/]+?)" + re.escape(suffix) + r"$")
        for path in sorted(root.glob(image_pattern.replace("{id}", "*"))):
            match = id_regex.match(path.relative_to(root).as_posix())
            if match:
                images[match.group(1)] = path
    if not images:
        raise FileNotFoundError(f"no image matches {image_pattern!r} under {root}")
    cases, problems = [], []
    for case_id in sorted(images):
        label = root / label_pattern.replace("{id}", case_id)
        if label.is_file():
            cases.append(Case(case_id, images[case_id], label))
        else:
            problems.append({"case_id": case_id, "image": str(images[case_id]), "label": str(label),
                             "reason": "no label file"})
            logger.warning("case %s has no label file %s; skipped", case_id, label)
    return cases, problems


def split_cases(cases: Sequence[Case], root=None, seed: int = 0,
                fractions=DEFAULT_SPLIT_FRACTIONS) -> dict[str, list[Case]]:
    """Train / val / test split of ``cases``.

    If ``root`` holds any of ``train.lst``, ``val.lst``, ``test.lst`` (one entry per line, as AbdomenCT-1K and
    SCONet ship them: image stems such as ``Case_00191_0000``, case ids such as ``Case_00191``, or file names
    with extension; blank lines and ``#`` comments ignored), those lists define the splits (a missing file
    means an empty split). Otherwise the cases are shuffled with ``seed`` and cut by ``fractions`` (test and val
    rounded to the nearest case, halves up, at least one val case when there are 3 cases or more, the rest train).

    Raises
    ------
    ValueError
        A list names a case that does not exist (all such entries are listed), or a case is in two lists.
    """
    by_name = {}
    for case in cases:
        for name in {case.case_id, image_stem(case.image.name)}:
            by_name[name] = case
    lists = {split: Path(root) / f"{split}.lst" for split in SPLITS} if root is not None else {}
    if any(path.is_file() for path in lists.values()):
        splits, unknown, seen = {}, [], {}
        for split, path in lists.items():
            splits[split] = []
            if not path.is_file():
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                entry = image_stem(line.split("#", 1)[0].strip())
                if not entry:
                    continue
                case = by_name.get(entry)
                if case is None:
                    unknown.append(f"{path.name}: {entry}")
                    continue
                if case.case_id in seen and seen[case.case_id] != split:
                    raise ValueError(f"case {case.case_id} is in both {seen[case.case_id]}.lst and {split}.lst")
                if case.case_id not in seen:
                    seen[case.case_id] = split
                    splits[split].append(case)
        if unknown:
            raise ValueError(f"split lists in {root} name {len(unknown)} case(s) with no image/label pair: "
                             f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        logger.info("split from list files: %s", {k: len(v) for k, v in splits.items()})
        return splits
    ordered = sorted(cases, key=lambda c: c.case_id)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n = len(ordered)
    n_test = int(np.floor(fractions[2] * n + 0.5))
    n_val = int(np.floor(fractions[1] * n + 0.5))
    if n >= 3 and fractions[1] > 0:
        n_val = max(1, n_val)
    n_test = min(n_test, max(0, n - n_val - 1))
    shuffled = [ordered[i] for i in order]
    splits = {"val": shuffled[:n_val], "test": shuffled[n_val:n_val + n_test], "train": shuffled[n_val + n_test:]}
    logger.info("seeded split (seed %d): %s", seed, {k: len(v) for k, v in splits.items()})
    return {split: sorted(splits[split], key=lambda c: c.case_id) for split in SPLITS}


def phantom_dataset(cache_dir, section: Mapping, progress: ProgressCallback | None = None) -> Path:
    """Folder of synthetic phantoms in AbdomenCT-1K layout with split lists, generated once into the cache.

    Parameters
    ----------
    cache_dir : str or Path
        The dataset goes to ``cache_dir/phantoms/<key>``, ``key`` a hash of ``section`` and the library version.
    section : mapping
        ``n_train``, ``n_val``, ``n_test``, ``seed`` and :func:`SCONetLib.phantom.make_phantom` keyword arguments.
        Cases ``Case_00001`` … are ``make_phantom(seed + k - 1)``; the first ``n_train`` go to ``train.lst``,
        the next ``n_val`` to ``val.lst`` and the last ``n_test`` to ``test.lst`` (so test phantoms are never
        trained on).

    Returns
    -------
    Path of the dataset folder (complete: it is generated in a temporary folder and renamed).
    """
    from .phantom import write_dataset

    _check_phantom_section(section, streamed=True)  # n_train may be 0 here; DataConfig checks it
    section = json.loads(json.dumps(dict(section)))
    key = _hash({"phantoms": section, "version": __version__})[:16]
    final = Path(cache_dir) / "phantoms" / key
    if (final / "phantoms.json").is_file():
        logger.info("phantom dataset %s already generated", final)
        return final
    counts = [section[f"n_{split}"] for split in SPLITS]
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items() if k not in _PHANTOM_SPLIT_KEYS}
    tmp = final.parent / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        description = write_dataset(tmp, sum(counts), section["seed"], progress=progress, **kwargs)
        ids = [case["id"] for case in description["cases"]]
        start = 0
        for split, count in zip(SPLITS, counts):
            (tmp / f"{split}.lst").write_text("".join(f"{i}\n" for i in ids[start:start + count]), encoding="utf-8")
            start += count
        (tmp / "phantoms.json").write_text(json.dumps({"section": section, "key": key}, indent=2) + "\n",
                                           encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "phantoms.json").is_file():
                raise
            logger.info("phantom dataset %s was generated concurrently; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("generated %d phantoms into %s", sum(counts), final)
    return final


def dataset_splits(config: DataConfig, cache_dir, progress: ProgressCallback | None = None
                   ) -> tuple[dict[str, list[Case]], dict]:
    """Cases per split for a :class:`DataConfig`, and a JSON description of the data (root, counts, problems).

    Phantoms are generated into ``cache_dir`` first if needed.
    """
    if config.source == "phantom":
        root = phantom_dataset(cache_dir, config.phantom, progress)
        layout, patterns = "abdomenct1k", (None, None)
    elif config.source == "abdomenct1k":
        root, layout, patterns = Path(config.root), "abdomenct1k", (None, None)
    else:
        root, layout, patterns = Path(config.root), "pattern", (config.image_pattern, config.label_pattern)
    cases, problems = find_cases(root, layout, *patterns)
    splits = split_cases(cases, root, config.split_seed, config.split_fractions)
    description = {"source": config.source, "root": str(Path(root).resolve()), "label_map": config.label_map,
                   "cases": {split: [c.case_id for c in splits[split]] for split in SPLITS},
                   "counts": {split: len(splits[split]) for split in SPLITS}, "problems": problems}
    if config.source == "phantom":
        description["phantom"] = dict(config.phantom)
    return splits, description


# ============================================================================ preprocessing cache

@dataclass(frozen=True)
class CacheEntry:
    """A preprocessed case in the cache.

    Attributes
    ----------
    case_id : str
    folder : Path
        Holds ``points.npz`` (:class:`SCONetLib.points.PointCloud`), ``labels.npz`` (``labels`` (K, J, I) uint8
        SCONet labels on the label file's grid, its ``grid_*`` geometry and the image's ``image_grid_*``
        geometry, LPS) and ``case.json`` (sources, point count, label voxel counts).
    """

    case_id: str
    folder: Path


@dataclass
class PreparedCases:
    """Result of :func:`prepare_cases`: the usable entries (input order) and the skipped cases with reasons."""

    entries: list
    skipped: list
    computed: int = 0

    def write_skipped(self, path) -> Path:
        """Write the skipped cases as JSON (``[{"case_id", "image", "label", "reason"}]``), atomically."""
        return write_json(self.skipped, path)


def prepare_cases(cases: Sequence[Case], cache_dir, label_map=None, workers: int = 1,
                  progress: ProgressCallback | None = None) -> PreparedCases:
    """Preprocess ``cases`` into the cache (reusing entries already there) and list the usable ones.

    Parameters
    ----------
    cases : sequence of Case
    cache_dir : str or Path
        Entries go to ``cache_dir/cases/<case_id>-<key>``, ``key`` a hash of :data:`CACHE_VERSION`, the library
        version, the point stage's source code, ``label_map`` and both source files' resolved path, size and
        modification time — changing any of them makes a new entry.
    label_map : preset name, ``"src:dst,…"`` string, mapping or None
        See :func:`parse_label_map`.
    workers : int
        Worker processes (1: in this process). Each worker uses one SimpleITK thread.
    progress : callable(fraction, message), optional
        May raise :class:`SCONetLib.progress.Cancelled`; pending cases are then abandoned (finished entries stay
        in the cache, unfinished ones leave nothing behind).

    Returns
    -------
    PreparedCases
        ``entries`` for the cases that worked, ``skipped`` for the others (unreadable file, size mismatch between
        image and labels, no edges …; each logged as a warning), ``computed`` the number of entries built now.
    """
    mapping = parse_label_map(label_map)
    cache_dir = Path(cache_dir)
    (cache_dir / "cases").mkdir(parents=True, exist_ok=True)
    entries, skipped, todo = {}, [], []
    for case in cases:
        try:
            folder = cache_dir / "cases" / f"{_safe_name(case.case_id)}-{_case_key(case, mapping)[:16]}"
        except OSError as error:
            skipped.append(_skip_record(case, f"cannot read the files: {error}"))
            continue
        if (folder / "case.json").is_file():
            entries[case.case_id] = CacheEntry(case.case_id, folder)
        else:
            todo.append((case, folder))
    logger.info("preprocessing: %d cached, %d to compute, %d unreadable", len(entries), len(todo), len(skipped))
    done = computed = 0
    report(progress, 0.0, f"preprocessing {len(todo)} case(s)")
    for case, folder, error in _run_preprocessing(todo, mapping, workers):
        done += 1
        if error is None:
            entries[case.case_id] = CacheEntry(case.case_id, folder)
            computed += 1
            logger.info("preprocessed %d/%d: %s", done, len(todo), case.case_id)
        else:
            skipped.append(_skip_record(case, error))
            logger.warning("skipping case %s: %s", case.case_id, error)
        report(progress, done / max(1, len(todo)), f"preprocessed {done}/{len(todo)} ({case.case_id})")
    ordered = [entries[c.case_id] for c in cases if c.case_id in entries]
    return PreparedCases(ordered, skipped, computed=computed)


def _run_preprocessing(todo, mapping, workers):
    """Yield ``(case, folder, error or None)`` as cases finish, in a process pool when ``workers > 1``."""
    if workers <= 1 or len(todo) <= 1:
        for case, folder in todo:
            yield case, folder, _preprocess_case(case, folder, mapping)
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        futures = {pool.submit(_preprocess_case, case, folder, mapping): (case, folder) for case, folder in todo}
        try:
            for future in concurrent.futures.as_completed(futures):
                case, folder = futures[future]
                try:
                    error = future.result()
                except Exception as crash:  # e.g. a worker killed by the OOM killer
                    error = f"worker failed: {type(crash).__name__}: {crash}"
                yield case, folder, error
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _init_worker() -> None:
    """One SimpleITK and one torch thread per worker process (the pool supplies the parallelism).

    The pool forks; the parent's OpenMP thread pool (used by torch's CPU operations) does not survive a fork, and
    a forked child that enters an OpenMP parallel region can hang. One torch thread keeps the child out of them.
    """
    import torch

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    torch.set_num_threads(1)


def _preprocess_case(case: Case, folder: Path, mapping: dict | None) -> str | None:
    """Build the cache entry of one case; return ``None`` on success or the reason it failed."""
    from . import io as sconet_io
    from .points import extract_point_cloud

    start = time.perf_counter()
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        image = sconet_io.read_image(case.image)
        label_image = sconet_io.read_image(case.label)
        if image.GetSize() != label_image.GetSize():
            return f"image size {image.GetSize()} differs from label size {label_image.GetSize()}"
        image_grid, label_grid = Grid.of(image), Grid.of(label_image)
        shift = np.abs(np.asarray(image_grid.origin) - np.asarray(label_grid.origin))
        if np.any(shift > 0.5 * np.asarray(image_grid.spacing)) or \
                not np.allclose(image_grid.spacing, label_grid.spacing, rtol=1e-3):
            logger.warning("case %s: label grid (origin %s, spacing %s) differs from the image grid (origin %s, "
                           "spacing %s); queries use the label grid", case.case_id, label_grid.origin,
                           label_grid.spacing, image_grid.origin, image_grid.spacing)
        labels = apply_label_map(sitk.GetArrayViewFromImage(label_image), mapping)
        cloud = extract_point_cloud(image, n_points=None)
        tmp.mkdir(parents=True)
        cloud.save(tmp / "points.npz")
        np.savez_compressed(tmp / "labels.npz", labels=labels, **_grid_arrays("grid", label_grid),
                            **_grid_arrays("image_grid", image_grid))
        counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
        write_json({
            "case_id": case.case_id, "image": str(case.image), "label": str(case.label),
            "n_points": int(len(cloud.xyz_lps)), "label_voxels": [int(c) for c in counts],
            "size": list(image_grid.size), "spacing": list(image_grid.spacing),
            "seconds": round(time.perf_counter() - start, 2), "cache_version": CACHE_VERSION}, tmp / "case.json")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "case.json").is_file():
                raise
        return None
    except (OSError, ValueError, TypeError, RuntimeError, MemoryError) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _grid_arrays(prefix: str, grid: Grid) -> dict:
    return {f"{prefix}_size": np.asarray(grid.size, np.int64), f"{prefix}_spacing": np.asarray(grid.spacing),
            f"{prefix}_origin": np.asarray(grid.origin), f"{prefix}_direction": np.asarray(grid.direction)}


def _grid_from_arrays(data, prefix: str) -> Grid:
    return Grid(tuple(int(v) for v in data[f"{prefix}_size"]), tuple(float(v) for v in data[f"{prefix}_spacing"]),
                tuple(float(v) for v in data[f"{prefix}_origin"]),
                tuple(float(v) for v in data[f"{prefix}_direction"]))


def _case_key(case: Case, mapping: dict | None) -> str:
    """Hash of everything the cached arrays depend on (raises OSError if a source file is missing)."""
    sources = []
    for path in (case.image, case.label):
        resolved = Path(path).resolve()
        stat = resolved.stat()
        sources.append([str(resolved), stat.st_size, stat.st_mtime_ns])
    return _hash({"cache_version": CACHE_VERSION, "library": __version__, "points": _points_fingerprint(),
                  "label_map": sorted(mapping.items()) if mapping is not None else None, "sources": sources})


_POINTS_FINGERPRINT: str | None = None


def _points_fingerprint() -> str:
    """Digest of the point stage's source files, so a change of the extraction invalidates cached clouds."""
    global _POINTS_FINGERPRINT
    if _POINTS_FINGERPRINT is None:
        folder = Path(__file__).resolve().parent / "points"
        hasher = hashlib.sha256()
        for path in sorted(folder.glob("*.py")):
            hasher.update(path.name.encode())
            hasher.update(path.read_bytes())
        _POINTS_FINGERPRINT = hasher.hexdigest()
    return _POINTS_FINGERPRINT


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", case_id)


def _skip_record(case: Case, reason: str) -> dict:
    return {"case_id": case.case_id, "image": str(case.image), "label": str(case.label), "reason": reason}


# ============================================================================ samples

@dataclass
class CaseData:
    """Arrays of one prepared case, in memory.

    Attributes
    ----------
    case_id : str
    cloud : PointCloud
        All edge points (``xyz_lps`` (N, 3) float64 LPS mm, int8 SURF).
    labels : (K, J, I) uint8
        SCONet labels on ``label_grid``.
    label_grid : Grid
        Geometry of ``labels`` (LPS).
    frame : ObjectFrame
        Object frame of the image grid (shared by points and queries).
    """

    case_id: str
    cloud: object
    labels: np.ndarray
    label_grid: Grid
    frame: ObjectFrame
    _organ_boxes: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, entry: CacheEntry, scale_mm: float) -> "CaseData":
        """Read a cache entry; ``scale_mm`` is the model's object-frame scale."""
        from .points import PointCloud

        cloud = PointCloud.load(entry.folder / "points.npz")
        with np.load(entry.folder / "labels.npz", allow_pickle=False) as data:
            labels = data["labels"]
            label_grid = _grid_from_arrays(data, "grid")
            image_grid = _grid_from_arrays(data, "image_grid")
        return cls(entry.case_id, cloud, labels, label_grid, ObjectFrame.of(image_grid, scale_mm))

    @property
    def nbytes(self) -> int:
        return int(self.labels.nbytes + self.cloud.xyz_lps.nbytes + self.cloud.surf_int8.nbytes)

    def organ_box(self, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) KJI index bounds (high exclusive) of all organ voxels grown by ``margin_mm`` (computed
        once per margin); the whole array if the case has no organ voxel."""
        if margin_mm not in self._organ_boxes:
            shape = np.asarray(self.labels.shape)
            low, high = np.zeros(3, int), shape
            organ = self.labels > 0
            if organ.any():
                present = [np.flatnonzero(organ.any(axis=tuple(a for a in range(3) if a != axis)))
                           for axis in range(3)]
                margin = np.ceil(margin_mm / np.asarray(self.label_grid.spacing[::-1])).astype(int)
                low = np.maximum(0, np.array([p[0] for p in present]) - margin)
                high = np.minimum(shape, np.array([p[-1] + 1 for p in present]) + margin)
            self._organ_boxes[margin_mm] = (low, high)
        return self._organ_boxes[margin_mm]


class CaseStore:
    """Loads prepared cases on demand and keeps the most recently used ones in memory (up to ``max_mb``)."""

    def __init__(self, entries: Sequence[CacheEntry], scale_mm: float, max_mb: int = 2048):
        self.entries = list(entries)
        self.scale_mm = scale_mm
        self.max_bytes = int(max_mb) * 2 ** 20
        self._cache: OrderedDict[int, CaseData] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> CaseData:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        case = CaseData.load(self.entries[index], self.scale_mm)
        self._cache[index] = case
        while len(self._cache) > 1 and sum(c.nbytes for c in self._cache.values()) > self.max_bytes:
            self._cache.popitem(last=False)
        return case


def sample_input_points(case: CaseData, n_points: int, rng: np.random.Generator) -> np.ndarray:
    """(n_points, 51) float32 model input: points drawn uniformly **with replacement** (reference §1.6).

    Columns 0–2 are object-frame coordinates, 3–50 the de-quantised SURF values.
    """
    from .points import PointCloud

    cloud = case.cloud
    index = rng.integers(0, len(cloud.xyz_lps), size=n_points)
    drawn = PointCloud(cloud.xyz_lps[index], cloud.surf_int8[index], cloud.surf_scale)
    return drawn.model_input(case.frame)


def sample_queries(case: CaseData, n_queries: int, rng: np.random.Generator, organ_fraction: float = 0.0,
                   margin_mm: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Query voxels and their labels.

    Parameters
    ----------
    case : CaseData
    n_queries : int
    rng : numpy Generator
    organ_fraction : float in [0, 1]
        Share of the queries drawn uniformly inside the box bounding all organ voxels, grown by ``margin_mm``
        (an option, not in the reference); the rest — all of them by default, as in the reference (§3) — are
        drawn uniformly over every voxel. Both draws are with replacement.
    margin_mm : float
        Growth of the organ box, mm.

    Returns
    -------
    queries : (n_queries, 3) float32
        Voxel centres in the object frame.
    targets : (n_queries,) int64
        Their labels.
    """
    shape = case.labels.shape
    n_box = int(round(organ_fraction * n_queries))
    flat = rng.integers(0, case.labels.size, size=n_queries - n_box)
    if n_box:
        low, high = case.organ_box(margin_mm)
        kji = np.stack([rng.integers(lo, hi, size=n_box) for lo, hi in zip(low, high)], axis=1)
        flat = np.concatenate([flat, np.ravel_multi_index(kji.T, shape)])
    k, j, i = np.unravel_index(flat, shape)
    xyz_lps = case.label_grid.index_to_lps(np.stack([i, j, k], axis=1))
    return case.frame.lps_to_object(xyz_lps), case.labels.reshape(-1)[flat].astype(np.int64)


def random_linear_transform(rng: np.random.Generator, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The reference's augmentation: ``M = I + N(0, σ²)`` (3×3, every entry) and ``t ~ N(0, σ²)`` (3,).

    Applied as ``p @ M + t`` to object-frame coordinates (σ in object units; 0.1 = 40 mm at scale 400).
    """
    matrix = np.eye(3) + rng.normal(0.0, sigma, size=(3, 3))
    shift = rng.normal(0.0, sigma, size=3)
    return matrix.astype(np.float32), shift.astype(np.float32)


def sample_training_example(case: CaseData, n_points: int, n_queries: int, rng: np.random.Generator,
                            augment_sigma: float = 0.1, organ_fraction: float = 0.0
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training example (reference §1.6 and §3).

    Returns
    -------
    points : (n_points, 51) float32
        Input points (object frame + SURF), augmented.
    queries : (n_queries, 3) float32
        Query voxel centres (object frame), with the same augmentation.
    targets : (n_queries,) int64
        Labels of the queries.

    Notes
    -----
    The random linear transform (:func:`random_linear_transform`, skipped when ``augment_sigma`` is 0) moves the
    point coordinates and the queries together; the SURF values are not transformed.
    """
    points = sample_input_points(case, n_points, rng)
    queries, targets = sample_queries(case, n_queries, rng, organ_fraction)
    if augment_sigma > 0:
        matrix, shift = random_linear_transform(rng, augment_sigma)
        points[:, :3] = points[:, :3] @ matrix + shift
        queries = queries @ matrix + shift
    return points, queries.astype(np.float32), targets


# ============================================================================ phantom stream

class PhantomStream:
    """Training cases generated on the fly: an unlimited, seeded stream of distinct phantoms.

    Phantom ``k`` of the stream is ``make_phantom(seed + k, version=v, size=(nx, ny, None),
    max_slices=max_slices)`` with ``nx`` drawn in ``size`` and ``ny = round(nx · a)``, ``a`` drawn in ``aspect``,
    and ``v`` = 1 with probability ``v1_fraction``, else ``version`` (all from
    ``numpy.random.default_rng([seed, k])``), followed by its point cloud (``surf_points`` edge points with
    SURF, drawn with replacement). Epoch ``e`` uses phantoms ``e · per_epoch`` … ``(e + 1) · per_epoch - 1``,
    each ``reuse`` times (``len(stream) = per_epoch · reuse`` steps; index ``i`` is phantom ``i mod per_epoch``
    of the epoch), so the data of every step depends only on the seeds: a resumed run sees the same phantoms.

    Worker processes build the current and the next epoch's phantoms while training consumes them
    (:meth:`set_epoch`, as ``torch.utils.data.DistributedSampler``); :attr:`throughput` reports phantoms/s.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, section: Mapping, scale_mm: float, workers: int = 1):
        self.section = _check_stream_section(section)
        self.scale_mm = float(scale_mm)
        self.workers = int(workers)
        self.epoch = None
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._ready: dict[int, CaseData] = {}
        self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=self.workers, initializer=_init_worker)
        self._started = time.perf_counter()
        self.generated = 0
        self.worker_seconds = 0.0

    def __len__(self) -> int:
        return self.section["per_epoch"] * self.section["reuse"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stop the workers (pending phantoms are abandoned)."""
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def phantom_index(self, epoch: int, index: int) -> int:
        """Stream index of the phantom used at position ``index`` of epoch ``epoch``."""
        return epoch * self.section["per_epoch"] + index % self.section["per_epoch"]

    def set_epoch(self, epoch: int) -> None:
        """Make epoch ``epoch`` current: drop older phantoms, queue this epoch's and the next one's."""
        self.epoch = int(epoch)
        per = self.section["per_epoch"]
        keep = range(epoch * per, (epoch + 2) * per)
        for k in [k for k in self._ready if k not in keep]:
            del self._ready[k]
        for k in [k for k in self._pending if k not in keep]:
            self._pending.pop(k).cancel()
        for k in keep:
            if k not in self._ready and k not in self._pending:
                self._pending[k] = self._pool.submit(_stream_phantom, self.section, k)

    def __getitem__(self, index: int) -> CaseData:
        if self.epoch is None:
            raise RuntimeError("call set_epoch(epoch) before reading a PhantomStream")
        k = self.phantom_index(self.epoch, index)
        if k not in self._ready:  # set_epoch queued every phantom of the epoch
            wait = time.perf_counter()
            cloud, labels, label_grid, seconds = self._pending.pop(k).result()
            waited = time.perf_counter() - wait
            if waited > 1.0:
                logger.info("waited %.1f s for stream phantom %d (generation is slower than training)", waited, k)
            self.generated += 1
            self.worker_seconds += seconds
            self._ready[k] = CaseData(f"stream_{k:07d}", cloud, labels, label_grid,
                                      ObjectFrame.of(label_grid, self.scale_mm))
        return self._ready[k]

    @property
    def throughput(self) -> dict:
        """Phantoms generated so far, per wall-clock second since start and per worker-second."""
        wall = time.perf_counter() - self._started
        return {"phantoms": self.generated, "phantoms_per_s": round(self.generated / max(wall, 1e-9), 4),
                "seconds_per_phantom_per_worker": round(self.worker_seconds / max(1, self.generated), 2),
                "workers": self.workers}

    def describe(self, epochs_done: int) -> dict:
        """Record of the stream for a checkpoint: settings, generator version and phantoms seen."""
        per = self.section["per_epoch"]
        return {"generator": "SCONetLib.phantom.make_phantom", **self.section,
                "phantoms_seen": epochs_done * per,
                "seed_range": [self.section["seed"], self.section["seed"] + max(0, epochs_done * per - 1)]}


def stream_phantom_draw(section: Mapping, k: int) -> tuple:
    """(size, seed, version) of phantom ``k`` of a stream: ``size = (nx, ny, None)``."""
    rng = np.random.default_rng([section["seed"], k])
    nx = int(rng.integers(section["size"][0], section["size"][1] + 1))
    ny = max(16, int(round(nx * rng.uniform(*section["aspect"]))))
    version = 1 if rng.random() < section["v1_fraction"] else section["version"]
    return (nx, ny, None), section["seed"] + k, version


def _stream_phantom(section: Mapping, k: int):
    """Worker: phantom ``k`` of the stream and its point cloud → (cloud, labels (K, J, I) uint8, grid, seconds)."""
    from .phantom import make_phantom
    from .points import extract_point_cloud

    start = time.perf_counter()
    size, seed, version = stream_phantom_draw(section, k)
    ct, labels = make_phantom(seed, size=size, version=version, max_slices=section["max_slices"],
                              random_orientation=section["random_orientation"])
    cloud = extract_point_cloud(ct, n_points=section["surf_points"], seed=seed)
    return cloud, sitk.GetArrayFromImage(labels), Grid.of(labels), time.perf_counter() - start
