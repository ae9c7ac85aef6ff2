"""The torch device SCONet runs on, from a user's choice (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``)."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device to run on.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    ValueError
        For any other value, or a CUDA device that is not available.
    """
    name = check_device_name(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = name.partition(":")[2]
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine; "
                         f"use 'cpu' or 'auto'")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s)")
    return torch.device(name)


def check_device_name(device) -> str:
    """The normalised (stripped, lower-case) name of ``device`` if it is one :func:`resolve_device` understands,
    without checking that the device exists (configurations are validated on machines that may lack it).

    Raises ``TypeError`` for a non-string, ``ValueError`` for any name but ``"auto"``, ``"cpu"``, ``"cuda"`` and
    ``"cuda:N"``.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'auto', 'cpu', 'cuda' or 'cuda:0', got "
                        f"{type(device).__name__}")
    name = device.strip().lower()
    kind, _, index = name.partition(":")
    if name not in ("auto", "cpu") and (kind != "cuda" or (index and not index.isdigit())):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return name
