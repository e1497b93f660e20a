"""ddp, fsdp and tensor-parallel on simulated devices (one rank per device, gloo).

The test of a strategy: for the same seed and global batch it trains to the same loss
as `single`, step by step, and its memory by category shows what the mode shares and
what it splits.  Runs are cached per configuration so that the memory tests can compare
modes without training twice (2 CPU cores: every run counts).
"""

from __future__ import annotations

import functools
import math

import pytest
from paralab.core.config import RunConfig
from paralab.core.events import PhaseSpan
from paralab.core.models import build_model

from tests.helpers import adam_state_bytes, ended, losses, memory_by_device, run_events

pytestmark = pytest.mark.usefixtures("no_leftover_ranks")

STEPS = 20
MODELS = {
    "mlp": {"model.kind": "mlp", "model.width": 32, "model.depth": 2, "train.batch_size": 8},
    "transformer": {"model.kind": "transformer", "model.width": 32, "model.depth": 2, "model.heads": 2,
                    "model.seq_len": 16, "model.vocab": 64, "train.batch_size": 4},
    "split-nn": {"model.kind": "split-nn", "data.kind": "auto", "train.batch_size": 8},
}
FLOAT = 4  # bytes; every model here trains in float32


def config(model: str, mode: str, devices: str, extra: dict | None = None) -> RunConfig:
    """`extra`: more settings as {dotted key: value}."""
    return RunConfig().with_overrides({**MODELS[model], "mode": mode, "devices": devices,
                                       "train.steps": STEPS, **(extra or {})})


@functools.cache
def _run(cfg: RunConfig) -> tuple:
    return tuple(run_events(cfg))


def run(model: str, mode: str, devices: str = "sim:2", **extra) -> list:
    """The events of a run that ended well; `extra` as in run_events (train__steps=...)."""
    events = list(_run(config(model, mode, devices, {k.replace("__", "."): v for k, v in extra.items()})))
    end = ended(events)
    assert end.status == "ok", end.message
    return events


def single(model: str, **extra) -> list:
    return run(model, "single", "sim:1", **extra)


def assert_same_losses(events: list, reference: list) -> None:
    got, want = losses(events), losses(reference)
    assert len(got) == len(want) == STEPS
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert math.isclose(a, b, rel_tol=1e-4), f"step {step}: loss {a} vs single's {b}"


def held(events: list, n_devices: int) -> list[dict[str, int]]:
    """Bytes by category of each device's last memory sample."""
    samples = memory_by_device(events)
    assert sorted(samples) == list(range(n_devices))
    return [samples[d].bytes for d in range(n_devices)]


STATE = ("params", "grads", "optimizer")


# ---- every mode trains like single ---------------------------------------------------------------

CASES = {
    "mlp-ddp": ("mlp", "ddp", {}),
    "mlp-fsdp-reshard": ("mlp", "fsdp", {"placement__reshard_after_forward": True}),
    "mlp-fsdp-keep": ("mlp", "fsdp", {"placement__reshard_after_forward": False}),
    "mlp-tensor-parallel": ("mlp", "tensor-parallel", {}),
    "transformer-ddp": ("transformer", "ddp", {}),
    "transformer-fsdp": ("transformer", "fsdp", {}),
    "transformer-tensor-parallel": ("transformer", "tensor-parallel", {}),
    # The model-parallel seed: Linear(10, 50), ReLU, Linear(50, 20) is cut as an MLP block.
    "split-nn-tensor-parallel": ("split-nn", "tensor-parallel", {}),
}


@pytest.mark.parametrize(("model", "mode", "extra"), CASES.values(), ids=CASES.keys())
def test_loss_matches_single_step_by_step(model, mode, extra):
    assert_same_losses(run(model, mode, **extra), single(model))


# ---- memory: what each mode replicates and what it splits ----------------------------------------


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_ddp_replicates_params_grads_and_optimizer(model):
    ref = held(single(model), 1)[0]
    per_device = held(run(model, "ddp"), 2)
    for cat in STATE:
        assert ref[cat] > 0
        assert [b[cat] for b in per_device] == [ref[cat]] * 2, cat
    # Each device saves activations for its half of the batch only.
    assert all(b["activations"] < ref["activations"] for b in per_device)


def meta_model(model: str, extra: dict | None = None):
    return build_model(config(model, "single", "sim:1", extra).model, 0, device="meta")


