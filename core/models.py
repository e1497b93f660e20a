"""The models paralab trains, each an nn.Sequential of *layers*.

A layer is the unit that model-parallel and pipeline place on a device, so every
model is a flat sequence: the seeds' models keep their own shape, the MLP and the
transformer put their input and output ends into the first and last layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class SeedLinear(nn.Module):
    """The data-parallel seed's SimpleNN: one Linear(1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class ResidualMLPBlock(nn.Module):
    """x + fc2(relu(fc1(x))): fc1 splits by columns and fc2 by rows under tensor parallel."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class TokenEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int, seq_len: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(seq_len, dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.tokens(idx) + self.positions(pos)


class Attention(nn.Module):
    """Causal self-attention.  Heads are counted from q's width at run time, so a
    column-split q/k/v (tensor parallel) simply runs its share of the heads."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        heads = q.shape[-1] // self.head_dim
        q, k, v = (z.view(b, t, heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class LMHead(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def build_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu") -> nn.Sequential:
    """The model for `cfg`, its weights a function of `seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            return _layers(cfg)


def _makers(cfg: ModelConfig) -> list[Callable[[], nn.Module]]:
    """How to make each layer, in the order build_model makes them (the order in which
    they draw from the seeded generator)."""
    if cfg.kind == "linear":
        return [SeedLinear]
    if cfg.kind == "split-nn":
        # The model-parallel seed's SplitNN: part1 = layer 0, part2 = layers 1 and 2.
        return [lambda: nn.Sequential(nn.Linear(10, 50), nn.ReLU()),
                lambda: nn.Sequential(nn.Linear(50, 20), nn.ReLU()),
                lambda: nn.Linear(20, 1)]
    if cfg.kind == "mlp":
        return [lambda: nn.Sequential(nn.Linear(cfg.in_features, cfg.width), nn.ReLU()),
                *(lambda: ResidualMLPBlock(cfg.width) for _ in range(cfg.depth)),
                lambda: nn.Linear(cfg.width, cfg.out_features)]
    if cfg.kind == "transformer":
        return [lambda: TokenEmbedding(cfg.vocab, cfg.width, cfg.seq_len),
                *(lambda: TransformerBlock(cfg.width, cfg.heads) for _ in range(cfg.depth)),
                lambda: LMHead(cfg.width, cfg.vocab)]
    raise ValueError(f"unknown model {cfg.kind!r}")


def _layers(cfg: ModelConfig) -> nn.Sequential:
    model = nn.Sequential(*(make() for make in _makers(cfg)))
    if cfg.kind == "transformer":
        _init_gpt(model, cfg.depth)
    return model


def stream_layers(cfg: ModelConfig, seed: int) -> Iterator[tuple[int, nn.Module]]:
    """build_model's layers one at a time, on the CPU, with the same values: a rank that
    holds a part of the model keeps only that, and at most one whole layer is alive at
    once.  The global generator is the caller's between layers."""
    makers, theirs = _makers(cfg), torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        if cfg.kind == "transformer":
            for make in makers:  # construction draws as build_model's does; GPT init redraws
                make()
        for i, make in enumerate(makers):
            if cfg.kind == "transformer":
                with torch.random.fork_rng(devices=[]):  # its buffers; its weights are drawn below
                    layer = make()
                _init_gpt(layer, cfg.depth, prefix=f"{i}.")
            else:
                layer = make()
            ours = torch.get_rng_state()
            torch.set_rng_state(theirs)
            yield i, layer
            theirs = torch.get_rng_state()
            torch.set_rng_state(ours)
    finally:
        torch.set_rng_state(theirs)


def _init_gpt(model: nn.Module, depth: int, prefix: str = "") -> None:
    for name, p in model.named_parameters(prefix=prefix.rstrip(".")):
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * depth) if name.endswith(("out.weight", "down.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def num_layers(cfg: ModelConfig) -> int:
    return {"linear": 1, "split-nn": 3}.get(cfg.kind, cfg.depth + 2)


def layer_names(cfg: ModelConfig) -> list[str]:
    """Human names of the layers, for the placement table."""
    if cfg.kind == "linear":
        return ["Linear(1, 1)"]
    if cfg.kind == "split-nn":
        return ["Linear(10, 50) + ReLU", "Linear(50, 20) + ReLU", "Linear(20, 1)"]
    if cfg.kind == "mlp":
        return ([f"Linear({cfg.in_features}, {cfg.width}) + ReLU"]
                + [f"residual block {i + 1}" for i in range(cfg.depth)]
                + [f"Linear({cfg.width}, {cfg.out_features})"])
    return ["embedding"] + [f"transformer block {i + 1}" for i in range(cfg.depth)] + ["norm + LM head"]


@dataclass(frozen=True)
class TensorSplit:
    """A pair of Linears tensor parallel cuts (Megatron): `columns` by their outputs (dim 0
    of weight and bias), then `rows` by its inputs (dim 1 of its weight; its bias whole),
    so only the pair's output needs an all-reduce.  Paths are build_model's (`3.fc1`)."""

    columns: tuple[str, ...]
    rows: str
    units: int
    """The outputs `columns` make, that the devices share out."""
    group: int = 1
    """Units that stay together (an attention head's dims)."""
    what: str = ""
    """The units in words, for the sentence that refuses a split."""
    fix: str = ""
    """What to change instead, with {n} for the device count."""

    @property
    def layers(self) -> set[int]:
        return {int(path.split(".")[0]) for path in (*self.columns, self.rows)}

    def dims(self) -> dict[str, int | None]:
        """Parameter name -> the dim it is cut along (None: kept whole)."""
        out: dict[str, int | None] = {}
        for path in self.columns:
            out[f"{path}.weight"] = out[f"{path}.bias"] = 0
        out[f"{self.rows}.weight"], out[f"{self.rows}.bias"] = 1, None
        return out


def tensor_splits(cfg: ModelConfig) -> list[TensorSplit]:
    """What tensor parallel cuts in this model: the one description the strategy, the
    formula and validation read.  The ends of the MLP and the transformer stay whole."""
    if cfg.kind == "split-nn":  # Linear(10, 50), ReLU, Linear(50, 20): an MLP block
        return [TensorSplit(("0.0",), "1.0", 50, what="SplitNN's 50 hidden units",
                            fix="a device count that divides 50 (2, 5 or 10)")]
    if cfg.kind == "mlp":
        return [TensorSplit((f"{i}.fc1",), f"{i}.fc2", 2 * cfg.width,
                            what=f"each MLP block's {2 * cfg.width} hidden units",
                            fix="a width whose double is a multiple of {n}") for i in range(1, cfg.depth + 1)]
    if cfg.kind == "transformer":
        out = []
        for i in range(1, cfg.depth + 1):
            # q, k, v by columns = whole heads per device (Attention counts its heads from q).
            out.append(TensorSplit((f"{i}.attn.q", f"{i}.attn.k", f"{i}.attn.v"), f"{i}.attn.out",
                                   cfg.heads, group=cfg.width // max(cfg.heads, 1),
                                   what=f"the {cfg.heads} attention heads",
                                   fix="a head count that is a multiple of {n}"))
            out.append(TensorSplit((f"{i}.ffn.up",), f"{i}.ffn.down", 4 * cfg.width,
                                   what=f"the {4 * cfg.width} feed-forward units",
                                   fix="a width that is a multiple of {n}"))
        return out
    return []


def loss_fn(cfg: ModelConfig, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if cfg.kind == "transformer":
        return F.cross_entropy(output.flatten(0, 1).float(), target.flatten())
    return F.mse_loss(output, target)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def split_layers(n_layers: int, n_devices: int, split: tuple[int, ...] = ()) -> list[range]:
    """Consecutive layer ranges per device: the given counts, or as even as can be with
    the extra layers on the last devices (3 layers on 2 devices: 1 | 2, as in the seed)."""
    extra = n_layers % n_devices
    counts = list(split) if split else [n_layers // n_devices + (i >= n_devices - extra) for i in range(n_devices)]
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges
