"""Before any rank allocates: a run whose simulated devices cannot even hold what they
keep from step to step is refused with a sentence.

What a device keeps — its parameters, their gradients and the optimizer's state — is
known from the model's shapes (core.formula, on the meta device: nothing is allocated),
and a run that cannot hold it can never finish a step; building it would only fill the
host's memory (a simulated device lives in host RAM).  A run whose state fits but whose
peak inside a step does not is allowed to start: its first sampled step (steps 1-3 are
sampled) ends it `oom`, naming the phase, the operation and the category, which is the
lesson a person came to see; the prediction shown before the run says so too.
"""

from __future__ import annotations

from .config import RunConfig, human_bytes
from .devices import Device
from .formula import formula

STATE = ("params", "grads", "optimizer")


def cannot_hold(cfg: RunConfig, devices: list[Device]) -> str | None:
    """A sentence naming the first simulated device that cannot hold its state, or None."""
    sim = [d for d in devices if d.kind == "sim"]
    if not sim:
        return None
    for predicted in formula(cfg, devices):
        device = next((d for d in sim if d.index == predicted.device), None)
        if device is None:
            continue
        state = sum(predicted.bytes[c] for c in STATE)
        if state > device.capacity_bytes:
            need = human_bytes(state, exact_against=device.capacity_bytes)
            have = human_bytes(device.capacity_bytes, exact_against=state)
            return (f"{device.label} cannot hold this run: its parameters, gradients and optimizer state "
                    f"alone need {need} ({cfg.mode}) and it has {have} (sim.memory); use a smaller model, "
                    f"more devices in a sharded mode (fsdp, tensor-parallel, pipeline) or a larger sim.memory")
    return None
