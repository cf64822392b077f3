"""Name the machine a benchmark ran on (every benchmark table states it)."""
from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (else what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str | torch.device | None = None, with_load: bool = False) -> str:
    """``"CPU <model>, <n> cores, <t> torch threads; torch <v>; Python <v>"`` or the GPU name for CUDA devices
    (``device`` None: CUDA where available, else the CPU); ``with_load`` appends the load average (shared machines)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        hw = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    else:
        hw = f"CPU {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    load = f"; load average {load_average()}" if with_load else ""
    return f"{hw}; torch {torch.__version__}; Python {platform.python_version()}{load}"


def load_average() -> str:
    """``"1.9 / 1.6 / 1.4 (1/5/15 min)"``, or ``"unknown"`` where the OS does not report it."""
    try:
        return "%.1f / %.1f / %.1f (1/5/15 min)" % os.getloadavg()
    except (OSError, AttributeError):
        return "unknown"
