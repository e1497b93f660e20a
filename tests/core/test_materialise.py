"""Sharded modes build on the meta device and materialise only their shards: the values
are build_model's, and a rank never holds the whole model while it fills them."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from paralab.core.config import RunConfig
from paralab.core.estimate import estimate
from paralab.core.models import build_model, stream_layers
from paralab.core.parallel import materialise

from tests.core.test_memory_truth import LiveBytes, fake_world

MLP = RunConfig().with_overrides({"model.kind": "mlp", "model.in_features": 32, "model.width": 256,
                                  "model.depth": 6, "model.out_features": 8})


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_streamed_layers_are_build_models_whatever_the_caller_draws(kind):
    cfg = MLP.with_overrides({"model.kind": kind, "model.width": 32, "model.depth": 2, "model.heads": 2,
                              "model.seq_len": 8, "model.vocab": 64})
    whole = build_model(cfg.model, 3)
    torch.manual_seed(0)
    for i, layer in stream_layers(cfg.model, 3):
        torch.rand(5)  # the caller's own draws do not shift the stream
        want, got = whole[i].state_dict(), layer.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), i
    after = torch.rand(1)  # and the stream does not shift the caller's
    torch.manual_seed(0)
    torch.rand(5 * len(whole))
    assert torch.equal(after, torch.rand(1))


def test_fsdp_materialises_its_shards_without_the_whole_model():
    """Rank 1 of a fake world, in a process that has just traced rank 0 of an estimate, as
    the app's prediction process does: DTensor caches shardings by meshes that compare equal
    across ranks, and the trace forgets what it cached (trace._forget_dtensor_shardings),
    or this rank would get rank 0's offsets and copy rank 0's rows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    estimate(MLP.with_overrides({"mode": "fsdp", "devices": "sim:2", "train.batch_size": 8}), method="trace")
    whole = build_model(MLP.model, MLP.seed)
    full_bytes = sum(p.numel() * 4 for p in whole.parameters())
    layer_bytes = max(sum(p.numel() * 4 for p in layer.parameters()) for layer in whole)
    with fake_world(1, 2):
        model = build_model(MLP.model, MLP.seed, device="meta")
        mesh = init_device_mesh("cpu", (2,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with LiveBytes() as counter:
            materialise(model, MLP, "cpu")
        shards = {name: p.to_local().clone() for name, p in model.named_parameters()}
        assert dist.get_rank() == 1
    held = sum(t.numel() * 4 for t in shards.values())
    assert held < 0.6 * full_bytes  # its half (dim 0 padded to even rows)
    # Its shards, plus one whole layer at a time (and that layer's slices on their way).
    assert counter.peak <= held + 2 * layer_bytes < full_bytes, (counter.peak, held, layer_bytes, full_bytes)
    for name, p in whole.named_parameters():
        rows = -(-p.shape[0] // 2)
        assert torch.equal(shards[name], p.detach()[rows:]), name  # rank 1: the second half of dim 0
