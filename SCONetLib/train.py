"""``python -m SCONetLib.train``: the training command line (see :func:`SCONetLib.cli.train_main`).

Also runs as a plain script, ``python SCONetLib/train.py …``, inside 3D Slicer with
``Slicer --no-main-window --python-script SCONetLib/train.py -- …``, and on several processes or GPUs with
``torchrun --nproc_per_node=N -m SCONetLib.train …``. The training itself is :func:`train` (from
:mod:`SCONetLib.train_loop`) on a :class:`TrainConfig` (from :mod:`SCONetLib.train_config`).
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script (python SCONetLib/train.py, Slicer --python-script): the script's own folder is on sys.path
    # and would shadow top-level modules with SCONetLib's file names (io, data …); make the package importable.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

from SCONetLib.cli import run_as_script, train_main as main  # noqa: E402
from SCONetLib.train_config import TrainConfig  # noqa: E402
from SCONetLib.train_loop import train  # noqa: E402

__all__ = ["TrainConfig", "main", "train"]

if __name__ == "__main__":
    run_as_script(main)
