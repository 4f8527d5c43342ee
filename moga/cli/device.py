"""--device and --dtype as torch objects, checked against the machine (also for moga.parallel's
torchrun entry). torch is imported only when they are resolved."""
from __future__ import annotations

from .errors import CliError


def check_device(device):
    """--device as a torch.device that exists here, else a CliError naming the ones that do."""
    import torch
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise CliError(f"--device {device!r} is not a device torch knows: use cpu, cuda or cuda:N "
                       f"(or mps on a Mac)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {device} asked for but CUDA is not available here: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CliError(f"--device {device} asked for but MPS is not available here: use --device cpu")
    elif dev.type != "cpu":
        raise CliError(f"--device {device}: moga runs on cpu, cuda or mps, not {dev.type}")
    return dev


def resolve_device_dtype(device, dtype_name: str):
    import torch
    device = check_device(device)
    if dtype_name in (None, "auto"):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    return device, dtype
