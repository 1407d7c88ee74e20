"""Where the (model, recipe) cells of a sweep run: `serial` (this process, one after another) or
`ray` (one Ray task per cell, with the config's declared resources).

The executor only moves cells and results; it never writes. The driver (quantbench.run.pipeline)
appends each row to its run's rows.jsonl as the result arrives, so a killed driver or a lost
worker loses no finished row, and a rerun computes only the missing cells. Ray schedules; we
write no scheduler of our own.
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import QuantbenchError
from ..core.log import log


class ExecutorError(QuantbenchError):
    """The executor cannot run: unknown kind, Ray missing, cluster unreachable."""


@dataclass(frozen=True)
class Cell:
    """One unit of work: recipe `recipe` of run number `run`; `args` go to the worker function."""

    run: int
    recipe: str
    args: tuple


Local = Callable[[Cell], Any]  # computes a cell in this process
Remote = Callable[..., Any]  # an importable function computing a cell from cell.args, in a worker
Done = Callable[[Cell, Any], None]  # receives each result in the driver, as it arrives


class SerialExecutor:
    """Today's loop: every cell in this process, in order, with the state already loaded here."""

    remote = False

    def start(self) -> None:
        pass

    def run(self, cells: list[Cell], local: Local, remote: Remote, done: Done) -> list[Cell]:
        for cell in cells:
            done(cell, local(cell))
        return []

    def close(self) -> None:
        pass


def _probe(address: str, timeout: float = 5.0) -> None:
    """A one-line error when `host:port` (or ray://host:port) takes no TCP connection."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"executor ray: address '{address}' is not 'auto', 'host:port' or 'ray://host:port'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ExecutorError(f"executor ray: cannot reach the Ray cluster at {address} ({why}); "
                            "start it with `ray start --head` or check --ray-address") from None


class RayExecutor:
    """Each cell is a Ray task with `num_cpus`/`num_gpus`; a task whose worker dies is retried
    `max_retries` times, then reported lost (its row stays missing until a rerun)."""

    remote = True

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.started = False
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ExecutorError("executor ray: ray is not installed (pip install 'ray==2.60.0')") from None

    def start(self) -> None:
        import ray

        addr = self.cfg.address
        if addr and addr != "auto":
            _probe(addr)
        if ray.is_initialized():  # the caller's Ray (a test, a notebook): use it, leave it running
            self._check_resources()
            return
        handlers = _signal_handlers()
        try:
            ray.init(address=addr, num_cpus=self.cfg.local_cpus if not addr else None,
                     include_dashboard=False, logging_level="ERROR")
            _restore(handlers)  # ray.init installs its own SIGTERM/SIGINT handlers; the CLI's stop the run cleanly
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ExecutorError(f"executor ray: cannot connect to {addr or 'a local Ray'}: {first}") from None
        self.started = True
        log(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPU, {ray.cluster_resources().get('GPU', 0):g} GPU "
            f"({addr or 'local'})")
        self._check_resources()

    def _check_resources(self) -> None:
        """A cell no node can ever hold would wait forever: refuse it before any work."""
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        for key, want, option in (("CPU", self.cfg.num_cpus, "num_cpus"), ("GPU", self.cfg.num_gpus, "num_gpus")):
            most = max((r.get(key, 0.0) for r in nodes), default=0.0)
            if want > most:
                self.close()
                raise ExecutorError(f"executor ray: each cell asks for {want:g} {key}, but no node of the cluster "
                                    f"has more than {most:g}; lower executor.{option} (or add such a node)")

    def run(self, cells: list[Cell], local: Local, remote: Remote, done: Done) -> list[Cell]:
        import ray
        from ray.exceptions import RayTaskError

        task = ray.remote(num_cpus=self.cfg.num_cpus, num_gpus=self.cfg.num_gpus,
                          max_retries=self.cfg.max_retries, retry_exceptions=False)(_call)
        pending = {task.remote(remote, *c.args): c for c in cells}
        lost: list[Cell] = []
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    cell = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except RayTaskError as e:  # the cell raised: the same error as in serial
                        cause = getattr(e, "cause", None)
                        raise (cause if isinstance(cause, BaseException) else ExecutorError(str(e)[:300])) from None
                    except ray.exceptions.RayError as e:  # the worker or its node died, retries spent
                        log(f"cell {cell.recipe} lost ({type(e).__name__}); its row stays missing")
                        lost.append(cell)
                        continue
                    done(cell, result)
        except BaseException:
            # No ray.cancel: a cancel racing a task's completion aborts the driver inside Ray's core
            # (TaskManager::CompletePendingTask, seen under SIGTERM). The cells still running are left
            # alone: their results are never read, and Ray stops them when this driver disconnects.
            log(f"ray: {len(pending)} cell(s) in flight left unread; Ray stops them at shutdown")
            raise
        return lost

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


def _signal_handlers() -> dict:
    import signal

    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore(handlers: dict) -> None:
    import signal

    for sig, handler in handlers.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread: nothing was installed here either
                pass


def _call(fn: Remote, *args):
    """The Ray task body: `fn` is pickled by reference and imported in the worker."""
    return fn(*args)


EXECUTORS = {"serial": lambda cfg: SerialExecutor(), "ray": RayExecutor}


def make_executor(cfg) -> SerialExecutor | RayExecutor:
    """The executor named by an ExecutorConfig (`kind`)."""
    if cfg.kind not in EXECUTORS:
        raise ExecutorError(f"unknown executor '{cfg.kind}' (choose: {', '.join(EXECUTORS)})")
    return EXECUTORS[cfg.kind](cfg)


Executor = SerialExecutor | RayExecutor
