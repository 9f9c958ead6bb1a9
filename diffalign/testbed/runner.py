"""The testbed job's process runner: tasks with dependencies on a pool of single-threaded workers.

Work runs in ``workers`` processes with one torch thread each: a tiny model gains little from a
second thread, and one thread per process cannot be oversubscribed by a busy neighbour (the
CPU trap that makes torch's default threads 10-40x slower).

Which ready task starts first decides how long the job takes: a pair-sampling task that five
trainings and ten evaluations wait for must start before a long online training that nothing
waits for, or a core idles at the end. :class:`Scheduler` therefore orders ready tasks by
their *critical path*: a task's own expected cost plus the longest chain of expected costs
that depends on it (list scheduling by "bottom level", the classic HLFET rule). The same rule,
run on the expected costs alone (:meth:`Scheduler.simulate`), is the job's up-front estimate.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path


def busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores other processes keep busy right now (from ``/proc/stat`` over ``seconds``;
    None where it cannot be read). The load average lags by a minute, so it would blame, say,
    the ``pip install`` that just finished."""
    def sample():
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    n = os.cpu_count() or 1
    return n * (1.0 - (i1 - i0) / max(t1 - t0, 1))


def cpu_plan(workers: int | None = None) -> tuple[int, str]:
    """How many worker processes to run (one torch thread each), and a line saying why."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers is not None:
        return max(1, int(workers)), f"{workers} worker process(es) x 1 torch thread (--workers)"
    n = max(1, min(cores, 4))
    why = f"{n} worker process(es) x 1 torch thread on {cores} core(s)"
    busy = busy_cores()
    if busy is not None and busy > 0.5:
        why += (f"; other processes keep {busy:.1f} core(s) busy, so this run will be slower (one torch thread per "
                "process keeps it from collapsing; --workers 1 leaves a core to the neighbour)")
    return n, why


# ------------------------------------------------------------------------------------ worker side
# Top-level functions: they run in spawned worker processes.
def init_worker() -> None:
    """Worker start-up: one torch thread, quiet progress bars, and death with the job process."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_MININTERVAL", "10")
    _die_with_parent()


