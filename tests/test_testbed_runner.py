"""The testbed job's runner: critical-path priorities, the simulated estimate, and a real pool that
keeps both workers busy when work is ready (fake tasks, no models)."""

from __future__ import annotations

import time

import pytest

from diffalign.testbed.runner import Scheduler, Task


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _job(workers: int = 2, unit: float = 0.1) -> Scheduler:
    """The job's shape in miniature: a pair task that three trainings wait for, and two long online
    trainings that nothing waits for. Heaviest-first starts both online runs and leaves the pair
    chain for later; the critical path (pairs 2 + training 5 = 7 > 6) starts the pairs at once."""
    s = Scheduler(workers)
    for name, w, deps in (("online_a", 6, ()), ("online_b", 6, ()), ("pairs", 2, ()),
                          ("train0", 5, ("pairs",)), ("train1", 5, ("pairs",)), ("train2", 5, ("pairs",))):
        s.add(Task(name, _sleep, (w * unit,), deps=deps, weight=w))
    return s


class HeaviestFirst(Scheduler):
    """The rule before the critical path: the heaviest ready task first."""

    def order(self, ready, prio):
        return sorted(ready, key=lambda t: -t.weight)


def test_priorities_are_the_critical_path():
    s = _job()
    p = s.priorities()
    assert p["pairs"] == 7 and p["train0"] == 5 and p["online_a"] == 6
    s.add(Task("eval0", _sleep, (0,), deps=("train0",), weight=9))
    assert s.priorities()["pairs"] == 2 + 5 + 9  # the heaviest chain below it


def test_simulated_schedule_starts_the_chain_early_and_finishes_sooner():
    plan = _job().simulate()
    assert plan["pairs"][0] == 0.0 and plan["online_a"][0] == 0.0  # the pair chain does not wait
    # by hand: pairs 0-2 | online_a 0-6; online_b 2-8; train0 6-11; train1 8-13; train2 11-16
    assert plan["online_b"] == (2.0, 8.0) and plan["train2"] == (11.0, 16.0)
    old = HeaviestFirst(2, _job().tasks).simulate()
    # heaviest first: online_a, online_b 0-6; pairs 6-8; train0, train1 8-13; train2 13-18
    assert old["pairs"] == (6.0, 8.0) and max(e for _, e in old.values()) == 18.0
    assert max(e for _, e in plan.values()) == 16.0


def test_unknown_dependency_and_cycles_are_errors():
    s = Scheduler(1)
    s.add(Task("a", _sleep, (0,), deps=("nope",)))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        s.priorities()
    s = Scheduler(1)
    s.add(Task("a", _sleep, (0,), deps=("b",)))
    s.add(Task("b", _sleep, (0,), deps=("a",)))
    with pytest.raises(ValueError, match="cycle"):
        s.priorities()


def test_zero_weight_tasks_do_not_stall_the_simulation():
    s = Scheduler(2)
    s.add(Task("a", _sleep, (0,), weight=0))
    s.add(Task("b", _sleep, (0,), deps=("a",), weight=0))
    s.add(Task("c", _sleep, (0,), deps=("b",), weight=1))
    assert s.simulate()["c"] == (0.0, 1.0)


@pytest.mark.slow
def test_pool_keeps_both_workers_busy_when_work_is_ready():
    """Real worker processes on fake tasks (sleeps of 0.1 s per weight unit): they start in the
    simulated order, and the workers are busy for most of the run (the simulated schedule: 29 units
    of work in 16 on 2 workers, 91%)."""
    s = _job(unit=0.1)
    s.run(lambda line: None)
    assert all(t.result["ok"] for t in s.tasks.values())
    started = sorted(s.tasks.values(), key=lambda t: t.started)
    plan = _job().simulate()
    assert [t.name for t in started] == sorted(plan, key=lambda n: (plan[n][0], n != "pairs"))
    busy = s.busy_fraction()
    assert busy is not None and busy > 0.75, busy
