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

A worker computing on an accelerator (a CUDA GPU) is given a :class:`Device`: each timed
call is then synchronised before and after (accelerators run asynchronously), ``first``
also answers ``device_baseline_mib`` (the accelerator memory allocated just before the
call) and ``memory`` also answers ``device_peak_mib`` (the peak allocated since the last
``first``), besides the resident memory of the process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

#: (workload name, dtype name) -> a call computing {"nngp": array, "ntk": array}: NumPy
#: arrays, or tensors on any device (``save`` copies them to the host, outside the timings).
Prepare = Callable[[str, str], Callable[[], dict[str, object]]]


class Device(Protocol):
    """An accelerator that a worker computes on (e.g. ``bench_speed.CudaDevice``)."""

    #: A name for people, e.g. ``"cuda:0 (NVIDIA H100 80GB HBM3)"``.
    name: str

    def synchronize(self) -> None:
        """Wait until all work queued on the accelerator has finished."""

    def reset_peak(self) -> None:
        """Start the accelerator's peak allocated memory afresh from the current one."""

    def allocated_mib(self) -> float:
        """Accelerator memory allocated now, in MiB."""

    def peak_mib(self) -> float:
        """The peak accelerator memory allocated since :meth:`reset_peak`, in MiB."""


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


def host_array(value: object) -> np.ndarray:
    """A result as a NumPy array: tensors (on any device) through their ``cpu()``."""
    return np.asarray(value.cpu() if hasattr(value, "cpu") else value)


def serve(prepare: Prepare, import_seconds: float, device: Device | None = None) -> None:
    """Answer commands on standard input until ``quit`` (see the module docstring).

    ``device``: the accelerator the calls of ``prepare`` compute on, if any: timings are
    synchronised with it, and its memory is reported besides the resident memory.
    """
    calls: dict[tuple[str, str], Callable[[], dict[str, object]]] = {}
    synchronize = None if device is None else device.synchronize

    def answer(**fields: object) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    answer(ready=import_seconds)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "quit":
            return
        if command == "memory":
            extra = {} if device is None else {"device_peak_mib": device.peak_mib()}
            answer(peak_mib=peak_mib(), **extra)
            continue
        name, dtype = args[0], "float32" if args[-1] == "float32" else "float64"
        if command == "first":
            calls[name, dtype] = prepare(name, dtype)
            extra = {}
            if device is not None:
                device.synchronize()  # the inputs are on the device before the clock starts
                device.reset_peak()
                extra["device_baseline_mib"] = device.allocated_mib()
            reset_peak()
            baseline = resident_mib()
            answer(seconds=timed(calls[name, dtype], synchronize), baseline_mib=baseline,
                   **extra)
        elif command == "time":
            answer(seconds=timed(calls[name, dtype], synchronize))
        elif command == "save":
            for kernel, value in calls[name, dtype]().items():
                np.save(os.path.join(args[1], f"{name}.{kernel}.npy"), host_array(value))
            answer(saved=args[1])
        else:
            answer(error=f"unknown command {command!r}")


def timed(call: Callable[[], object], synchronize: Callable[[], None] | None = None) -> float:
    """Seconds taken by one ``call()``; with ``synchronize`` (an accelerator's), queued work
    is finished before the clock starts and the call's own work before it stops."""
    if synchronize is not None:
        synchronize()
    start = time.perf_counter()
    call()
    if synchronize is not None:
        synchronize()
    return time.perf_counter() - start