def _die_with_parent() -> None:
    """On Linux, have the kernel stop this worker when the job process dies (a ``kill`` of the job
    would otherwise leave its workers training on, taking the cores from the next run)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _logged(log_path: str):
    if not log_path:  # no log file: the worker's own output
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def run_task(fn, log_path: str, *args) -> dict:
    """Run ``fn(*args)`` with its output in ``log_path``; never raises (one failure must not sink the job)."""
    t0 = time.perf_counter()
    try:
        with _logged(log_path):
            value = fn(*args)
        return {"ok": True, "seconds": time.perf_counter() - t0, "value": value}
    except BaseException as e:  # noqa: BLE001 - reported as the task's status
        if log_path:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(traceback.format_exc())
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}


# ------------------------------------------------------------------------------------ scheduling
@dataclass
class Task:
    """One unit of work: ``fn(*args)`` in a worker, after every task named in ``deps``."""

    name: str
    fn: object
    args: tuple
    deps: tuple[str, ...] = ()
    weight: float = 1.0  # expected seconds on the reference machine (testbed README, "Time")
    result: dict | None = None
    log: str = ""
    started: float | None = None  # seconds since the run started
    ended: float | None = None


@dataclass
class Scheduler:
    """Run tasks in a process pool as soon as their dependencies finished, longest critical path first."""

    workers: int
    tasks: dict[str, Task] = field(default_factory=dict)

    def add(self, task: Task) -> None:
        self.tasks[task.name] = task

    def priorities(self) -> dict[str, float]:
        """Each task's critical path: its weight plus the heaviest chain of tasks that wait for it."""
        children: dict[str, list[str]] = {n: [] for n in self.tasks}
        for t in self.tasks.values():
            for d in t.deps:
                if d not in self.tasks:
                    raise ValueError(f"task {t.name!r} depends on unknown task {d!r}")
                children[d].append(t.name)
        memo: dict[str, float] = {}

        def level(name: str, seen: tuple[str, ...] = ()) -> float:
            if name in seen:
                raise ValueError(f"dependency cycle through {name!r}")
            if name not in memo:
                memo[name] = self.tasks[name].weight + max((level(c, (*seen, name)) for c in children[name]), default=0.0)
            return memo[name]

        return {n: level(n) for n in self.tasks}

    def order(self, ready: list[Task], prio: dict[str, float]) -> list[Task]:
        return sorted(ready, key=lambda t: (-prio[t.name], -t.weight, t.name))

    def simulate(self) -> dict[str, tuple[float, float]]:
        """(start, end) of every task if each took exactly its weight: the same list-scheduling rule as
        :meth:`run`, on expected costs. Its makespan is the job's up-front estimate."""
        prio, free = self.priorities(), [0.0] * self.workers
        end: dict[str, float] = {}
        out: dict[str, tuple[float, float]] = {}
        pending = dict(self.tasks)
        clock = 0.0
        while pending:
            ready = [t for t in pending.values() if all(d in end and end[d] <= clock for d in t.deps)]
            idle = [i for i, f in enumerate(free) if f <= clock]
            started = list(zip(self.order(ready, prio), idle))
            for t, w in started:
                out[t.name] = (clock, clock + t.weight)
                end[t.name] = free[w] = clock + t.weight
                del pending[t.name]
            future = [f for f in free if f > clock] + [e for e in end.values() if e > clock]
            if future:
                clock = min(future)
            elif pending and not started:
                raise ValueError("tasks that can never start: " + ", ".join(pending))
        return out

    def run(self, log) -> None:
        import multiprocessing as mp

        from tqdm.auto import tqdm

        prio = self.priorities()
        done: set[str] = set()
        running: dict = {}
        t0 = time.perf_counter()
        bar = tqdm(total=len(self.tasks), desc="testbed-compare", unit="task", leave=True)
        with ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=init_worker) as pool:
            while len(done) < len(self.tasks):
                blocked = [t for t in self.tasks.values() if t.name not in done and t.name not in running.values()]
                failed_deps = [t for t in blocked if any(self.tasks[d].result and not self.tasks[d].result["ok"] for d in t.deps)]
                for t in failed_deps:
                    t.result = {"ok": False, "seconds": 0.0, "error": "skipped: " + ", ".join(
                        d for d in t.deps if not self.tasks[d].result["ok"]) + " failed"}
                    done.add(t.name)
                    bar.update(1)
                ready = [t for t in blocked if t not in failed_deps and all(d in done for d in t.deps)]
                for t in self.order(ready, prio)[: max(0, self.workers - len(running))]:
                    t.started = time.perf_counter() - t0
                    running[pool.submit(run_task, t.fn, t.log, *t.args)] = t.name
                if not running:
                    continue
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    t = self.tasks[running.pop(fut)]
                    t.result = fut.result()
                    t.ended = time.perf_counter() - t0
                    done.add(t.name)
                    bar.update(1)
                    state = "ok" if t.result["ok"] else f"FAILED ({t.result['error']}; log: {t.log})"
                    log(f"[testbed-compare] {t.name}: {state} in {t.result['seconds']:.0f}s")
                bar.set_postfix_str(", ".join(running.values())[:60])
        bar.close()

    def busy_fraction(self) -> float | None:
        """Share of ``workers`` x wall time the workers spent in tasks (1.0: no core ever idle)."""
        spans = [(t.started, t.ended) for t in self.tasks.values() if t.started is not None and t.ended is not None]
        if not spans:
            return None
        wall = max(e for _, e in spans) - min(s for s, _ in spans)
        return sum(e - s for s, e in spans) / max(self.workers * wall, 1e-9)
