import pytest
import torch
from paralab.core.config import DataConfig, ModelConfig
from paralab.core.data import make_dataset
from paralab.core.models import (
    build_model,
    count_params,
    layer_names,
    loss_fn,
    num_layers,
    split_layers,
)

MODELS = [ModelConfig(kind="linear"), ModelConfig(kind="split-nn"),
          ModelConfig(kind="mlp", width=16, depth=2),
          ModelConfig(kind="transformer", width=16, depth=2, heads=2, seq_len=8, vocab=32)]


@pytest.mark.parametrize("cfg", MODELS, ids=lambda c: c.kind)
def test_model_is_a_function_of_the_seed(cfg):
    a, b, c = build_model(cfg, 1), build_model(cfg, 1), build_model(cfg, 2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert len(a) == num_layers(cfg) == len(layer_names(cfg))


@pytest.mark.parametrize("cfg", MODELS, ids=lambda c: c.kind)
def test_model_trains_on_its_data(cfg):
    data = make_dataset(DataConfig(), cfg, seed=0)
    model = build_model(cfg, 0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = data.batch(1, 16)
    first = None
    for _ in range(30):
        loss = loss_fn(cfg, model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first


def test_seed_shapes():
    split = build_model(ModelConfig(kind="split-nn"), 0)
    assert count_params(split) == (10 * 50 + 50) + (50 * 20 + 20) + (20 + 1)
    assert count_params(build_model(ModelConfig(kind="linear"), 0)) == 2


def test_seed_data():
    reg = make_dataset(DataConfig(kind="regression"), ModelConfig(kind="linear"), 0)
    assert len(reg) == 10_000 and reg.inputs.min() >= -5 and reg.inputs.max() < 5
    residual = reg.targets - 3 * reg.inputs
    assert abs(residual.std().item() - 0.5) < 0.02
    const = make_dataset(DataConfig(), ModelConfig(kind="split-nn"), 0)
    assert const.inputs.shape == (100, 10) and torch.all(const.targets == 1)


def test_data_is_deterministic_and_cycles():
    cfg = ModelConfig(kind="transformer", seq_len=8, vocab=32)
    a, b = make_dataset(DataConfig(samples=10), cfg, 3), make_dataset(DataConfig(samples=10), cfg, 3)
    assert torch.equal(a.batch(5, 4)[0], b.batch(5, 4)[0])
    x1, _ = a.batch(1, 4)
    x4, _ = a.batch(4, 4)  # samples 12..15 wrap to 2..5
    assert torch.equal(x4[:2], a.inputs[2:4])
    assert torch.equal(x1, a.inputs[:4])
    # Tokens follow a Markov chain: most next tokens are predictable.
    xs, ys = a.inputs, a.targets
    assert torch.equal(xs[:, 1:], ys[:, :-1])


def test_split_layers():
    assert [list(r) for r in split_layers(3, 2)] == [[0], [1, 2]]  # the seed's SplitNN
    assert [len(r) for r in split_layers(10, 4)] == [2, 2, 3, 3]
    assert [list(r) for r in split_layers(4, 2, (3, 1))] == [[0, 1, 2], [3]]


def test_rank_shards_make_up_the_global_batch():
    data = make_dataset(DataConfig(samples=10), ModelConfig(kind="mlp", in_features=3), 0)
    for step in (1, 4):
        x, y = data.batch(step, 8)
        parts = [data.shard(step, 8, r, 4) for r in range(4)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert parts[1][0].untyped_storage().nbytes() == 2 * 3 * 4  # a rank holds only its share
