"""`python -m moga ...`: see moga/cli/ and docs/cli.md."""
import sys

from .cli import main

sys.exit(main())
