"""`lowbit tune` on MiniLM serially, with 2 local worker processes, and with 2 Ray tasks, in one run.

The task is bench.tune's MiniLM topic classification (objective size, accuracy drop ≤ 0.005, no
time budget). Prints, per executor, the chosen recipe (they must agree), the wall time and its
ratio to serial; then, from the per-unit seconds the parallel run measured round by round, the
wall time the same search would take with 1, 2, 4 and 8 workers (each round's units spread
longest first over the workers, plus the run's own serial part: reference outputs, calibration,
the choice and the rebuild of the chosen model). This machine has 2 cores, so 2 workers here
share them. Writes bench/results/tune-parallel.json.

    .venv/bin/python -m bench.tune_parallel [--threads 2]
"""

from __future__ import annotations

import heapq
import time

import lowbit
from bench.common import bench_arguments, print_table, write_json
from bench.tune import minilm_task

EXECUTORS = {"serial": {}, "2 processes": {"workers": 2},
             "2 Ray tasks": {"workers": 2, "ray_address": "local"}}
PROJECTED_WORKERS = (1, 2, 4, 8)


def makespan(seconds: list[float], workers: int) -> float:
    """Wall time of one round: its units, longest first, each to the worker free first."""
    free = [0.0] * workers
    for length in sorted(seconds, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + length)
    return max(free)


def projection(result, wall: float) -> dict[int, float]:
    """Wall seconds with N workers: the run's serial part plus each round's makespan on N."""
    rounds = result.settings["rounds"]
    serial_part = wall - sum(makespan(units, 2) for units in rounds)
    return {workers: serial_part + sum(makespan(units, workers) for units in rounds)
            for workers in PROJECTED_WORKERS}


def main() -> None:
    args = bench_arguments(__doc__, runs=None)
    rows, results = [], {}
    for name, options in EXECUTORS.items():
        task = minilm_task(args)
        started = time.perf_counter()
        result = lowbit.tune(task.pop("model"), task.pop("data"), objective="size", samples=None,
                             final_comparison=False, progress=False, **task, **options)
        wall = time.perf_counter() - started
        results[name] = (result, wall)
        rows.append({"executor": name, "chosen": result.chosen.label if result.chosen else "original",
                     "trials": len(result.trials), "wall_s": wall,
                     "vs_serial": results["serial"][1] / wall,
                     "nodes": len({trial.node for trial in result.trials})})
    print_table(f"lowbit tune, MiniLM topic accuracy (drop ≤ 0.005, objective size), {args.threads} threads",
                rows, [("executor", "executor"), ("chosen", "chosen"), ("trials", "trials"),
                       ("wall_s", "wall s"), ("vs_serial", "× serial"), ("nodes", "processes")])
    same = len({(r.chosen.label if r.chosen else None, str(r.recipe)) for r, _ in results.values()}) == 1
    print(f"same choice as serial: {same}")
    projected = projection(*results["2 processes"])
    print("projected wall time from the 2-process run's per-unit seconds: "
          + ", ".join(f"{workers} workers {seconds:.0f} s" for workers, seconds in projected.items()))
    write_json("tune-parallel", {"threads": args.threads, "rows": rows, "same_choice": same,
                                 "rounds_seconds": results["2 processes"][0].settings["rounds"],
                                 "projected_wall_s": projected,
                                 "trials": {name: [trial.__dict__ for trial in result.trials]
                                            for name, (result, _) in results.items()}})


if __name__ == "__main__":
    main()
