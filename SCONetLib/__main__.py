"""``python -m SCONetLib``: the ``sconet-segment`` command line (see :func:`SCONetLib.cli.segment_main`)."""
import sys

from SCONetLib.cli import segment_main

if __name__ == "__main__":
    sys.exit(segment_main())
