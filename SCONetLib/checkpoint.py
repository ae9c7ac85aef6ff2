"""SCONet checkpoints: weights saved together with their configuration, metadata and optional training state.

A checkpoint is one file written by ``torch.save`` and read back with ``torch.load(..., weights_only=True)``, so
loading never runs code from the file: only tensors and plain Python data (dict, list, tuple, str, int, float,
bool, None) are accepted. The stored dict is::

    {
        "format": "sconet-checkpoint",
        "format_version": 1,
        "config": ModelConfig.to_dict(),
        "state_dict": {name: tensor},          # reference parameter names
        "metadata": {...},                     # JSON-compatible, see save_checkpoint
        "training_state": {...} or None,       # optimizer state, epoch, RNG states (plain types only)
        "sha256": "<hex>",                     # digest of the four entries above
    }

``torch.load`` does not verify the archive's CRCs, so the SHA-256 digest is what detects damaged contents.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .io import atomic_output
from .labels import CLASS_NAMES, NUM_CLASSES
from .model import SCONet, ModelConfig, build_model, load_reference_state_dict
from .model.encoder import UNIT_CUBE_EPS, UNIT_CUBE_MAX

logger = logging.getLogger(__name__)

#: Value of the ``format`` entry identifying a SCONet checkpoint.
FORMAT = "sconet-checkpoint"
#: Newest format version this code reads and the one it writes.
FORMAT_VERSION = 1
#: File name of the bundled default model (preset "A" trained on domain-randomised synthetic phantoms).
DEFAULT_WEIGHTS_NAME = "sconet_synth_A.pt"
#: Second byte of a pickle (after the PROTO opcode 0x80): protocols 2 to 5, torch.save's legacy format among them.
_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")
#: First bytes of a zip archive (a local file header), what torch.save writes by default.
_ZIP_MAGIC = b"PK\x03\x04"
#: Entries covered by the ``sha256`` digest, in digest order.
_DIGESTED = ("format", "format_version", "config", "state_dict", "metadata", "training_state")


class CheckpointError(Exception):
    """A file cannot be used as a SCONet checkpoint; the message names the file and the reason."""


def save_checkpoint(path, model: SCONet, metadata: dict | None = None, training_state: dict | None = None) -> Path:
    """Write ``model`` (weights + config) with its metadata to ``path`` atomically.

    The file is written to a temporary file in the same folder, flushed to disk and renamed over ``path``, so
    ``path`` is either the old file or the complete new one, never a partial write.

    Parameters
    ----------
    path : str or Path
        Destination (conventionally ``*.pt``); its folder is created if needed.
    model : SCONet
        The network; its weights are stored on the CPU.
    metadata : dict, optional
        JSON-serialisable description of the model. Recommended keys: ``"points"`` (point-cloud settings used
        in training: points per cloud, SURF int8 scheme, Canny settings), ``"training_data"``,
        ``"training_command"``, ``"evaluation"`` (per-organ results). Added automatically:
        ``"classes"`` (label value and name of each output class, from :mod:`SCONetLib.labels`, unless given
        here), and, always overwritten, ``"normalisation"`` (scale_mm, padding and the unit-cube rule, taken from
        the model's config), ``"library_version"``, ``"torch_version"`` and ``"saved_utc"``.
    training_state : dict, optional
        State needed to resume training, e.g. ``{"optimizer": opt.state_dict(), "epoch": 12,
        "rng": capture_rng_state()}``. Only tensors and plain Python data are allowed (no numpy arrays).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    TypeError
        If ``model`` is not a SCONet, ``metadata`` is not JSON-serialisable or ``training_state`` holds a
        disallowed object (the message gives its location).
    """
    if not isinstance(model, SCONet):
        raise TypeError(f"model must be a SCONet, got {type(model).__name__}")
    if training_state is not None:
        if not isinstance(training_state, dict):
            raise TypeError(f"training_state must be a dict or None, got {type(training_state).__name__}")
        _check_plain(training_state, "training_state")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "metadata": _complete_metadata(model.config, metadata),
        "training_state": training_state,
    }
    payload["sha256"] = _digest(payload)
    path = Path(path)
    with atomic_output(path, durable=True) as tmp, open(tmp, "wb") as file:
        torch.save(payload, file)
    logger.info("saved SCONet checkpoint %s", path)
    return path


def load_checkpoint(path, device="cpu") -> tuple[SCONet, dict]:
    """Rebuild the model stored in a checkpoint.

    Parameters
    ----------
    path : str or Path
        A file written by :func:`save_checkpoint`.
    device : str or torch.device
        Where to put the model ("cpu", "cuda", "cuda:1" …).

    Returns
    -------
    model : SCONet
        In eval mode, on ``device``.
    metadata : dict
        The stored metadata.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is truncated or damaged, is not a SCONet checkpoint, was written by a newer format version,
        holds Python objects other than tensors and plain data (refused without running them), or its weights
        do not match its config.
    """
    model, metadata, _ = load_training_checkpoint(path, device)
    return model, metadata


def load_training_checkpoint(path, device="cpu") -> tuple[SCONet, dict, dict | None]:
    """:func:`load_checkpoint` plus the stored training state (``None`` if there is none).

    Tensors in the training state stay on the CPU (``torch.set_rng_state`` needs CPU tensors and
    ``Optimizer.load_state_dict`` moves its state to the parameters' device itself).
    """
    path = Path(path)
    payload = _read(path)
    try:
        config = ModelConfig.from_dict(payload["config"])
        model = build_model(config)
        load_reference_state_dict(model, payload["state_dict"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: stored weights and config do not form a valid SCONet: {error}") from error
    logger.info("loaded SCONet checkpoint %s (grid %d³, %d classes)", path, config.grid_resolution,
                config.num_classes)
    return model.to(device).eval(), payload["metadata"], payload["training_state"]


def default_weights_path(must_exist: bool = True) -> Path:
    """Path of the bundled default model, ``SCONetLib/weights/sconet_synth_A.pt``.

    Raises
    ------
    FileNotFoundError
        If ``must_exist`` and the file is not there (e.g. a source checkout where it was not trained yet).
    """
    path = Path(__file__).resolve().parent / "weights" / DEFAULT_WEIGHTS_NAME
    if must_exist and not path.is_file():
        raise FileNotFoundError(
            f"the default SCONet weights are missing: {path}. Reinstall SCONet, retrain them with "
            f"`python -m SCONetLib.train --config SCONetLib/configs/phantom_A.yaml --out RUN_DIR` and copy "
            f"RUN_DIR/model_best.pt there, or pass the path of another SCONet checkpoint explicitly")
    return path


def capture_rng_state() -> dict:
    """Random-number-generator states of torch (CPU and CUDA), numpy's global generator and ``random``.

    The result holds only tensors and plain data, so it can go into ``training_state``; restore it with
    :func:`restore_rng_state`.
    """
    _, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore generator states captured by :func:`capture_rng_state` (CUDA states only if CUDA is available)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _read(path: Path) -> dict:
    """Load and validate the raw checkpoint dict (format, version, entries, digest); no model is built."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass the .pt file itself"
                              + (f" (this folder holds {', '.join(inside)})" if inside else ""))
    if not path.is_file():
        raise FileNotFoundError(f"SCONet checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is truncated or corrupt: the file is empty (0 bytes)")
    with open(path, "rb") as file:
        head = file.read(4)
    if not head.startswith(_ZIP_MAGIC) and not (head[:1] == b"\x80" and head[1:2] in _PICKLE_PROTOCOLS):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: it is neither a zip archive (what torch.save "
                              f"writes) nor a pickle, so it is corrupt or another kind of file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise CheckpointError(
                f"{path} contains Python objects other than tensors and plain data; it was refused without "
                f"running anything (it is not a SCONet checkpoint and may be unsafe)") from error
        raise CheckpointError(f"{path} is corrupt and cannot be read: {error}") from error
    except Exception as error:  # torch reports damaged archives with many exception types
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read "
                              f"({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = (" (it looks like a reference SCONet training checkpoint: load its 'model' entry with "
                "SCONetLib.model.load_reference_state_dict)" if isinstance(payload, dict) and "model" in payload
                else "")
        raise CheckpointError(f"{path} is not a SCONet checkpoint: no 'format': {FORMAT!r} entry{hint}")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses checkpoint format version {version}, newer than the version "
                              f"{FORMAT_VERSION} this SCONetLib ({__version__}) reads; update SCONetLib")
    for key, kind in (("config", dict), ("state_dict", dict), ("metadata", dict), ("sha256", str)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path} is damaged: entry {key!r} is missing or not a {kind.__name__}")
    if payload.get("training_state") is not None and not isinstance(payload["training_state"], dict):
        raise CheckpointError(f"{path} is damaged: entry 'training_state' is not a dict")
    if _digest(payload) != payload["sha256"]:
        raise CheckpointError(f"{path} is corrupt: its contents do not match the stored SHA-256 digest "
                              f"(the file was damaged or modified after it was written)")
    return payload


