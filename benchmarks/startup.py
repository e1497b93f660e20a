"""Start -> first `step` event, for ddp on sim:4 (the issue's target: <= 1 s once the app is up).

cold: a fresh process whose first run must also start the forkserver (which imports
      torch and every strategy once).
warm: the app is up: the forkserver was started at launch (run.prewarm) and a run has
      already happened; Start forks ranks that have everything imported.

    python benchmarks/startup.py [--repeats 5] [--devices sim:4] [--mode ddp]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from paralab.core.config import RunConfig
from paralab.core.events import StepDone
from paralab.core.run import Run, prewarm


def config(mode: str, devices: str) -> RunConfig:
    return RunConfig(mode=mode, devices=devices).with_overrides({
        "model.kind": "mlp", "model.width": 64, "model.depth": 2, "train.batch_size": 16, "train.steps": 3})


def time_to_first_step(cfg: RunConfig) -> float:
    start = time.perf_counter()
    run = Run(cfg)
    for e in run.events():
        if isinstance(e, StepDone):
            first = time.perf_counter() - start
            run.stop()
    return first


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--devices", default="sim:4")
    p.add_argument("--mode", default="ddp")
    p.add_argument("--cold-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    cfg = config(args.mode, args.devices)
    if args.cold_child:
        print(time_to_first_step(cfg))
        return

    cold = []
    for _ in range(max(1, args.repeats // 2)):
        out = subprocess.run([sys.executable, __file__, "--cold-child", "--mode", args.mode,
                              "--devices", args.devices], capture_output=True, text=True, check=True)
        cold.append(float(out.stdout.strip().splitlines()[-1]))

    prewarm()
    time_to_first_step(cfg)  # the app has been up a while: the forkserver is ready
    warm = [time_to_first_step(cfg) for _ in range(args.repeats)]
    print(f"{args.mode} on {args.devices}: Start -> first step event")
    print(f"  cold (fresh process, forkserver starts)  median {statistics.median(cold):.2f} s  "
          f"({', '.join(f'{c:.2f}' for c in cold)})")
    print(f"  warm (app up, forkserver ready)          median {statistics.median(warm):.2f} s  "
          f"({', '.join(f'{w:.2f}' for w in warm)})   target <= 1 s")


if __name__ == "__main__":
    main()
