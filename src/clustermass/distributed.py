"""Dask (``dask.distributed``) for the embarrassingly parallel stages: simulation chunks and
inference batches.

``--scheduler`` takes

- ``processes:N``: a :class:`distributed.LocalCluster` of N single-threaded worker processes,
  started for the command and closed after it;
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
    # single-threaded worker processes keep torch/BLAS from oversubscribing the cores
    procs = kind == "processes"
    with distributed.LocalCluster(n_workers=int(arg) if procs else 1,
                                  threads_per_worker=1 if procs else int(arg), processes=procs,
                                  dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        yield client


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

