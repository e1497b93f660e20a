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

    multiprocessing's forkserver and resource tracker (helpers shared by all runs) are not ranks."""
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
    """Ranks are forked by the forkserver, so they carry its command line; the forkserver
    itself is the one whose parent is not a forkserver."""
    try:
        if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
            return False
        cmd = " ".join(p.cmdline())
        if "resource_tracker" in cmd:
            return False
        if "forkserver" in cmd:
            parent = p.parent()
            return parent is not None and "forkserver" in " ".join(parent.cmdline())
        return True
    except psutil.Error:
        return False
