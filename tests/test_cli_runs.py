"""A simulate run never loses work (issue 15): its output directory is checked
before anything runs, every finished round is on disk as the run goes, and Ctrl-C
(a real SIGINT to a real process) leaves every finished round's outputs and the
model, and exits 130."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from protogalaxy.codec import decode_update
from protogalaxy.learning.models import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _mnist(mnist: object) -> None:
    """Skips without MNIST (the session fixture)."""


def tiny(tmp_path: Path, rounds: int) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "clients": {"count": 6, "samples_per_client": 50},
                "galaxies": {"count": 2},
                "byzantine": {"fraction": 0.0},
                "defense": {"byzantine_fraction": 0.0},
                "training": {"rounds": rounds},
            }
        )
    )
    return path


def simulate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_an_out_that_cannot_be_written_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        proc = simulate("--config", str(tiny(tmp_path, 2)), "--out", str(out))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: --out "), proc.stderr
        assert "Traceback" not in proc.stderr
        assert "round" not in proc.stdout  # nothing trained


def test_a_previous_run_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    config = str(tiny(tmp_path, 2))
    out = tmp_path / "run"
    assert simulate("--config", config, "--out", str(out)).returncode == 0
    first = (out / "run.json").read_text()
    again = simulate("--config", config, "--out", str(out))
    assert again.returncode == 2 and "previous run" in again.stderr, again.stderr
    assert (out / "run.json").read_text() == first  # untouched
    replaced = simulate("--config", config, "--out", str(out), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((out / "run.json").read_text())["run"] != json.loads(first)["run"]
    # --overwrite replaces a run, never a directory of other things.
    (out / "notes.txt").write_text("mine")
    other = simulate("--config", config, "--out", str(out), "--overwrite")
    assert other.returncode == 2 and "not a run" in other.stderr, other.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_ctrl_c_keeps_every_finished_round(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "protogalaxy.cli", "simulate",
            "--config", str(tiny(tmp_path, 500)), "--out", str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job ignores SIGINT; a user's terminal does not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        metrics = out / "metrics.csv"
        deadline = time.monotonic() + 240
        # rounds reach the disk while the run goes on
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 4:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted after" in stdout and str(out) in stdout
    done = json.loads((out / "summary.json").read_text())["rounds"]
    assert 3 <= done < 500
    assert len(metrics.read_text().splitlines()) == done + 1
    for name in ("accuracy.png", "reputation.png", "flags.png", "config.yaml"):
        assert (out / name).stat().st_size > 0, name
    # The model those rounds made, in both forms, loads into the configured model.
    state = torch.load(out / "model.pt")
    net = build_model("mnist_cnn")
    net.load_state_dict(state)
    pgt1 = decode_update((out / "model.pgt1").read_bytes())
    assert pgt1.keys() == state.keys()
    assert all(torch.equal(pgt1[k], state[k]) for k in state)


def run_in_a_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """``protogalaxy`` under a real pseudo-terminal (stdout and stderr): the exit
    status and everything it printed."""
    import os
    import pty
    import select

    main, sub = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "protogalaxy.cli", *args],
        stdin=sub,
        stdout=sub,
        stderr=sub,
        close_fds=True,
    )
    os.close(sub)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.5)
        if ready:
            try:
                data = os.read(main, 65536)
            except OSError:  # the terminal closed: the process is done
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(main)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_short_lines_and_the_files_keep_the_records(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "clients": {"count": 10, "samples_per_client": 100},
                "galaxies": {"count": 2},
                "byzantine": {"fraction": 0.2},
                "training": {"rounds": 12},
            }
        )
    )
    out = tmp_path / "run"
    code, printed = run_in_a_terminal(
        ["simulate", "--config", str(config), "--out", str(out)]
    )
    assert code == 0, printed
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", printed)  # the bars' redraws
    lines = [x for x in re.split(r"[\r\n]+", plain) if x.strip()]
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    # a bar across the rounds with an ETA, a bar through each round's steps
    assert any(x.startswith("rounds") and "12/12" in x for x in lines)
    assert any(x.startswith("round 5: training") and " eta " in x for x in lines)
    assert sum(x.startswith("round  11 (12/12)  accuracy") for x in lines) == 1
    quarantines = [line for line in lines if "client_quarantined" in line]
    assert quarantines and all(q.startswith("warning: ") for q in quarantines)
    assert not any(line.lstrip().startswith("{") for line in lines)
    # the whole records are in the run's evidence
    records = [
        json.loads(line) for line in (out / "evidence.jsonl").read_text().splitlines()
    ]
    assert any(r.get("event") == "client_quarantined" for r in records)
    # Off a terminal (kubectl logs, a pipe), stderr keeps the JSON lines.
    piped = simulate(
        "--config", str(config), "--out", str(tmp_path / "piped"), timeout=300
    )
    assert piped.returncode == 0
    assert "\x1b[" not in piped.stdout and "eta" not in piped.stdout  # no bars
    logged = [json.loads(x) for x in piped.stderr.splitlines() if x.startswith("{")]
    assert any(r.get("event") == "client_quarantined" for r in logged)


def test_a_runs_receipts_can_be_checked_by_hand(tmp_path: Path) -> None:
    """What a run writes is enough to try the verifiable part: a client's
    receipt from receipts.jsonl against the global key in keys/global.pub; a
    receipt changed by one byte fails."""
    out = tmp_path / "run"
    assert (
        simulate("--config", str(tiny(tmp_path, 2)), "--out", str(out)).returncode == 0
    )
    key = str(out / "keys" / "global.pub")

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "protogalaxy.cli", "verify-receipt", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = check(str(out), "--client", "3", "--round", "1", "--global-key", key)
    assert ok.returncode == 0 and ok.stdout.startswith("OK: client 3"), ok.stderr
    lines = (out / "receipts.jsonl").read_text().splitlines()
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text(
        "\n".join(line.replace('"leaf_index":0', '"leaf_index":1', 1) for line in lines)
    )
    bad = check(str(tampered), "--client", "0", "--round", "1", "--global-key", key)
    assert bad.returncode == 1 and bad.stdout.startswith("INVALID"), bad.stdout
    wrong_key = check(str(out), "--client", "3", "--global-key", str(out / "run.json"))
    assert wrong_key.returncode == 2 and "not a 64-hex-digit" in wrong_key.stderr


def test_bars_on_a_terminal_leave_a_redirected_stderr_its_records(
    tmp_path: Path,
) -> None:
    """stdout a terminal (the bars), stderr a file: the quarantine records go to
    the file as JSON lines, not onto the terminal (review finding)."""
    import os
    import pty
    import select

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "clients": {"count": 10, "samples_per_client": 100},
        "galaxies": {"count": 2}, "byzantine": {"fraction": 0.2},
        "training": {"rounds": 12},
    }))  # fmt: skip
    main, sub = pty.openpty()
    with open(tmp_path / "events.jsonl", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "protogalaxy.cli", "simulate", "--config",
             str(config), "--out", str(tmp_path / "run")],
            stdin=sub, stdout=sub, stderr=err, close_fds=True,
        )  # fmt: skip
        os.close(sub)
        shown = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    data = os.read(main, 65536)
                except OSError:
                    break
                if not data:
                    break
                shown.append(data)
            elif proc.poll() is not None:
                break
        os.close(main)
        assert proc.wait(timeout=30) == 0
    records = [
        json.loads(x)
        for x in (tmp_path / "events.jsonl").read_text().splitlines()
        if x.startswith("{")
    ]
    assert any(r.get("event") == "client_quarantined" for r in records)
    assert b"client_quarantined" not in b"".join(shown)


def test_a_closed_pipe_ends_the_run_without_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "protogalaxy.cli", "simulate", "--config",
         str(tiny(tmp_path, 50)), "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()  # the reader takes a line and leaves (`| head -1`)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in err
