"""The `paralab` command: exit statuses and what it leaves on disk."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from paralab.core.cli import main

SEED = ["run", "--preset", "seed-data-parallel", "--set", "mode=single", "--set", "devices=sim:1"]


@pytest.mark.parametrize("extra, words", [
    (["--set", "devices=cuda:7"], "there is no GPU cuda:7"),
    (["--set", "train.batch_size=0"], "train.batch_size must be at least 1"),
    (["--set", "mode=nope"], "mode 'nope' is not one of"),
    (["--set", "train.lr=abc"], "train.lr must be a number"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_input_exits_2_with_a_sentence(extra, words, capsys):
    assert main(SEED + extra) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_unknown_preset_and_bad_toml_exit_2(tmp_path, capsys):
    assert main(["run", "--preset", "no-such-preset"]) == 2
    assert "there is no preset 'no-such-preset'" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def _paralab(*args: str, **kw) -> subprocess.Popen:
    code = "import sys; from paralab.gui.entry import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_console_script_bad_input_has_no_traceback(tmp_path):
    p = _paralab("run", "--preset", "seed-data-parallel", "--set", "train.lr=abc")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert err.strip() == "paralab: train.lr must be a number, not 'abc'"


def test_run_writes_events_and_learns_the_seed_line(tmp_path, capsys):
    metrics = tmp_path / "out.jsonl"
    assert main(SEED + ["--set", "train.steps=300", "--metrics", str(metrics), "--quiet"]) == 0
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "end" and lines[-1]["status"] == "ok"
    steps = [x for x in lines if x["event"] == "step"]
    assert [s["step"] for s in steps] == list(range(1, 301))
    assert steps[0]["loss"] > 10 > steps[-1]["loss"]
    assert any(x["event"] == "memory" for x in lines)
    assert "learned y = " in capsys.readouterr().err


def _wait_for_line(path, event, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and f'"event":"{event}"' in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"no {event} event in {path}")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_cleanly(tmp_path, sig, code, no_leftover_ranks):
    metrics = tmp_path / "out.jsonl"
    p = _paralab(*SEED, "--set", "train.steps=10000000", "--metrics", str(metrics), start_new_session=True)
    _wait_for_line(metrics, "step")
    os.kill(p.pid, sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert lines[-1]["event"] == "end" and lines[-1]["status"] == "stopped"
    steps = [x["step"] for x in lines if x["event"] == "step"]
    assert steps == list(range(1, len(steps) + 1))  # nothing lost in between
    assert "Traceback" not in err


def test_devices_and_presets(capsys):
    assert main(["devices", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["auto"] == ["sim0", "sim1"] or info["gpus"]
    assert main(["presets"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names[:2] == ["seed-data-parallel", "seed-model-parallel"]


def test_progress_says_tokens_per_second_for_a_transformer():
    import io

    from paralab.core.cli import Progress
    from paralab.core.config import RunConfig
    from paralab.core.events import StepDone

    def line(cfg: RunConfig) -> str:
        progress, step = Progress(cfg, io.StringIO(), quiet=True), StepDone(2, 1.0, 0.5, 2000.0)
        progress.step(step)
        return progress.line(step, bar=False)

    gpt = RunConfig().with_overrides({"model.kind": "transformer", "model.seq_len": 32, "train.steps": 10})
    assert "2.0k samples/s 64.0k tokens/s" in line(gpt)
    assert "tokens/s" not in line(RunConfig())
