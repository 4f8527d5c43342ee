"""`moga info`: what a checkpoint is."""
from __future__ import annotations

from .errors import check_exists


def cmd_info(args) -> int:
    import json

    from ..checkpoint import inspect_checkpoint
    check_exists(args.checkpoint, "checkpoint")
    info = inspect_checkpoint(args.checkpoint, num_heads=args.num_heads)
    print(json.dumps(info.to_dict(), indent=2, default=str) if args.json else str(info))
    return 0
