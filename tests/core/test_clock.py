"""Simulated devices keep a GPU's time: modelled spans, step times and utilization.

Checked against what does not come from paralab: the roofline of torch's own FLOP count
(6·N·B for a matmul-dominated step), the pipeline bubble formula (p-1)/(m+p-1), the
bytes of the gradients DDP must all-reduce, and the determinism the model promises
(the host's load must not move a modelled figure).
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
from paralab.core.clock import collective_seconds
from paralab.core.config import RunConfig
from paralab.core.events import PhaseSpan, RunStarted, StepDone, UtilizationSample
from paralab.core.gpus import gpu_models
from paralab.core.models import build_model, count_params
from paralab.core.spans import bubble, ideal_bubble

from tests.helpers import ended, run_events

pytestmark = pytest.mark.usefixtures("no_leftover_ranks")

H100 = gpu_models()["H100 SXM"]
MLP = {"model.kind": "mlp", "model.width": 256, "model.depth": 2, "train.batch_size": 64, "train.steps": 3}


def run(settings: dict, **extra) -> list:
    cfg = RunConfig().with_overrides({**settings, **{k.replace("__", "."): v for k, v in extra.items()}})
    events = run_events(cfg)
    assert ended(events).status == "ok", ended(events).message
    return events


def modelled(events: list, step: int | None = None) -> list[PhaseSpan]:
    return [e for e in events if isinstance(e, PhaseSpan) and e.clock == "modelled" and step in (None, e.step)]


def step_seconds(events: list) -> list[float]:
    times = [e.time_s for e in events if isinstance(e, StepDone)]
    return [b - a for a, b in zip([0.0, *times], times)]


def test_the_start_names_the_clock_and_the_gpu():
    events = run(MLP, mode="ddp", devices="sim:2", sim__gpu="A100 80GB")
    start = next(e for e in events if isinstance(e, RunStarted))
    assert start.clock == "modelled: 2 × A100 80GB over NVLink 3" and start.gpu["bf16_tflops"] == 312.0
    host = run(MLP, mode="single", devices="sim:1", sim__gpu="host")
    assert next(e for e in host if isinstance(e, RunStarted)).clock == "host" and not modelled(host)


def test_alpha_beta_costs_follow_nccl_tests():
    s, n = 2**30, 8
    beta, alpha = 1 / (H100.link_gbs * 1e9), H100.link_latency_us * 1e-6
    assert collective_seconds("all-reduce", s, n, H100) == pytest.approx(2 * 7 / 8 * s * beta + 14 * alpha)
    assert collective_seconds("all-gather", s, n, H100) == pytest.approx(7 / 8 * s * beta + 7 * alpha)
    assert collective_seconds("send", s, 2, H100) == pytest.approx(s * beta + alpha)


@pytest.mark.slow
def test_matmul_dominated_step_is_6NB_over_peak():
    """Forward 2·N·B FLOPs, backward 4·N·B; SGD without momentum adds one pass over the
    weights (2% at this batch), and the ReLUs, residual adds and loss are memory-bound
    passes over the activations (about 5% at this width).  Launch costs: ~40 kernels ×
    2.5 µs, about 1%."""
    settings = {"model.kind": "mlp", "model.width": 2048, "model.depth": 2, "model.in_features": 2048,
                "model.out_features": 2048, "train.batch_size": 2048, "train.steps": 2,
                "train.optimizer": "sgd", "data.samples": 2048}
    events = run(settings, mode="single", devices="sim:1")
    n = count_params(build_model(RunConfig().with_overrides(settings).model, 0, device="meta"))
    ideal = 6 * n * 2048 / (H100.fp32_tflops * 1e12)
    got = step_seconds(events)[-1]
    assert abs(got - ideal) / ideal < 0.10, (got, ideal)


def _hog(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def test_modelled_step_times_do_not_move_with_the_hosts_load():
    quiet = step_seconds(run(MLP, mode="ddp", devices="sim:2"))
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    hogs = [ctx.Process(target=_hog, args=(stop,)) for _ in range(os.cpu_count() or 2)]
    for h in hogs:
        h.start()
    try:
        loaded = step_seconds(run(MLP, mode="ddp", devices="sim:2"))
    finally:
        stop.set()
        for h in hogs:
            h.join()
    for a, b in zip(quiet[1:], loaded[1:]):
        assert abs(a - b) <= 0.005 * a, (quiet, loaded)


def test_ddp_all_reduces_the_gradients_while_backward_runs():
    events = run(MLP, mode="ddp", devices="sim:4")
    params = count_params(build_model(RunConfig().with_overrides(MLP).model, 0, device="meta")) * 4
    step = modelled(events, 3)
    for d in range(4):
        comm = [s for s in step if s.device == d and s.phase == "communication"]
        assert {s.name for s in comm} == {"all-reduce"} and sum(s.bytes for s in comm) == params
        backward = [s for s in step if s.device == d and s.phase == "backward"]
        # At least one bucket is reduced while backward still computes: they overlap.
        assert any(c.start_s < b.end_s and b.start_s < c.end_s for c in comm for b in backward)
    compute = sum(s.end_s - s.start_s for s in step if s.device == 0 and s.phase in ("forward", "backward", "optimizer"))
    comm = sum(s.end_s - s.start_s for s in step if s.device == 0 and s.phase == "communication")
    assert step_seconds(events)[-1] < compute + comm
    # The figures shown beside it, from those same spans and nccl-tests' bus factor.
    util = [e for e in events if isinstance(e, UtilizationSample) and e.source == "modelled" and e.device == 0][-1]
    hidden = sum(max(0.0, min(c.end_s, b.end_s) - max(c.start_s, b.start_s))
                 for c in step if c.device == 0 and c.phase == "communication"
                 for b in step if b.device == 0 and b.phase in ("forward", "backward", "optimizer"))
    assert 0 < util.extra["overlap"] <= 1
    assert util.extra["overlap"] == pytest.approx(hidden / comm, rel=1e-6)
    assert util.extra["comm_bytes"] == params
    assert util.extra["busbw_gbs"] == pytest.approx(params * 2 * 3 / 4 / comm / 1e9, rel=1e-6)
    flops = 6 * params / 4 * MLP["train.batch_size"] / 4  # 6·N·B over this device's quarter batch
    assert 0.5 * flops < util.extra["flops"] < 2 * flops
    assert util.extra["mfu"] == pytest.approx(util.extra["flops"] / (util.extra["step_s"] * H100.fp32_tflops * 1e12))


def idle_shares(spans: dict[int, list[tuple[str, float, float]]]) -> list[float]:
    """Each device's idle share of the step's forward/backward window."""
    shares = bubble(PhaseSpan(d, ph, s, e, 0) for d, sp in spans.items() for ph, s, e in sp)
    return [shares[d] for d in sorted(spans)]


@pytest.mark.slow
@pytest.mark.parametrize("p,schedule", [(2, "gpipe"), (2, "1f1b"), (4, "gpipe"), (4, "1f1b")])
def test_compute_bound_micro_batches_leave_the_bubble_the_formula_says(p, schedule):
    """The issue's acceptance.  (p-1)/(m+p-1) assumes every micro-batch takes a stage the
    same time and the end stages no longer than the others; micro-batches of 512 to 4096
    rows of a 4096-wide MLP are compute-bound on an H100, as pipelined training is, and
    there it holds within 2 points.  (With a few rows a stage is memory-bound: adding each
    later micro-batch's weight gradients into .grad then costs more than its matmuls, and
    the first micro-batch, which does not add, is faster; the small test below shows it.)
    Timed from the estimate's trace on fake tensors, which lays a step out exactly as a run
    does (test_estimate checks the two agree, pipeline included)."""
    from paralab.core.estimate import estimate

    shares = []
    for m in [m for m in (1, 2, 4, 8) if schedule == "gpipe" or m >= p]:  # 1F1B needs m >= p
        cfg = RunConfig().with_overrides({**_balanced(p, schedule), "model.width": 4096, "train.batch_size": 4096,
                                          "train.micro_batches": m, "sim.memory": "80GiB"})
        shares.append(idle_shares({d.device: d.modelled["spans"] for d in estimate(cfg, "trace").devices}))
        for share in shares[-1]:
            assert abs(share - ideal_bubble(p, m)) < 0.02, (m, shares[-1], ideal_bubble(p, m))
    for d in range(p):
        assert all(a[d] > b[d] for a, b in zip(shares, shares[1:])), shares


def _balanced(p: int, schedule: str) -> dict:
    """One residual block per stage; the first and last add the cheap 8-wide ends."""
    return {"model.kind": "mlp", "model.depth": p, "model.in_features": 8, "model.out_features": 8,
            "train.steps": 2, "train.optimizer": "sgd", "placement.split": "2,2" if p == 2 else "2,1,1,2",
            "mode": "pipeline", "devices": f"sim:{p}", "train.schedule": schedule}


@pytest.mark.slow
@pytest.mark.parametrize("p,schedule", [(2, "gpipe"), (2, "1f1b"), (4, "gpipe"), (4, "1f1b")])
def test_the_bubble_shrinks_with_micro_batches_in_a_run(p, schedule):
    """The same stages run for real with 64 samples: micro-batches of 8 to 64 rows are
    memory-bound, so each later micro-batch's gradient accumulation makes it slower than
    the first and the end stages' small kernels weigh more; the bubble still shrinks
    strictly with m, and stays within 2.5 (p = 2) and 3.5 (p = 4) points of the formula."""
    settings = {**_balanced(p, schedule), "model.width": 4096, "train.batch_size": 64}
    shares = []
    for m in [m for m in (1, 2, 4, 8) if schedule == "gpipe" or m >= p]:
        step = modelled(run(settings, train__micro_batches=m), 2)
        shares.append(idle_shares({d: [(s.phase, s.start_s, s.end_s) for s in step if s.device == d]
                                   for d in range(p)}))
        for share in shares[-1]:
            assert -0.01 < share - ideal_bubble(p, m) < (0.025 if p == 2 else 0.035), (m, shares[-1], ideal_bubble(p, m))
    for d in range(p):
        assert all(a[d] > b[d] for a, b in zip(shares, shares[1:])), shares


def test_communication_shows_in_tensor_parallel_and_pipeline():
    tp = modelled(run(MLP, mode="tensor-parallel", devices="sim:2"), 3)
    assert {s.name for s in tp if s.phase == "communication"} == {"all-reduce"}
    pp = modelled(run(MLP, mode="pipeline", devices="sim:2", train__micro_batches=2), 3)
    assert {s.name for s in pp if s.phase == "communication"} == {"send", "recv"}


def test_data_parallel_replicas_run_side_by_side_and_model_parallel_takes_turns():
    dp = modelled(run(MLP, mode="data-parallel", devices="sim:2"), 3)
    fwd = {d: [s for s in dp if s.device == d and s.phase == "forward"] for d in (0, 1)}
    assert any(a.start_s < b.end_s and b.start_s < a.end_s for a in fwd[0] for b in fwd[1])
    # Model parallel: while one device computes forward or backward the other waits, so
    # their busy shares of that window add up to at most 100% (each then steps its own
    # optimizer, and those steps do overlap, as on two GPUs).
    mp = modelled(run(MLP, mode="model-parallel", devices="sim:2"), 3)
    start = min(s.start_s for s in mp)
    end = max(s.end_s for s in mp if s.phase == "backward")
    busy = sum(s.end_s - s.start_s for s in mp if s.phase in ("forward", "backward"))
    assert busy <= (end - start) * 1.000001, (busy, end - start)


@pytest.mark.slow
def test_ddp_on_eight_devices_trains_faster_than_on_two():
    settings = {"model.kind": "mlp", "model.width": 1024, "model.depth": 2, "train.batch_size": 512,
                "train.steps": 2, "mode": "ddp"}
    rate = {}
    for n in (2, 8):
        events = run(settings, devices=f"sim:{n}")
        rate[n] = [e.samples_per_s for e in events if isinstance(e, StepDone)][-1]
    assert rate[8] > rate[2], rate
