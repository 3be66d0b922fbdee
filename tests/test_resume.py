"""``simulate --resume DIR`` continues an interrupted run with the results an
uninterrupted run has (issue 15): a real SIGINT to a real process, then a resume,
compared with one run straight through; and the API under it
(:meth:`Simulation.save_state` / :meth:`Simulation.load_state`)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from protogalaxy.config import load_config
from protogalaxy.simulation import STATE_FILE, Simulation, StateError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
#: columns that depend on the clock, not on the computation
TIMING = {"aggregation_seconds", "round_seconds", "eval_seconds"}
CONFIG = {
    "clients": {"count": 10, "samples_per_client": 60},
    "galaxies": {"count": 2},
    "byzantine": {"fraction": 0.2, "attack": "sign_flip"},
    "training": {"rounds": 5, "momentum": 0.9},
    "defense": {"reputation": {"quarantine_below": 0.45}},
}


@pytest.fixture(scope="module", autouse=True)
def _mnist(mnist: object) -> None:
    """Skips without MNIST (the session fixture)."""


def cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT, **kw,  # type: ignore[call-overload]
    )  # fmt: skip


def metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return [
            {k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)
        ]


def same_run(a: Path, b: Path) -> None:
    assert metrics(a) == metrics(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in (
        "final_accuracy",
        "final_loss",
        "detection_rate",
        "false_positive_rate",
        "quarantined_clients",
        "byzantine_clients",
        "rounds",
    ):
        assert sa[key] == sb[key], key
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    ra, rb = (
        (json.loads((d / "reputation.json").read_text()) for d in (a, b))
        if (a / "reputation.json").exists()
        else ({}, {})
    )
    assert ra == rb


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    straight = tmp_path / "straight"
    proc = cli("simulate", "--config", str(config), "--out", str(straight))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (straight / STATE_FILE).exists()  # private keys do not outlive a run

    out = tmp_path / "cut"
    run = subprocess.Popen(
        [sys.executable, "-m", "protogalaxy.cli", "simulate", "--config", str(config),
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        csv_path = out / "metrics.csv"
        deadline = time.monotonic() + 300
        while not csv_path.exists() or len(csv_path.read_text().splitlines()) < 3:
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130, stderr
    assert f"protogalaxy simulate --resume {out}" in stdout
    done = json.loads((out / "summary.json").read_text())["rounds"]
    assert 2 <= done < 5
    state = out / STATE_FILE
    assert state.stat().st_mode & 0o077 == 0  # it holds every party's private key

    proc = cli("simulate", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"after round {done - 1}" in proc.stdout
    same_run(straight, out)
    assert not state.exists()
    # the audit trail is whole: one record per round, as in the straight run
    assert (out / "audit" / "log.bin").stat().st_size == (
        straight / "audit" / "log.bin"
    ).stat().st_size
    for name in ("evidence.jsonl", "receipts.jsonl"):
        lines = [(out / name).read_text().splitlines(),
                 (straight / name).read_text().splitlines()]  # fmt: skip
        assert len(lines[0]) == len(lines[1]), name


def test_the_api_saves_and_loads_mid_run(tmp_path: Path) -> None:
    """Saved after round 1, stopped after round 2 had published its artefacts (a
    run killed between the two): the resumed run drops round 2's and runs it
    again, so the audit trail is the straight run's."""
    from protogalaxy.artefacts import ArtefactWriter

    config = load_config(overrides={
        "clients.count": 10, "galaxies.count": 2, "clients.samples_per_client": 60,
        "byzantine.fraction": 0.2, "training.rounds": 4,
    })  # fmt: skip
    whole = Simulation(config, artefacts=ArtefactWriter(tmp_path / "whole")).run()

    class Stop(Exception):
        pass

    cut = tmp_path / "cut"
    sim = Simulation(config, artefacts=ArtefactWriter(cut))

    def stop_in_round_two(result: object) -> None:
        done = len(sim.result().rounds)
        if done == 2:
            sim.save_state(cut / STATE_FILE)
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        sim.run(after_round=stop_in_round_two)
    resumed = Simulation.load_state(cut / STATE_FILE, dataset=sim.data).run()
    strip = [
        {k: v for k, v in vars(r).items() if k not in TIMING} for r in whole.rounds
    ]
    again = [
        {k: v for k, v in vars(r).items() if k not in TIMING} for r in resumed.rounds
    ]
    assert again == strip
    assert resumed.reputation_history == whole.reputation_history
    assert resumed.removed_at_end == whole.removed_at_end
    for name in ("audit/log.bin", "receipts.jsonl", "evidence.jsonl"):
        a, b = tmp_path / "whole" / name, cut / name
        assert a.exists() == b.exists(), name
        if name.endswith(".jsonl") and a.exists():
            assert len(a.read_text().splitlines()) == len(b.read_text().splitlines())
        elif a.exists():
            assert a.stat().st_size == b.stat().st_size, name
    rounds = sorted(p.name for p in (cut / "audit" / "rounds").iterdir())
    assert rounds == sorted(p.name for p in (tmp_path / "whole/audit/rounds").iterdir())


