"""RunConfig: TOML round trip, --set overrides with type checks, validation sentences."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paralab.core import validation
from paralab.core.config import Bytes, ConfigError, RunConfig, field_docs, keys


def test_defaults_are_valid():
    assert validation.problems(RunConfig(devices="sim:1")) == []


def test_toml_round_trip(tmp_path):
    cfg = RunConfig(mode="pipeline", devices="sim:2").with_overrides(
        ["train.lr=0.003", "placement.split=2,4", "sim.memory=512MiB", "model.kind=transformer"])
    path = tmp_path / "c.toml"
    cfg.save(path)
    assert RunConfig.load(path) == cfg


def test_set_converts_types():
    cfg = RunConfig().with_overrides(["train.steps=7", "train.lr=1e-3", "placement.reshard_after_forward=false",
                                      "sim.memory=24GiB", "placement.split=1,2"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3
    assert cfg.placement.reshard_after_forward is False
    assert cfg.sim.memory == 24 * 2**30 and cfg.placement.split == (1, 2)


@pytest.mark.parametrize("assignment, words", [
    ("train.lr=abc", "train.lr must be a number"),
    ("train.steps=2.5", "train.steps must be a whole number"),
    ("nope=1", "unknown setting 'nope'"),
    ("train=1", "is a section"),
    ("sim.memory=lots", "memory size"),
    ("train.lr", "KEY=VALUE"),
])
def test_set_refuses_with_a_sentence(assignment, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig().with_overrides([assignment])


def test_malformed_toml_is_a_config_error():
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.loads('mode = "single\n')
    with pytest.raises(ConfigError, match="unknown setting 'train.nope'"):
        RunConfig.loads("[train]\nnope = 1\n")


@pytest.mark.parametrize("overrides, words", [
    ({"train.batch_size": 0}, "train.batch_size must be at least 1"),
    ({"mode": "nope"}, "mode 'nope' is not one of"),
    ({"devices": "cuda:7"}, "there is no GPU cuda:7"),
    ({"devices": "tpu:3"}, "is not a device spec"),
    ({"mode": "ddp", "devices": "sim:4", "train.batch_size": 30}, "batch size 30 does not split over 4 devices"),
    ({"mode": "pipeline", "devices": "sim:4", "model.kind": "split-nn"}, "too few for 4 devices"),
    ({"mode": "pipeline", "devices": "sim:2", "train.batch_size": 10, "train.micro_batches": 4},
     "does not split into 4 micro-batches"),
    ({"mode": "tensor-parallel", "devices": "sim:2", "model.kind": "linear", "data.kind": "auto"},
     "tensor parallel needs layers wide enough"),
    ({"mode": "tensor-parallel", "devices": "sim:4", "model.kind": "transformer", "model.heads": 2,
      "model.width": 64}, "2 attention heads over 4 devices"),
    ({"mode": "model-parallel", "devices": "sim:2", "placement.split": "1,1"}, "places 2 layers"),
    ({"mode": "single", "devices": "sim:2"}, "mode single runs on one device"),
    ({"model.kind": "transformer", "data.kind": "regression"}, "does not fit model"),
])
def test_validate_explains(overrides, words):
    problems = validation.problems(RunConfig(devices="sim:1").with_overrides(overrides))
    assert any(words in p for p in problems), problems


@pytest.mark.parametrize("mode, ok", [("fsdp", False), ("pipeline", False), ("ddp", True), ("tensor-parallel", True)])
def test_shared_gpu_refuses_what_gloo_cannot_do_on_cuda(mode, ok):
    cfg = RunConfig(mode=mode, devices="cuda:0x2").with_overrides({"model.kind": "mlp"})
    problems = validation.problems(cfg, resolve_devices=False)
    assert (not any("share one GPU" in p for p in problems)) == ok, problems


def test_every_field_has_a_doc():
    docs = field_docs()
    assert set(docs) == set(keys())
    assert all(len(doc) > 10 for doc in docs.values()), [k for k, d in docs.items() if len(d) <= 10]


def test_bytes_parse():
    assert Bytes.parse("1.5GiB") == int(1.5 * 2**30)
    assert Bytes.parse("1000") == 1000
    with pytest.raises(ConfigError):
        Bytes.parse("-3GiB")


_values = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.sampled_from(["", "0", "-1", "1e309", "nan", "sim:0", "cuda:", "true", "1,0", "99GiB"]))


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(keys() + ["bogus", "train.bogus", ""]), value=_values)
def test_random_input_is_refused_with_a_sentence_or_accepted(key, value):
    """Whatever a person types, the answer is a config or sentences: never another exception."""
    try:
        cfg = RunConfig().with_overrides({key: value})
    except ConfigError as e:
        assert str(e) and "\n" not in str(e) and "Traceback" not in str(e)
        return
    problems = validation.problems(cfg, resolve_devices=True)
    assert all(isinstance(p, str) and p for p in problems)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=80))
def test_random_toml_never_crashes(text):
    try:
        RunConfig.loads(text)
    except ConfigError as e:
        assert str(e)
