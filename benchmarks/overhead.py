"""What does paralab cost?  Training steps/s of `paralab run` against the bare loop.

1. paralab vs the seed: mode single on the CPU, the data-parallel seed's regression
   (Linear(1,1), 10 000 samples, full batch, Adam), against the seed's own bare loop on
   the same data, in one run, alternating, median of the repeats.  Target >= 0.95.
2. instrumented vs uninstrumented, same mode: paralab with its default sampling
   (memory, spans, utilization at 4 Hz) against paralab with sampling off (only the
   first steps sampled).  Target >= 0.97.

3. paralab's own per-step cost, without the noise of a shared machine: its training loop
   (controls, sampling decision, loss kept for batched read-back, flushes, phase marks)
   run around a step that does nothing, in microseconds, against the seed's step time.
4. The cost of a sampled step on a simulated device: the recorder counts every allocation
   and the modelled clock costs every op and lays the ranks out; the median host time of
   sampled steps against the others in the same run.

paralab's steps/s is read from its own step events (first to last step), so process
start-up is not counted here; benchmarks/startup.py measures that.  On a shared machine
other work only ever slows a run down, so each side's best of the repeats is its speed
(as timeit takes the minimum); the medians are printed too.

    python benchmarks/overhead.py [--steps 20000] [--repeats 3] [--modes single,ddp]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from paralab.core import presets
from paralab.core.data import make_dataset
from paralab.core.events import StepDone
from paralab.core.models import build_model, loss_fn
from paralab.core.run import Run


def bare_seed_loop(steps: int) -> float:
    """The data-parallel seed's loop, verbatim but for the device: steps/s."""
    cfg = presets.load("seed-data-parallel")
    data = make_dataset(cfg.data, cfg.model, cfg.seed)
    X, y = data.inputs, data.targets
    model = build_model(cfg.model, cfg.seed)
    criterion = torch.nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    start = time.perf_counter()
    for _ in range(steps):
        outputs = model(X)
        loss = criterion(outputs, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss.item()
    return steps / (time.perf_counter() - start)


def paralab_steps_per_s(overrides: dict) -> float:
    cfg = presets.load("seed-data-parallel").with_overrides(overrides)
    steps = [e for e in Run(cfg).events() if isinstance(e, StepDone)]
    # Skip the first 10% (warm-up, the sampled first steps) as the bare loop has no start-up either.
    first, last = steps[len(steps) // 10], steps[-1]
    return (last.step - first.step) / (last.host_s - first.host_s)  # the host's time, not the modelled GPU's


def sampled_step_cost(overrides: dict) -> tuple[float, float, int]:
    """(median host ms of a sampled step, of an unsampled one, sampled steps) in one run."""
    from paralab.core.events import PhaseSpan

    cfg = presets.load("seed-data-parallel").with_overrides(overrides)
    events = list(Run(cfg).events())
    done = {e.step: e.host_s for e in events if isinstance(e, StepDone)}
    sampled = {e.step for e in events if isinstance(e, PhaseSpan) and e.clock == "host"}
    took = {s: done[s] - done[s - 1] for s in done if s - 1 in done and s > 3}  # past the first, sampled, steps
    on = [1e3 * t for s, t in took.items() if s in sampled]
    off = [1e3 * t for s, t in took.items() if s not in sampled]
    return statistics.median(on), statistics.median(off), len(on)


def loop_machinery_us(steps: int = 200_000) -> float:
    """Microseconds per step of paralab's rank loop around a step that does nothing."""
    import multiprocessing as mp

    from paralab.core import worker
    from paralab.core.devices import resolve
    from paralab.core.memory import MemoryLedger
    from paralab.core.parallel import Trainer

    class Nowhere:
        def send(self, _message) -> None:
            pass

    cfg = presets.load("seed-data-parallel").with_overrides(
        {"mode": "single", "devices": "sim:1", "train.steps": steps})
    devices = resolve("sim:1", cfg.sim.memory)
    job = worker.RankJob(cfg.to_dict(), devices, 0, 1, time.perf_counter(), 1)
    ctx = worker.RankContext(job, cfg, devices, MemoryLedger(devices))
    probe = worker.Probe(ctx)
    shared = mp.RawArray("d", 3)
    shared[worker.LR] = cfg.train.lr
    loss = torch.tensor(1.0)

    def step(_i, p):
        with p.phase(0, "forward"):
            pass
        with p.phase(0, "backward"):
            pass
        with p.phase(0, "optimizer"):
            pass
        return loss

    best = float("inf")
    for _ in range(3):
        control = worker.Control(shared, 1, cfg.train.lr, cfg.telemetry.interval_s)
        start = time.perf_counter()
        worker._loop(ctx, Trainer(step, []), probe, control, Nowhere(), worker.Heartbeat(0, Nowhere(), 1))
        best = min(best, (time.perf_counter() - start) / steps * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="single,ddp", help="modes for the instrumented/uninstrumented part")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    assert loss_fn  # the bare loop uses the seed's own criterion; paralab uses models.loss_fn (MSE)

    base = {"mode": "single", "devices": "sim:1", "train.steps": args.steps}
    ratios, bare_all, ours_all = [], [], []
    for _ in range(args.repeats):
        bare = bare_seed_loop(args.steps)
        ours = paralab_steps_per_s(base)
        bare_all.append(bare)
        ours_all.append(ours)
        ratios.append(ours / bare)
    print(f"seed loop (bare)        best {max(bare_all):6.0f} steps/s   median {statistics.median(bare_all):6.0f}")
    print(f"paralab run (single)    best {max(ours_all):6.0f} steps/s   median {statistics.median(ours_all):6.0f}")
    print(f"ratio paralab / bare    {max(ours_all) / max(bare_all):.3f} (best/best; target >= 0.95)   "
          "pairwise: " + ", ".join(f"{r:.3f}" for r in ratios))
    machinery = loop_machinery_us()
    seed_us = 1e6 / max(bare_all)
    print(f"paralab's loop itself   {machinery:.1f} us per step = {machinery / seed_us:.1%} of the seed's "
          f"{seed_us:.0f} us step (ratio {seed_us / (seed_us + machinery):.3f} without the machine's noise)")

    for mode in args.modes.split(","):
        devices = "sim:1" if mode == "single" else "sim:2"
        # Multi-process steps are slower (an all-reduce each): fewer of them take as long.
        steps = args.steps if mode == "single" else max(args.steps // 5, 500)
        cfg = dict(base, mode=mode, devices=devices, **{"train.steps": steps})
        plain, instrumented = [], []
        for _ in range(args.repeats):
            plain.append(paralab_steps_per_s(dict(cfg, **{"telemetry.interval_s": 3600.0})))  # the longest allowed
            instrumented.append(paralab_steps_per_s(cfg))
        print(f"instrumented / uninstrumented ({mode}, {devices})  {max(instrumented) / max(plain):.3f} "
              f"(best/best; target >= 0.97; {max(instrumented):.0f} vs {max(plain):.0f} steps/s)   pairwise: "
              + ", ".join(f"{i / p:.3f}" for i, p in zip(instrumented, plain)))

    mlp = {"model.kind": "mlp", "model.width": 256, "model.depth": 4, "model.in_features": 32,
           "model.out_features": 8, "data.kind": "auto", "train.batch_size": 256, "train.steps": 2000}
    for label, settings in (("seed regression", {}), ("mlp width 256", mlp)):
        for mode, devices in (("single", "sim:1"), ("ddp", "sim:2")):
            on, off, n = sampled_step_cost({**base, **settings, "mode": mode, "devices": devices,
                                            "train.steps": settings.get("train.steps", args.steps // 4)})
            print(f"sampled step ({label}, {mode}, {devices})  {on:.2f} ms against {off:.3f} ms unsampled "
                  f"({n} sampled steps, 4 Hz)")


if __name__ == "__main__":
    main()
