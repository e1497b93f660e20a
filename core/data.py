"""Synthetic data, seeded and reproducible.

`regression` and `constant-target` are the seeds' own data; `teacher` gives the MLP a
function worth learning; `tokens` are sequences from a random Markov chain, so a
transformer's loss falls well below log(vocab).  A data set is generated once; each
step takes the next global batch, cycling through it.
"""

from __future__ import annotations

import torch

from .config import DataConfig, ModelConfig

DEFAULT_SAMPLES = {"regression": 10_000, "constant-target": 100, "teacher": 4096, "tokens": 2048}


def data_kind(data: DataConfig, model: ModelConfig) -> str:
    if data.kind != "auto":
        return data.kind
    return {"linear": "regression", "split-nn": "constant-target", "mlp": "teacher", "transformer": "tokens"}[model.kind]


def input_features(model: ModelConfig) -> int:
    return {"linear": 1, "split-nn": 10}.get(model.kind, model.in_features)


def output_features(model: ModelConfig) -> int:
    return {"linear": 1, "split-nn": 1}.get(model.kind, model.out_features)


class Dataset:
    """A fixed synthetic data set; `batch(step, n)` is the global batch of a step."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of step `step` (1-based): the next `batch_size` samples, wrapping around."""
        n = len(self)
        if batch_size == n:
            return self.inputs, self.targets
        start = ((step - 1) * batch_size) % n
        idx = torch.arange(start, start + batch_size) % n
        return self.inputs[idx], self.targets[idx]

    def shard(self, step: int, batch_size: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `rank`'s equal share of step `step`'s global batch, loaded on its own (a
        copy, as a rank's data loader would make: no rank holds the whole batch)."""
        per_rank = batch_size // world
        n = len(self)
        start = ((step - 1) * batch_size + rank * per_rank) % n
        idx = torch.arange(start, start + per_rank, device=self.inputs.device) % n
        return self.inputs[idx], self.targets[idx]

    def to(self, device: str | torch.device) -> Dataset:
        return Dataset(self.inputs.to(device), self.targets.to(device))


def make_dataset(data: DataConfig, model: ModelConfig, seed: int) -> Dataset:
    kind = data_kind(data, model)
    n = data.samples or DEFAULT_SAMPLES[kind]
    g = torch.Generator().manual_seed(seed + 1_000_003)
    if kind == "regression":
        # The data-parallel seed: x in [-5, 5), y = 3x + N(0, noise^2).
        x = torch.rand(n, input_features(model), generator=g) * 10 - 5
        y = x[:, :1] * 3 + torch.randn(n, 1, generator=g) * data.noise
        return Dataset(x, y)
    if kind == "constant-target":
        # The model-parallel seed: uniform inputs, every target 1.
        return Dataset(torch.rand(n, input_features(model), generator=g), torch.ones(n, output_features(model)))
    if kind == "teacher":
        d_in, d_out = input_features(model), output_features(model)
        w1 = torch.randn(d_in, 64, generator=g) / d_in**0.5
        w2 = torch.randn(64, d_out, generator=g) / 8
        x = torch.randn(n, d_in, generator=g)
        y = torch.tanh(x @ w1) @ w2 + torch.randn(n, d_out, generator=g) * data.noise * 0.1
        return Dataset(x, y)
    if kind == "tokens":
        return _markov_tokens(n, model.seq_len, model.vocab, g)
    raise ValueError(f"unknown data {kind!r}")


def _markov_tokens(n: int, seq_len: int, vocab: int, g: torch.Generator) -> Dataset:
    """Each token follows from the last through a fixed random permutation, with 10% noise."""
    perm = torch.randperm(vocab, generator=g)
    seq = torch.empty(n, seq_len + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(1, seq_len + 1):
        noise = torch.rand(n, generator=g) < 0.1
        seq[:, t] = torch.where(noise, torch.randint(vocab, (n,), generator=g), perm[seq[:, t - 1]])
    return Dataset(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())
