"""Stand-in for ``slicer.packaging`` (Slicer >= 5.11; ``pip_ensure`` from 5.12): records what would be installed.

As for the real submodule, ``import slicer`` does not load it: a module must ``import slicer.packaging``.
"""
from __future__ import annotations

#: Every ``pip_ensure`` call: (requirement strings, requester).
ensured: list = []


def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
               requester=None, skip_in_testing=True, show_progress=True):
    ensured.append(([str(r) for r in requirements], requester))