def test_a_state_others_can_write_is_refused(tmp_path: Path) -> None:
    """A saved state is a pickle: loading one that someone else could have written
    would run their code. Refused before it is read."""
    config = load_config(overrides={
        "clients.count": 6, "galaxies.count": 2, "clients.samples_per_client": 30,
        "byzantine.fraction": 0.0, "defense.byzantine_fraction": 0.0,
        "training.rounds": 1,
    })  # fmt: skip
    sim = Simulation(config)
    path = tmp_path / "s.pkl"
    sim.save_state(path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    import pickle

    path.write_bytes(pickle.dumps(Payload()))
    for mode in (0o620, 0o602):
        path.chmod(mode)
        with pytest.raises(StateError, match="not yours alone"):
            Simulation.load_state(path)
    assert not marker.exists()


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path) -> None:
    proc = cli("simulate", "--resume", str(tmp_path))
    assert proc.returncode == 2 and "holds no saved state" in proc.stderr
    proc = cli("simulate", "--resume", str(tmp_path), "--seed", "3")
    assert proc.returncode == 2 and "drop --seed" in proc.stderr


def _interrupted(tmp_path: Path, name: str = "cut") -> Path:
    """A run stopped by SIGINT after two rounds (its state saved)."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / name
    run = subprocess.Popen(
        [sys.executable, "-m", "protogalaxy.cli", "simulate", "--config", str(config),
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while (
            not (out / STATE_FILE).exists()
            or len((out / "metrics.csv").read_text().splitlines()) < 3
        ):
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=120)
    finally:
        run.kill()
    return out


def test_what_a_resume_refuses_or_warns_about(tmp_path: Path) -> None:
    """Review findings: two processes on one run, a state from another run, a
    damaged state, an edited config.yaml."""
    import fcntl
    import shutil

    out = _interrupted(tmp_path)
    # another process holds the run: refused, nothing written
    with open(out / ".protogalaxy.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = (out / "receipts.jsonl").read_bytes()
        busy = cli("simulate", "--resume", str(out))
        assert busy.returncode == 2 and "another protogalaxy process" in busy.stderr
        assert (out / "receipts.jsonl").read_bytes() == before
    # a state saved in another run: refused before anything is written
    other = _interrupted(tmp_path, "other")
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copy2(other / STATE_FILE, mixed / STATE_FILE)
    proc = cli("simulate", "--resume", str(mixed))
    assert (
        proc.returncode == 2 and "resumes only the run it was saved in" in proc.stderr
    )
    # damaged states: a clear error, no traceback
    for blob in (b"", b"\x80\x05garbage", b"\x80\x05N."):
        (mixed / STATE_FILE).write_bytes(blob)
        (mixed / STATE_FILE).chmod(0o600)
        proc = cli("simulate", "--resume", str(mixed))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    # an edited config.yaml is named, and the run goes on as configured
    recorded = out / "config.yaml"
    edited = yaml.safe_load(recorded.read_text())
    edited["training"]["rounds"] = 3
    recorded.write_text(yaml.safe_dump(edited))
    proc = cli("simulate", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "differs from the configuration" in proc.stderr
    assert json.loads((out / "summary.json").read_text())["rounds"] == 5


def test_overwrite_takes_a_killed_runs_leftovers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    for name in (".state.pkl.tmp", ".metrics.csv.tmp", ".protogalaxy.lock",
                 "metrics.csv"):  # fmt: skip
        (out / name).write_text("x")
    from protogalaxy.report import prepare_out

    prepare_out(out, overwrite=True)
    assert list(out.iterdir()) == []
