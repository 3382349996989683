"""Where independent pieces of work run: here, in local worker processes, or as Ray tasks.

Each piece is a picklable top-level function applied to one picklable item (a trial, a model of
a batch); it shares no state with the caller. `run_all` hands back one `Outcome` per item, in
the items' order: the value, or the error that stopped it, with the node and process that ran
it. A worker that dies mid-task (killed, out of memory) gets the task once more on a fresh worker;
dying again, the task is recorded as failed with that reason and the rest go on.

- "serial": one after another in this process (what `workers=1` means).
- "processes": `workers` local processes (spawned, so no thread or lock state of the caller is
  copied into them).
- "ray": Ray tasks on the cluster at `address` ("local" starts a private one on this machine).
  An address that does not answer is refused within seconds, naming the address.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError
from lowbit.registry import Registry

RETRIES = 1  # a task whose worker died runs once more
CONNECT_SECONDS = 10.0


@dataclass
class Outcome:
    """What one task gave: its value, or why it failed; where it ran; how long it took."""

    value: Any = None
    error: str | None = None
    node: str = ""
    attempts: int = 1
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ExecutorSpec:
    """How to run tasks: an executor name, its worker count, and (Ray) the cluster address."""

    name: str = "serial"
    workers: int = 1
    address: str | None = None

    @property
    def parallel(self) -> bool:
        return self.name != "serial"


OnDone = Callable[[int, Outcome], None]
_SHARED: dict[str, Any] = {}  # in a worker process: what its tasks share


class Session:
    """An open executor: `map` runs tasks on it, as many times as needed; the workers (and what
    they share) stay up between calls until the session closes."""

    def __init__(self, spec: ExecutorSpec, shared: Any) -> None:
        self.spec, self.shared = spec, shared

    def map(self, task: Callable[..., Any], items: Sequence[Any], on_done: OnDone | None = None
            ) -> list[Outcome]:
        """`task(item)` (or `task(shared, item)`) for every item; one Outcome per item, in order.
        `on_done(index, outcome)` is called here as each finishes (to record it, show progress)."""
        outcomes: dict[int, Outcome] = {}

        def done(index: int, outcome: Outcome) -> None:
            outcomes[index] = outcome
            if on_done:
                on_done(index, outcome)

        self._run(task, list(items), done)
        return [outcomes[index] for index in range(len(items))]

    def _run(self, task: Callable[..., Any], items: list[Any], done: OnDone) -> None:
        for index, item in enumerate(items):
            done(index, _outcome(_timed(task, item, self.shared), 1))

    def close(self) -> None:
        """Stop what the session started."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


EXECUTORS: Registry[type[Session]] = Registry("executor")
EXECUTORS.add("serial", Session)


def executor_spec(workers: int = 1, ray_address: str | None = None, executor: str | None = None
                  ) -> ExecutorSpec:
    """The executor the options ask for: `executor` by name ("serial", "processes", "ray"; Ray
    with no address joins the cluster RAY_ADDRESS names, else starts one here), else Ray when an
    address is given, local processes for more than one worker, else this process."""
    if workers < 1:
        raise LowbitError(f"workers must be at least 1, not {workers}")
    name = executor or ("ray" if ray_address else "processes" if workers > 1 else "serial")
    if name not in EXECUTORS:
        raise LowbitError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
    if ray_address and name != "ray":
        raise LowbitError(f"a Ray address is for executor 'ray', not {name!r}")
    return ExecutorSpec(name, workers, ray_address)


def open_executor(spec: ExecutorSpec | None = None, shared: Any = None) -> Session:
    """A session on the executor `spec` names (this process by default). With `shared` (what every
    task reads: a model and its data), each task is `task(shared, item)` and `shared` is sent to
    each worker once, not with every item."""
    spec = spec or ExecutorSpec()
    return EXECUTORS.get(spec.name)(spec, shared)


def run_all(task: Callable[..., Any], items: Sequence[Any], spec: ExecutorSpec | None = None,
            on_done: OnDone | None = None, shared: Any = None) -> list[Outcome]:
    """`task(item)` for every item on a session opened for these items alone."""
    with open_executor(spec, shared) as session:
        return session.map(task, items, on_done)


