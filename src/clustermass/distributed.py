"""Dask (``dask.distributed``) for the embarrassingly parallel stages: simulation chunks and
inference batches.

``--scheduler`` takes

- ``processes:N``: a :class:`distributed.LocalCluster` of N worker processes with one task
  thread each (and this process's BLAS threading, so floating-point reductions round as in the
  serial run), started for the command and closed after it;
- ``threads:N``: the same with N threads in one process (handy for debugging);
- a scheduler address (``tcp://host:8786``, ``tls://...``, ``ws://...``) or ``HOST:PORT`` of an
  existing Dask cluster, e.g. one started with dask-jobqueue on Slurm (docs/scaling.md).

Tasks are submitted in order with a bounded number in flight and their results come back in
submission order; the caller (one process) writes them. Outputs therefore do not depend on the
scheduling: the bytes are those of the serial run. dask is an optional dependency
(``pip install clustermass[dask]``) imported only here, only when a scheduler is asked for.
"""

from __future__ import annotations

import contextlib
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from .errors import ConfigError

_LOCAL = re.compile(r"^(processes|threads):(\d+)$")


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "--scheduler needs dask.distributed, an optional dependency: "
            "pip install 'clustermass[dask]' (or pip install 'dask[distributed]')") from exc
    return distributed


def parse_scheduler(spec: str) -> tuple[str, int | str]:
    """``("processes"|"threads", N)`` or ``("address", address)``; raises ConfigError if malformed."""
    spec = spec.strip()
    m = _LOCAL.match(spec)
    if m:
        n = int(m.group(2))
        if n < 1:
            raise ConfigError(f"--scheduler {spec!r}: need at least one worker")
        return m.group(1), n
    if re.match(r"^(tcp|tls|ws|wss|inproc|ucx)://\S+$", spec) or re.match(r"^[\w.\-]+:\d+$", spec):
        return "address", spec
    raise ConfigError(f"--scheduler {spec!r}: use processes:N, threads:N or a scheduler address "
                      "(tcp://host:8786)")


@contextlib.contextmanager
def dask_client(spec: str | None):
    """A ``distributed.Client`` for ``spec`` (None: yields None, run serially).

    A local cluster started here is closed on exit; a client of an existing scheduler is
    closed, the cluster left running.
    """
    if spec is None:
        yield None
        return
    kind, arg = parse_scheduler(spec)
    distributed = _import_distributed()
    if kind == "address":
        try:
            client = distributed.Client(arg, timeout="30s")
        except OSError as exc:
            raise ConfigError(f"--scheduler {spec!r}: cannot reach the Dask scheduler: {exc}") from exc
        with client:
            yield client
        return
    # one task thread per worker process; BLAS in the workers keeps the threading of this process
    # (Dask's default is 1 thread): BLAS reductions split over another number of threads round
    # differently (1e-15), and the outputs must be the serial run's bytes
    procs = kind == "processes"
    import dask

    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **_blas_threads()}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), \
            distributed.LocalCluster(n_workers=int(arg) if procs else 1,
                                     threads_per_worker=1 if procs else int(arg), processes=procs,
                                     dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        yield client


def _blas_threads() -> dict[str, str]:
    """This process's BLAS/OpenMP thread settings (default: one thread per usable core)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {k: os.environ.get(k, str(cores)) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                       "OPENBLAS_NUM_THREADS")}


def n_workers(client) -> int:
    """Worker threads of a client's cluster (at least 1)."""
    try:
        info = client.scheduler_info()
        return max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))
    except Exception:  # pragma: no cover - best effort
        return 1


def map_ordered(client, func: Callable, items: Iterable, *args, max_in_flight: int | None = None,
                **kwargs) -> Iterator:
    """``func(item, *args, **kwargs)`` for every item, as Dask tasks; results in item order.

    At most ``max_in_flight`` tasks (default: twice the worker threads) are submitted but not yet
    consumed, so memory stays bounded however many items there are. ``args``/``kwargs`` travel
    with every task (keep them small: configurations, paths). With ``client=None`` it runs
    serially in this process.
    """
    if client is None:
        for item in items:
            yield func(item, *args, **kwargs)
        return
    limit = max_in_flight or 2 * n_workers(client)
    pending: deque = deque()
    try:
        for item in items:
            pending.append(client.submit(func, item, *args, pure=False, **kwargs))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()

