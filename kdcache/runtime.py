"""How a kdcache process uses the machine: CPU threads, and which libraries may print.

Threads: torch's OpenMP workers spin while they wait for each other, so one worker that shares its
core with another busy process stalls every parallel region. On a 2-core machine with one core busy
elsewhere, 10 training steps took 15.1 s with torch's default of 2 threads and 1.1 s with 1. The
default here is the physical cores this process may run on (its CPU affinity mask), less the cores
other processes keep busy (the 1-minute load average), split between the processes of one
`accelerate launch`; `OMP_NUM_THREADS` or an explicit `threads` wins.

Output: kdcache shows one progress line per phase; the bars and load reports of transformers,
datasets and huggingface_hub are quieted unless asked for (`verbose`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import KDCacheError


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads of one core count once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def default_threads() -> tuple[int, str]:
    """(threads, why) for this process when nobody chose."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = physical_cores()
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, (cores - min(busy, cores - 1)) // processes)
    return threads, f"{cores} physical cores, about {min(busy, cores)} busy elsewhere, {processes} process(es)"


@contextlib.contextmanager
def thread_settings():
    """Restore torch's thread count and OMP_NUM_THREADS on exit: a command run inside another Python
    process (tests, notebooks) must not change how that process computes afterwards (float reductions
    differ between thread counts)."""
    import sys
    environment = os.environ.get("OMP_NUM_THREADS")
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    try:
        yield
    finally:
        if environment is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = environment
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            torch.set_num_threads(threads if threads is not None else default_threads()[0])


def configure_threads(threads: int | None = None) -> tuple[int, str]:
    """Set the intra-op thread count for torch (through OMP_NUM_THREADS when torch is not imported yet,
    so commands that never need torch do not pay for importing it); return (threads, why)."""
    import sys
    if threads is not None and threads <= 0:
        raise KDCacheError(f"`threads` must be positive, got {threads}")
    chosen, why = (threads, "asked for") if threads is not None else default_threads()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(chosen)
    else:
        os.environ["OMP_NUM_THREADS"] = str(chosen)
    return chosen, why


# Read by huggingface_hub, transformers and datasets when they are imported.
_QUIET_ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                      "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def quiet_libraries() -> None:
    """Silence third-party progress bars and load reports (kdcache's own progress stays): through the
    environment for libraries not imported yet, through their switches for those already imported."""
    import sys
    for name, value in _QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:
        transformers = sys.modules["transformers"]
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.logging.set_verbosity_error()
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