def node_name() -> str:
    """Where this code runs: host and process id (and, in a Ray task, Ray's node id)."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    try:
        import ray

        if ray.is_initialized():
            return f"{name} (ray node {ray.get_runtime_context().get_node_id()[:12]})"
    except ImportError:
        pass
    return name


def _timed(task: Callable[..., Any], item: Any, shared: Any = None) -> tuple[Any, str | None, str, float]:
    """(value, error, node, seconds) of one task in the worker that runs it: a task's own error is
    a result, not a crash of the worker."""
    start = time.monotonic()
    try:
        value = task(item) if shared is None else task(shared, item)
        return value, None, node_name(), time.monotonic() - start
    except Exception as error:  # noqa: BLE001 - recorded against the item; the others go on
        return None, f"{type(error).__name__}: {error}", node_name(), time.monotonic() - start


def _outcome(result: tuple[Any, str | None, str, float], attempts: int) -> Outcome:
    value, error, node, seconds = result
    return Outcome(value, error, node, attempts, seconds)


def _install_shared(shared: Any) -> None:
    _SHARED["value"] = shared


def _timed_with_shared(task: Callable[..., Any], item: Any) -> tuple[Any, str | None, str, float]:
    return _timed(task, item, _SHARED["value"])


@EXECUTORS.register("processes")
class _Processes(Session):
    """Local worker processes, spawned once per session. A dead worker breaks the whole pool, so
    the pool is rebuilt and every task that was still in flight counts one attempt."""

    pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self.pool is None:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.spec.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_install_shared, initargs=(self.shared,))
        return self.pool

    def _run(self, task: Callable[..., Any], items: list[Any], done: OnDone) -> None:
        attempts = dict.fromkeys(range(len(items)), 0)
        finished: set[int] = set()
        run = _timed if self.shared is None else _timed_with_shared
        while len(finished) < len(items):
            pending = [index for index in range(len(items)) if index not in finished]
            if any(attempts[index] for index in pending):  # a retry: one at a time, so a task that
                pending = pending[:1]                      # kills its worker takes down no other
            futures = {}
            for index in pending:
                attempts[index] += 1
                futures[self._submit(run, task, items[index])] = index
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                try:
                    outcome = _outcome(future.result(), attempts[index])
                except BrokenProcessPool as error:
                    if attempts[index] <= RETRIES:
                        continue
                    outcome = Outcome(error=f"its worker process died twice ({error})",
                                      attempts=attempts[index])
                except Exception as error:  # noqa: BLE001 - it could not be sent (not picklable)
                    outcome = Outcome(error=f"it could not be sent to a worker: {type(error).__name__}: "
                                      f"{error}", attempts=attempts[index])
                finished.add(index)
                done(index, outcome)
            if len(finished) < len(items):
                self.close()  # broken: the next pass starts a fresh pool

    def _submit(self, run: Callable[..., Any], task: Callable[..., Any], item: Any
                ) -> concurrent.futures.Future:
        """The task on the pool; a pool already broken gives a future that holds that error."""
        try:
            return self._pool().submit(run, task, item)
        except Exception as error:  # noqa: BLE001 - a broken pool, or what pickle cannot send
            failed: concurrent.futures.Future = concurrent.futures.Future()
            failed.set_exception(error)
            return failed

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


@EXECUTORS.register("ray")
class _Ray(Session):
    """Ray tasks, one CPU each; Ray reruns a task whose worker died once (max_retries). `shared`
    goes into Ray's object store once per session; each task gets it from there."""

    def __init__(self, spec: ExecutorSpec, shared: Any) -> None:
        super().__init__(spec, shared)
        self.started = not _ray_running()
        self.ray = connect_ray(spec.address)
        self.reference = None if shared is None else self.ray.put(shared)

    def close(self) -> None:
        """Leave Ray as it was found: a cluster this session started (or joined) is let go."""
        if self.started:
            self.ray.shutdown()

    def _run(self, task: Callable[..., Any], items: list[Any], done: OnDone) -> None:
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=RETRIES)(_timed)
        pending = {remote.remote(task, item, self.reference): index for index, item in enumerate(items)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            try:
                outcome = _outcome(ray.get(ready[0]), 1)
            except ray.exceptions.RayError as error:  # the worker died on every attempt
                outcome = Outcome(error=f"its Ray worker died on every attempt: {str(error)[:300]}",
                                  attempts=1 + RETRIES)
            done(index, outcome)


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def connect_ray(address: str | None) -> Any:
    """Ray, connected to the cluster at `address` ("local": a private one started here); an
    address that does not answer is a LowbitError within CONNECT_SECONDS."""
    try:
        import ray
    except ImportError:
        raise LowbitError("running on Ray needs Ray: pip install 'lowbit[ray]'") from None
    if ray.is_initialized():
        return ray
    if address in (None, "", "local"):  # RAY_ADDRESS, if set, names a cluster to join instead
        ray.init(address=None if address is None else "local", include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        return ray
    _check_answers(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as error:  # noqa: BLE001 - Ray's connection errors are of many types
        raise LowbitError(f"cannot join the Ray cluster at {address}: {str(error)[:300]}") from None
    return ray


def _check_answers(address: str) -> None:
    """Refuse a `host:port` where nothing listens, before Ray spends minutes retrying it."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise LowbitError(f"a Ray address is host:port (or 'local'), not {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS):
            pass
    except OSError as error:
        raise LowbitError(f"no Ray cluster answers at {address}: {error}") from None
