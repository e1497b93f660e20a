import pytest
from paralab.core.devices import DeviceError, GpuInfo, parse_spec, resolve

GPUS = [GpuInfo(0, "H200", 141 * 2**30), GpuInfo(1, "H200", 141 * 2**30)]


@pytest.mark.parametrize("text, kind, count", [
    ("auto", "auto", 0), ("sim", "sim", 1), ("sim:4", "sim", 4), ("cuda:0,1", "cuda", 2),
    ("cuda:0x4", "cuda", 4), ("cuda", "cuda", 1), (" SIM:2 ", "sim", 2),
])
def test_parse(text, kind, count):
    spec = parse_spec(text)
    assert (spec.kind, spec.count) == (kind, count)


@pytest.mark.parametrize("text, words", [
    ("sim:0", "1 to 64"), ("cuda:0,0", "names a GPU twice"), ("gpu:1", "not a device spec"),
    ("sim:2,cuda:0", "cannot be mixed"), ("cuda:0x0", "shared by 1 to 16"),
])
def test_parse_refuses(text, words):
    with pytest.raises(DeviceError, match=words):
        parse_spec(text)


def test_resolve_sim_and_auto_without_gpu():
    devs = resolve("sim:3", 2**30, gpus=[])
    assert [d.label for d in devs] == ["sim0", "sim1", "sim2"]
    assert all(d.capacity_bytes == 2**30 and d.torch_device == "cpu" for d in devs)
    assert [d.kind for d in resolve("auto", 2**30, gpus=[])] == ["sim", "sim"]


def test_resolve_gpus():
    assert [d.torch_device for d in resolve("auto", 0, GPUS)] == ["cuda:0", "cuda:1"]
    shared = resolve("cuda:1x4", 0, GPUS)
    assert len(shared) == 4 and {d.gpu for d in shared} == {1}
    assert shared[0].capacity_bytes == GPUS[1].total_bytes // 4 and shared[0].share == 4
    assert [d.index for d in resolve("cuda:1,0", 0, GPUS)] == [0, 1]


def test_missing_gpu_is_a_sentence():
    with pytest.raises(DeviceError, match=r"no GPU cuda:7: this machine has 2 GPUs \(cuda:0, cuda:1\)"):
        resolve("cuda:7", 0, GPUS)
    with pytest.raises(DeviceError, match="no GPU that NVML can see"):
        resolve("cuda:0", 0, [])


def test_discovery_without_nvml_is_empty(monkeypatch):
    import builtins

    from paralab.core import nvml

    real_import = builtins.__import__

    def no_pynvml(name, *a, **k):
        if name == "pynvml":
            raise ImportError("no pynvml")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    nvml.reset_for_tests()
    try:
        assert nvml.list_gpus() == []
        assert "nvidia-ml-py" in nvml.unavailable_reason()
    finally:
        monkeypatch.undo()
        nvml.reset_for_tests()
