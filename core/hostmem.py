"""Will a run fit in this machine's memory?  Checked before anything is built.

Simulated devices keep their tensors in host memory, and every rank generates the data
set on the host first, so sizes with no upper bound of their own (data.samples,
model.in_features, model.vocab, model.seq_len, train.batch_size) could exhaust the
machine long before a simulated device's capacity is reached.  This is a closed-form
estimate (no torch, no model built): a ceiling on what is plainly too much, not the
memory estimate of `paralab estimate`.
"""

from __future__ import annotations

from .config import RunConfig, human_bytes
from .modes import REGISTRY

FLOAT, LONG = 4, 8


def data_bytes(cfg: RunConfig) -> int:
    """A rank's data set while it is generated (with the temporaries of generation)."""
    from .data import DEFAULT_SAMPLES, data_kind, input_features, output_features

    m = cfg.model
    kind = data_kind(cfg.data, m)
    n = cfg.data.samples or DEFAULT_SAMPLES.get(kind, 0)
    d_in, d_out = input_features(m), output_features(m)
    per_sample = {
        "regression": (d_in + 3) * FLOAT,
        "constant-target": (d_in + d_out) * FLOAT,
        "teacher": (2 * d_in + 128 + 3 * d_out) * FLOAT,
        "tokens": (m.seq_len + 1) * LONG * 3,  # the sequences, then inputs and targets copied out
    }.get(kind, (d_in + d_out) * FLOAT)
    return n * per_sample


def param_count(cfg: RunConfig) -> int:
    m = cfg.model
    if m.kind == "linear":
        return 2
    if m.kind == "split-nn":
        return 10 * 50 + 50 + 50 * 20 + 20 + 21
    w = m.width
    if m.kind == "mlp":
        return m.in_features * w + w + m.depth * (4 * w * w + 3 * w) + w * m.out_features + m.out_features
    return 2 * m.vocab * w + m.seq_len * w + m.depth * 12 * w * w


def activation_bytes(cfg: RunConfig) -> int:
    """Activations of one step's global batch (saved for backward, with the logits)."""
    m, b = cfg.model, cfg.train.batch_size
    if m.kind == "transformer":
        return b * m.seq_len * ((16 * m.width + m.heads) * m.depth + 3 * m.vocab) * FLOAT
    if m.kind == "mlp":
        return b * (m.in_features + 3 * m.width * m.depth + 2 * m.out_features) * FLOAT
    return b * 64 * FLOAT


def needed(cfg: RunConfig, devices: int, sim: bool) -> tuple[int, str]:
    """(bytes, what they are) this run needs of the host at least."""
    ranks = REGISTRY[cfg.mode].world_size(devices) if cfg.mode in REGISTRY else 1
    data = data_bytes(cfg) * ranks
    if not sim:  # the model and activations live on the GPUs
        return data, f"the data set, {human_bytes(data)}"
    # The modes that split the batch hold a full copy of the model on every device.
    copies = devices if cfg.mode in REGISTRY and REGISTRY[cfg.mode].splits == "batch" else 1
    model = param_count(cfg) * FLOAT * 4 * copies  # weights, gradients, two optimizer moments
    acts = activation_bytes(cfg)
    return data + model + acts, (f"the data set {human_bytes(data)}, the model with its gradients and optimizer "
                                 f"{human_bytes(model)}, activations {human_bytes(acts)}")


def problem(cfg: RunConfig, devices: int, sim: bool, available: int | None = None) -> str:
    """A sentence when the run would not fit in the host's available memory, else ''."""
    if available is None:
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 -- no way to tell: let the run try
            return ""
    total, parts = needed(cfg, devices, sim)
    if total <= available:
        return ""
    return (f"this run needs about {human_bytes(total)} of this machine's memory ({parts}), but only "
            f"{human_bytes(available)} is free; use a smaller data.samples, model or train.batch_size")
