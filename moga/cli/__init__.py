"""`python -m moga` (or `moga`): generate, info, patch, demo (+ train / inspect where those modules exist).

Imports are lazy: `moga --help` loads neither torch nor a model. Every error a person can act on is
printed as one line (`moga: error: ...`) with exit status 2; see docs/cli.md.

Read top to bottom:
  errors     CliError, the exit statuses, `run_command` (each error as one line and its status)
  device     --device / --dtype checked against the machine (also for moga.parallel's torchrun entry)
  settings   a run's settings from its flags and the checkpoint: size, LoRAs, shot plan, MoGA config
  loading    what `generate` loads before sampling: start images, the DiT or expert pair, encoders
  generate   `moga generate`: check, load, sample, decode, write, report
  info, patch, demo   the other commands
  forward    `train` / `inspect`: run by their own modules (`inspect`'s options parsed torch-free first)
  parsers    every command's argparse options (torch-free: `--help` answers at once)
  entry      `main`: parse, dispatch, and under torchrun rank 0 alone prints
"""
from .errors import EXIT_CANCELLED, EXIT_USAGE, CliError
from .device import check_device, resolve_device_dtype
from .settings import checkpoint_defaults, load_plan, lora_list, moga_settings, parse_size, run_settings
from .loading import encode_images, encode_plan, load_dit, load_encoders, parse_shot_images
from .generate import cmd_generate, effective_groups
from .info import cmd_info
from .patch import cmd_patch
from .demo import cmd_demo
from .parsers import LORA_HELP, add_lora_argument, build_parser
from .entry import main

_run_settings = run_settings  # the name tests/test_cli_errors.py imports

__all__ = ["EXIT_CANCELLED", "EXIT_USAGE", "CliError", "check_device", "resolve_device_dtype",
           "checkpoint_defaults", "load_plan", "lora_list", "moga_settings", "parse_size", "run_settings",
           "encode_images", "encode_plan", "load_dit", "load_encoders", "parse_shot_images", "cmd_generate",
           "effective_groups", "cmd_info", "cmd_patch", "cmd_demo", "LORA_HELP", "add_lora_argument",
           "build_parser", "main"]
