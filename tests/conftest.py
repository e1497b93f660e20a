import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import psutil  # noqa: E402
import pytest  # noqa: E402


def _has_cuda() -> bool:
    from paralab.core import nvml

    return bool(nvml.list_gpus())


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_leftover_ranks():
    """Fails the test if a rank process it started is still alive afterwards.

    Only ranks count: multiprocessing's forkserver and resource tracker and the app's
    prediction process are helpers that outlive a run on purpose."""
    yield
    me = psutil.Process()
    import time

    deadline = time.time() + 5
    while True:
        ranks = [p for p in me.children(recursive=True) if _is_rank(p)]
        if not ranks or time.time() > deadline:
            break
        time.sleep(0.1)
    assert not ranks, f"rank processes left behind: {[p.pid for p in ranks]}"


def _is_rank(p: psutil.Process) -> bool:
    """Ranks name themselves paralab-rankN (core.lifeline.name_process)."""
    try:
        return (p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                and p.name().startswith("paralab-rank"))
    except psutil.Error:
        return False
