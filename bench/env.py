"""Stamp for every result file: machine, versions, date, command."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys


def command_line(*parts) -> str:
    """A command as a shell would take it back: each argument quoted where needed (an argument
    with a space, ``-k "speed and torch"``, was written bare and could not be rerun as recorded)."""
    return shlex.join(str(p) for p in parts)


def machine_stamp() -> dict:
    import torch

    stamp = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(os.path.basename(sys.executable), *sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    stamp["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        stamp["gpu"] = torch.cuda.get_device_name()
        stamp["cuda"] = torch.version.cuda
    try:
        import triton

        stamp["triton"] = triton.__version__
    except ImportError:
        pass
    return stamp
