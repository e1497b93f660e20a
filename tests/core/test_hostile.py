"""Hostile input (issue 14, items 10-13): every bad input is one sentence and exit 2, never a
traceback, and nothing is started for it.  CLI arguments and TOML files, run in-process."""

from __future__ import annotations

import os
import stat

import pytest
from paralab.core import validation
from paralab.core.cli import main
from paralab.core.config import MAX_SHOWN, ConfigError, RunConfig
from paralab.core.run import Run

BASE = ["run", "--set", "mode=single", "--set", "devices=sim:1", "--set", "model.kind=linear",
        "--set", "train.steps=2", "--quiet"]
LONG = "x" * 100_000


def _files(tmp: str) -> dict[str, str]:
    """name -> path of hostile config files."""
    out = {}

    def put(name: str, data: bytes) -> None:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        out[name] = path

    put("latin1", "name = \"caf\xe9\"\n".encode("latin-1"))
    put("binary", bytes(range(256)) * 4)
    put("nested-arrays", b"x = " + b"[" * 100_000)
    put("nested-tables", b"x = " + b"{a = " * 50_000)
    put("huge", b"# " + b"a" * (2 << 20) + b"\n")
    put("bad-toml", b"[train\nsteps = 3\n")
    put("long-value", f"mode = \"{LONG}\"\n".encode())
    put("long-key", f"{LONG} = 1\n".encode())
    put("seed-2**64", b"seed = 18446744073709551616\n")
    put("seed-2**64-1", b"seed = 18446744073709551615\n")
    put("table-not-value", b"model = 3\n")
    out["dev-zero"] = "/dev/zero"
    out["a-folder"] = tmp
    out["missing"] = os.path.join(tmp, "nope.toml")
    return out


SETS = [
    "seed=18446744073709551616", "seed=18446744073709551615", "seed=-1",
    "telemetry.interval_s=1e300", "telemetry.hang_timeout_s=1e300", "telemetry.interval_s=0",
    "data.samples=5000000000", "data.samples=10**9", ("model.kind=mlp", "model.in_features=100000000"),
    ("model.kind=transformer", "model.vocab=1000000000000"), ("model.kind=transformer", "model.seq_len=100000000"), "train.batch_size=1000000000000",
    "train.steps=100000000000000000000", "data.noise=1e308", f"mode={LONG}", f"{LONG}=1",
    f"train.lr={LONG}", f"devices={LONG}", "name=" + "n" * 20_000, "sim.memory=1e400",
    "train.lr=nan", "train.lr=inf", ("mode=model-parallel", "devices=sim:2", "placement.split=" + ",".join(["1"] * 10_000)), "model",
    "=", "train.lr", "mode=\x00", "seed=1e19", "train.steps=1.5",
]


def _cases(tmp_path) -> list[list[str]]:
    cases = [BASE + [a for x in ((s,) if isinstance(s, str) else s) for a in ("--set", x)] for s in SETS]
    cases += [["run", "--config", p, "--quiet"] for p in _files(str(tmp_path)).values()]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(stat.S_IRUSR | stat.S_IXUSR)
    for metrics in (str(tmp_path), "/dev/full", str(blocker / "under" / "x.jsonl"), "",
                    *([str(readonly / "x.jsonl")] if os.geteuid() != 0 else [])):  # root writes anywhere
        cases.append(BASE + ["--metrics", metrics])
    cases += [["run", "--preset", ""], ["run", "--preset", "../pyproject"], ["run", "--preset", "/etc/passwd"],
              ["run", "--preset", "../../resources/presets/seed-data-parallel"], ["run", "--preset", LONG],
              ["estimate", "--set", "seed=18446744073709551616"], ["run", "--listen", "x", "--ranks", "2"],
              ["run", "--ranks", "-1"]]
    return cases


def test_every_hostile_input_is_one_sentence_and_exit_2(tmp_path, capsys, monkeypatch):
    from paralab.core import run

    started = []
    monkeypatch.setattr(run, "prewarm", lambda: started.append("forkserver"))
    cases = _cases(tmp_path)
    refused, wrong = 0, []
    for argv in cases:
        code = main(argv)
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        clean = (code == 2 and lines and all(x.startswith("paralab: ") for x in lines)
                 and "Traceback" not in err and max(len(x) for x in lines) < 1200)
        if clean:
            refused += 1
        else:
            wrong.append((" ".join(a[:80] for a in argv[9:]), code, err[-300:]))
    print(f"hostile CLI inputs: {len(cases)} tried, {refused} refused cleanly")
    assert not wrong, wrong
    assert not started, "bad input started the forkserver"
    assert len(cases) >= 50


def test_hostile_toml_files_raise_config_error_only(tmp_path):
    files = _files(str(tmp_path))
    for name, path in files.items():
        try:
            cfg = RunConfig.load(path)
        except ConfigError as e:
            assert len(str(e)) < 1200 and "\n" not in str(e), name
            continue
        assert validation.problems(cfg), f"{name} should be refused by validation"


def test_a_bom_and_control_characters_round_trip(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbfmode = \"single\"\n")
    assert RunConfig.load(path).mode == "single"
    odd = RunConfig().with_overrides({"name": "tab\there\x01\x1f\x7f \"quoted\" back\\slash\nline"})
    odd.save(tmp_path / "odd.toml")
    assert RunConfig.load(tmp_path / "odd.toml") == odd


def test_long_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as e:
        RunConfig().with_overrides({"train.lr": LONG})
    assert len(str(e.value)) < 200 and "…" in str(e.value)
    assert all(len(p) < 400 for p in validation.problems(RunConfig().with_overrides({"mode": LONG})))
    assert MAX_SHOWN < 100


def test_host_memory_is_checked_before_anything_is_built():
    from paralab.core import hostmem

    cfg = RunConfig().with_overrides({"mode": "single", "devices": "sim:1", "data.samples": 5_000_000})
    assert "of this machine's memory" in hostmem.problem(cfg, 1, True, available=2**30)
    assert hostmem.problem(RunConfig(), 1, True, available=2**30) == ""
    big = cfg.with_overrides({"data.samples": 500_000_000_000})
    assert not validation.problems(big)  # an estimate may ask about it; a run may not start it
    with pytest.raises(ConfigError, match="of this machine's memory"):
        Run(big)


def test_ctrl_c_before_the_run_starts_is_exit_130(capsys, monkeypatch):
    from paralab.core import cli

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_config", interrupted)
    assert main(BASE) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stopped" in err
