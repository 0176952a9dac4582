"""The line protocol between a benchmark driver and a worker process (standard library only).

A worker holds one library and answers one command per line on standard input with one
JSON line on standard output:

* ``first NAME [float32]``: build workload NAME's inputs, then time the first call;
  answers ``seconds`` and ``baseline_mib`` (resident memory just before the call);
* ``time NAME [float32]``: one more call, ``seconds``;
* ``save NAME DIR [float32]``: write the kernels to ``DIR/NAME.{nngp,ntk}.npy``;
* ``memory``: ``peak_mib``, the peak resident memory since the last ``first``;
* ``quit``.

On start it answers ``ready`` with the seconds its imports took.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np

#: (workload name, dtype name) -> a call computing {"nngp": array, "ntk": array}.
Prepare = Callable[[str, str], Callable[[], dict[str, np.ndarray]]]


def _status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (Linux), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def resident_mib() -> float:
    """The current resident set size of this process, in MiB."""
    return _status_mib("VmRSS")


def reset_peak() -> None:
    """Start the peak resident set size afresh from the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_mib() -> float:
    """The peak resident set size since :func:`reset_peak` (or the start), in MiB.

    ``VmHWM`` rather than ``getrusage``'s ``ru_maxrss``, which a process started by
    fork and exec inherits from its parent.
    """
    return _status_mib("VmHWM")


def serve(prepare: Prepare, import_seconds: float) -> None:
    """Answer commands on standard input until ``quit`` (see the module docstring)."""
    calls: dict[tuple[str, str], Callable[[], dict[str, np.ndarray]]] = {}

    def answer(**fields: object) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    answer(ready=import_seconds)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "quit":
            return
        if command == "memory":
            answer(peak_mib=peak_mib())
            continue
        name, dtype = args[0], "float32" if args[-1] == "float32" else "float64"
        if command == "first":
            calls[name, dtype] = prepare(name, dtype)
            reset_peak()
            baseline = resident_mib()
            answer(seconds=timed(calls[name, dtype]), baseline_mib=baseline)
        elif command == "time":
            answer(seconds=timed(calls[name, dtype]))
        elif command == "save":
            for kernel, value in calls[name, dtype]().items():
                np.save(os.path.join(args[1], f"{name}.{kernel}.npy"), value)
            answer(saved=args[1])
        else:
            answer(error=f"unknown command {command!r}")


def timed(call: Callable[[], object]) -> float:
    """Seconds taken by one ``call()``."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start
