"""`python -m moga.cli ...`, the same as `python -m moga ...`."""
import sys

from .entry import main

sys.exit(main())
