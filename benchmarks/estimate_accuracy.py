"""How close is the memory estimate to what a run measures?

For every mode x {mlp, transformer} x {sim:2, sim:4}: predict each device's peak memory
(trace on fake tensors, and formula), run a few real steps, and compare with the peak
the run measured (the highest `peak_bytes` of its memory events).  A combination that
validation refuses is skipped, with the reason.  Target: the trace within 5% of the
measured peak on every simulated device; the exit status is 1 when it is not.

    python benchmarks/estimate_accuracy.py [--steps 5] [--modes ddp,fsdp] [--devices sim:2,sim:4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from paralab.core.config import MODES, RunConfig, human_bytes
from paralab.core.estimate import compare, estimate
from paralab.core.events import RunEnded
from paralab.core.run import Run

MODELS = {
    "mlp": {"model.kind": "mlp", "model.width": 64, "model.depth": 2, "train.batch_size": 16},
    "transformer": {"model.kind": "transformer", "model.width": 32, "model.depth": 2, "model.heads": 4,
                    "model.seq_len": 16, "model.vocab": 64, "train.batch_size": 16},
}
TARGET_PCT = 5.0


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}%"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--devices", default="sim:2,sim:4")
    args = p.parse_args()
    # FSDP and pipelining warn about views, here and in the ranks; not what this measures.
    warnings.simplefilter("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    header = (f"{'mode':16s} {'devices':7s} {'model':11s} {'device':6s} {'trace':>10s} {'formula':>10s} "
              f"{'measured':>10s} {'trace err':>9s} {'formula err':>11s}")
    print(header)
    print("-" * len(header))
    errors: list[float] = []
    worst_formula = 0.0
    for mode in args.modes.split(","):
        for devices in args.devices.split(","):
            for name, model in MODELS.items():
                cfg = RunConfig().with_overrides({"mode": mode, "devices": devices, "train.steps": args.steps, **model})
                problems = cfg.validate()
                if problems:
                    print(f"{mode:16s} {devices:7s} {name:11s} skipped: {'; '.join(problems)}")
                    continue
                start = time.perf_counter()
                predicted = estimate(cfg)
                took = time.perf_counter() - start
                events = list(Run(cfg).events())
                end = events[-1]
                if not isinstance(end, RunEnded) or end.status != "ok":
                    print(f"{mode:16s} {devices:7s} {name:11s} the run failed: {getattr(end, 'message', end)}")
                    errors.append(float("inf"))
                    continue
                for note in predicted.notes:
                    print(f"{mode:16s} {devices:7s} {name:11s} note: {note}")
                for r in compare(predicted, events):
                    size = lambda b: human_bytes(b) if b is not None else "-"  # noqa: E731
                    print(f"{mode:16s} {devices:7s} {name:11s} {r['label']:6s} {size(r['trace']):>10s} "
                          f"{size(r['formula']):>10s} {size(r['measured']):>10s} {pct(r['trace_error_pct']):>9s} "
                          f"{pct(r['formula_error_pct']):>11s}")
                    errors.append(abs(r["trace_error_pct"]) if r["trace_error_pct"] is not None else float("inf"))
                    if r["formula_error_pct"] is not None:
                        worst_formula = max(worst_formula, abs(r["formula_error_pct"]))
                print(f"{'':16s} {'':7s} {'':11s} (estimate took {took:.1f} s)")
    within = sum(e <= TARGET_PCT for e in errors)
    print(f"\ntrace within {TARGET_PCT:.0f}% of measured on {within} of {len(errors)} devices; "
          f"largest trace error {max(errors, default=0.0):.2f}%, largest formula error {worst_formula:.1f}%")
    return 0 if errors and within == len(errors) else 1


if __name__ == "__main__":
    sys.exit(main())