def _complete_metadata(config: ModelConfig, metadata: dict | None) -> dict:
    """User metadata plus the standard entries (see :func:`save_checkpoint`), as JSON-compatible data."""
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    merged = {}
    if config.num_classes == NUM_CLASSES:
        merged["classes"] = [{"label": label, "name": name} for label, name in enumerate(CLASS_NAMES)]
    merged.update(metadata or {})
    merged.update({
        "normalisation": {
            "scale_mm": config.scale_mm,
            "padding": config.padding,
            "unit_cube": f"u = p / (1 + padding + {UNIT_CUBE_EPS}) + 0.5; u >= 1 -> {UNIT_CUBE_MAX}; u < 0 -> 0",
            "object_frame": "p = (xyz_ras - volume_box_centre_ras) / scale_mm",
        },
        "library_version": __version__,
        "torch_version": torch.__version__,
        "saved_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    try:
        return json.loads(json.dumps(merged))
    except (TypeError, ValueError) as error:
        raise TypeError(f"metadata must be JSON-serialisable (dict, list, str, int, float, bool, None): {error}") \
            from error


_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value, where: str) -> None:
    """Raise ``TypeError`` naming the first object that ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(value, (torch.Tensor, *_PLAIN_SCALARS)) and not isinstance(value, np.generic):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, _PLAIN_SCALARS):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}; checkpoints may only hold "
                        f"tensors and plain data (convert numpy arrays with torch.from_numpy, numpy scalars "
                        f"with int()/float())")


def _digest(payload: dict) -> str:
    """SHA-256 hex digest of the entries in ``_DIGESTED`` (tensor bytes, dtypes, shapes and plain values)."""
    hasher = hashlib.sha256()

    def feed(value):
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            hasher.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            hasher.update(f"D{len(value)}".encode())
            for key, item in sorted(value.items(), key=lambda kv: repr(kv[0])):
                hasher.update(repr(key).encode())
                feed(item)
        elif isinstance(value, (list, tuple)):
            hasher.update(f"L{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            hasher.update(f"S{value!r}".encode())

    for key in _DIGESTED:
        hasher.update(key.encode())
        feed(payload.get(key))
    return hasher.hexdigest()