def padded_shard_bytes(model: str, n: int, extra: dict | None = None) -> int:
    """Bytes of one device's shards when FSDP pads dim 0 of every parameter to a multiple of n."""
    return sum(math.ceil(p.shape[0] / n) * (p.numel() // p.shape[0]) * FLOAT for p in meta_model(model, extra).parameters())


def assert_sharded(per_device: list[dict[str, int]], ref: dict[str, int], bound: int, tensors: int) -> None:
    """Each device holds about 1/n of single's params, grads and optimizer state: together at
    least all of it (the shards cover every parameter), each no more than the padded shard
    (FSDP pads dim 0 to a multiple of n so that the flat shards are equal; the optimizer's
    state follows the unpadded shard, so the last device may hold less). Adam's step counters
    are not sharded: every device keeps one per parameter tensor."""
    bounds = {"params": bound, "grads": bound, "optimizer": adam_state_bytes(bound, tensors)}
    for cat in STATE:
        values = [b[cat] for b in per_device]
        assert all(v <= bounds[cat] for v in values), (cat, values, bounds[cat])
        assert sum(values) >= ref[cat], (cat, values, ref[cat])


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_fsdp_shards_params_grads_and_optimizer(model):
    ref = held(single(model), 1)[0]
    per_device = held(run(model, "fsdp"), 2)
    bound = padded_shard_bytes(model, 2)
    assert bound == ref["params"] / 2  # every dim 0 here is even: the halves are exact
    assert_sharded(per_device, ref, bound, len(list(meta_model(model).parameters())))
    # The gathered full weights are working copies, counted while they live (see
    # test_memory_truth for the peak against torch's FSDPMemTracker).
    assert all(b["temporaries"] > 0 for b in per_device)


def test_fsdp_reshard_after_forward_frees_the_gathered_weights():
    full = held(single("mlp"), 1)[0]["params"]
    zero3 = held(run("mlp", "fsdp", placement__reshard_after_forward=True), 2)
    zero2 = held(run("mlp", "fsdp", placement__reshard_after_forward=False), 2)
    for kept, freed in zip(zero2, zero3):
        # Kept until backward, the gathered weights (temporaries: working copies) raise the
        # peak by up to the whole model; resharding gathers them again, one layer at a time.
        assert freed["temporaries"] < kept["temporaries"] <= freed["temporaries"] + full
        assert sum(kept.values()) > sum(freed.values())
        assert {c: kept[c] for c in STATE} == {c: freed[c] for c in STATE}


def test_fsdp_times_its_collectives():
    events = run("mlp", "fsdp", placement__reshard_after_forward=False)
    comm = [e for e in events if isinstance(e, PhaseSpan) and e.phase == "communication" and e.clock == "host"]
    assert {e.device for e in comm} == {0, 1}
    assert all(e.end_s >= e.start_s for e in comm)
    for device in (0, 1):
        # Kept after forward: each of the 4 layers is all-gathered once and reduce-scattered
        # once per sampled step (each rank picks its own sampled steps).
        spans = [e for e in comm if e.device == device]
        assert len(spans) == 8 * len({e.step for e in spans})


def test_ddp_times_its_all_reduce():
    events = run("mlp", "ddp")
    comm = [e for e in events if isinstance(e, PhaseSpan) and e.phase == "communication" and e.clock == "host"]
    backward = {(e.device, e.step): e for e in events if isinstance(e, PhaseSpan) and e.phase == "backward" and e.clock == "host"}
    assert {e.device for e in comm} == {0, 1}
    for e in comm:  # the all-reduce overlaps backward and ends before it does
        b = backward[(e.device, e.step)]
        assert b.start_s <= e.start_s <= e.end_s <= b.end_s


def tensor_parallel_bytes(model: str, n: int) -> int:
    """One device's parameter bytes under tensor parallel: the blocks' column-split Linears
    (weight and bias) and row-split weights hold 1/n; row-split biases and the ends are whole."""
    split = ("fc1.", "fc2.weight", "attn.q.", "attn.k.", "attn.v.", "attn.out.weight", "ffn.up.", "ffn.down.weight")
    net = build_model(config(model, "single", "sim:1").model, 0, device="meta")
    return sum(p.numel() * FLOAT // (n if any(s in name for s in split) else 1) for name, p in net.named_parameters())


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_tensor_parallel_splits_the_blocks(model):
    ref = held(single(model), 1)[0]
    per_device = held(run(model, "tensor-parallel"), 2)
    expected = tensor_parallel_bytes(model, 2)
    assert ref["params"] / 2 < expected < ref["params"]
    for b in per_device:
        assert b["params"] == b["grads"] == expected
        tensors = len(list(meta_model(model).parameters()))
        assert b["optimizer"] == adam_state_bytes(expected, tensors)


def test_tensor_parallel_cuts_the_split_nn_as_an_mlp_block():
    """Hand count on sim:2: Linear(10, 50) by columns (250 weights and 25 biases each),
    Linear(50, 20) by rows (500 weights each, its 20 biases whole), Linear(20, 1) whole."""
    per_device = (250 + 25 + 500 + 20 + 21) * FLOAT
    for b in held(run("split-nn", "tensor-parallel"), 2):
        assert b["params"] == b["grads"] == per_device


@pytest.mark.slow
def test_fsdp_on_four_devices_pads_the_shards():
    # 6 outputs: the last Linear's 6 rows do not split over 4 devices, so FSDP pads them to 8.
    extra = {"model__out_features": 6}
    ref_events = single("mlp", **extra)
    events = run("mlp", "fsdp", "sim:4", **extra)
    assert_same_losses(events, ref_events)
    ref = held(ref_events, 1)[0]
    bound = padded_shard_bytes("mlp", 4, {"model.out_features": 6})
    assert bound > ref["params"] / 4
    per_device = held(events, 4)
    assert_sharded(per_device, ref, bound, len(list(meta_model("mlp").parameters())))
    assert [b["params"] for b in per_device] == [bound] * 4  # each device stores the padded shard
