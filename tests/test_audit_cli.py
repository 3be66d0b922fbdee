"""`protogalaxy audit RUN_DIR`: 0 on an untouched run, non-zero naming the round and
the party for any byte changed, or record removed, in any kind of artefact."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from protogalaxy.artefacts import ArtefactWriter
from protogalaxy.auditor import audit_run
from protogalaxy.config import load_config
from protogalaxy.learning.datasets import load_dataset
from protogalaxy.simulation import Simulation


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three rounds, galaxy 1 dropping an acknowledged reveal from round 1 (so the
    run holds a misbehaviour and its proof too); every update kept."""
    root = tmp_path_factory.mktemp("run")
    config = load_config(
        overrides={
            "training.rounds": 3,
            "clients.samples_per_client": 200,
            "galaxy_attack.galaxy": 1,
            "galaxy_attack.kind": "drop",
            "galaxy_attack.from_round": 1,
            "audit.keep_updates": 3,
        }
    )
    sim = Simulation(
        config, dataset=load_dataset("mnist"), artefacts=ArtefactWriter(root)
    )
    sim.run()
    return root


def audit(path: Path) -> tuple[int, str]:
    lines: list[str] = []
    return audit_run(path, out=lines.append), "\n".join(lines)


def test_an_untouched_run_verifies_through_the_command(run_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "audit", str(run_dir)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round 1: ok" in done.stdout
    assert "galaxy 1 misbehaved (dropped_after_ack), proof verified" in done.stdout
    assert done.stdout.strip().endswith("replay verifies")
    key = (run_dir / "keys" / "global.pub").read_text().strip()
    pinned = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "audit", str(run_dir),
         "--global-key", "00" * 32],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert pinned.returncode == 1 and "pinned" in pinned.stdout
    assert audit_run(run_dir, global_key=key, out=lambda _: None) == 0


def kinds(root: Path) -> dict[str, Path]:
    r1 = root / "audit" / "rounds" / "000001"
    return {
        "transcript": r1 / "galaxy-0" / "transcript.json",
        "reputation states": r1 / "galaxy-2" / "reputation.json",
        "signed root": r1 / "galaxy-2" / "leaf.json",
        "aggregate statement": r1 / "galaxy-0" / "aggregate.json",
        "acknowledgements": r1 / "galaxy-0" / "acks.jsonl",
        "misbehaviour proof": r1 / "misbehaviour.jsonl",
        "evidence": root / "evidence.jsonl",
        "receipts": root / "receipts.jsonl",
        "audit log (heads and records)": root / "audit" / "log.bin",
        "stored update": next((root / "audit" / "updates" / "000001").rglob("*.pgt1")),
        "reference direction": r1 / "reference.pgt1",
    }


def mutated(run_dir: Path, tmp: Path, change: Callable[[Path], None]) -> Path:
    copy = tmp / f"run-{random.random():.9f}"
    shutil.copytree(run_dir, copy)
    change(copy)
    return copy


KINDS = [
    "transcript",
    "reputation states",
    "signed root",
    "aggregate statement",
    "acknowledgements",
    "misbehaviour proof",
    "evidence",
    "receipts",
    "audit log (heads and records)",
    "stored update",
    "reference direction",
]


@pytest.mark.parametrize("kind", KINDS)
def test_any_byte_changed_fails_naming_round_and_party(
    run_dir: Path, tmp_path: Path, kind: str
) -> None:
    rng = random.Random(kind)
    size = kinds(run_dir)[kind].stat().st_size
    for pos in sorted(rng.sample(range(size), min(4, size))):

        def flip(root: Path, pos: int = pos) -> None:
            path = kinds(root)[kind]
            data = bytearray(path.read_bytes())
            data[pos] ^= 0x01 if data[pos] not in (0x30, 0x31) else 0x03
            path.write_bytes(bytes(data))

        failures, text = audit(mutated(run_dir, tmp_path, flip))
        assert failures, f"{kind}: byte {pos} changed and the audit passed\n{text}"
        fail_lines = [line for line in text.splitlines() if line.startswith("FAIL")]
        assert any(
            ("round" in line and any(p in line for p in ("galaxy", "global", "client")))
            or ".json" in line
            or ".bin" in line
            or "line" in line
            for line in fail_lines
        ), text


@pytest.mark.parametrize(
    "kind",
    ["acknowledgements", "evidence", "receipts", "misbehaviour proof", "audit log"],
)
def test_a_removed_record_fails(run_dir: Path, tmp_path: Path, kind: str) -> None:
    def drop(root: Path) -> None:
        if kind == "audit log":  # the last round's record: truncate the log
            log = root / "audit" / "log.bin"
            data = log.read_bytes()
            import struct

            pos, last = 5, 5
            while pos < len(data):
                (n,) = struct.unpack_from("<I", data, pos)
                last, pos = pos, pos + 4 + n
            log.write_bytes(data[:last])
            return
        path = kinds(root)[kind]
        lines = path.read_text().splitlines(keepends=True)
        del lines[len(lines) // 2]
        path.write_text("".join(lines))

    failures, text = audit(mutated(run_dir, tmp_path, drop))
    assert failures, text


@pytest.mark.parametrize(
    "name",
    [
        "audit/rounds/000001/galaxy-0/transcript.json",
        "audit/rounds/000002/galaxy-2/acks.jsonl",
        "audit/updates/000002/galaxy-0",
    ],
)
def test_a_removed_file_fails(run_dir: Path, tmp_path: Path, name: str) -> None:
    def remove(root: Path) -> None:
        path = root / name
        if path.is_dir():
            victim = sorted(path.iterdir())[0]
            victim.unlink()
        else:
            path.unlink()

    failures, text = audit(mutated(run_dir, tmp_path, remove))
    assert failures and "round" in text, text


def _truncate_log_and_round(root: Path) -> None:
    """The last round cut off everywhere: its record, its files, its evidence."""
    import json
    import struct

    log = root / "audit" / "log.bin"
    data = log.read_bytes()
    pos, last = 5, 5
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        last, pos = pos, pos + 4 + n
    log.write_bytes(data[:last])
    final = sorted((root / "audit" / "rounds").iterdir())[-1]
    shutil.rmtree(final)
    shutil.rmtree(root / "audit" / "updates" / final.name, ignore_errors=True)
    for name in ("evidence.jsonl", "receipts.jsonl"):
        path = root / name
        keep = [
            line
            for line in path.read_text().splitlines(keepends=True)
            if json.loads(line).get("round") != int(final.name)
        ]
        path.write_text("".join(keep))


def _rewrite_json(path: Path, change: Callable[[dict], None]) -> None:
    import json

    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


DOCTORED: dict[str, Callable[[Path], None]] = {
    # (each found by an attack review: a traceback, or an exit 0)
    "a galaxy's key missing from the keyring": lambda root: (
        root / "keys" / "galaxies.pub"
    ).write_text(
        "".join(
            line
            for line in (root / "keys" / "galaxies.pub")
            .read_text()
            .splitlines(keepends=True)
            if not line.startswith("2,")
        )
    ),
    "a transcript's body emptied": lambda root: _rewrite_json(
        root / "audit/rounds/000001/galaxy-0/transcript.json",
        lambda t: t.update(body={}),
    ),
    "a reputation state made a list": lambda root: _rewrite_json(
        root / "audit/rounds/000001/galaxy-0/reputation.json",
        lambda s: s.update(after=[]),
    ),
    "the reference direction garbage": lambda root: (
        root / "audit/rounds/000001/reference.pgt1"
    ).write_bytes(b"PGT1garbage"),
    "the misbehaviour records not JSON": lambda root: (
        root / "audit/rounds/000001/misbehaviour.jsonl"
    ).write_text("{not json\n"),
    "every evidence record deleted": lambda root: (root / "evidence.jsonl").unlink(),
    "every kept update deleted": lambda root: shutil.rmtree(root / "audit/updates"),
    "the last round cut off everywhere": _truncate_log_and_round,
}


@pytest.mark.parametrize("case", list(DOCTORED))
def test_a_doctored_run_fails_cleanly(run_dir: Path, tmp_path: Path, case: str) -> None:
    """Through the command, with the global key pinned: non-zero, naming what
    failed, never a traceback and never an exit 0."""
    root = mutated(run_dir, tmp_path, DOCTORED[case])
    key = (run_dir / "keys" / "global.pub").read_text().strip()
    done = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "audit", str(root),
         "--global-key", key],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "FAIL" in output, output


def test_a_run_in_progress_is_audited_as_far_as_it_went(
    run_dir: Path, tmp_path: Path
) -> None:
    root = mutated(run_dir, tmp_path, _truncate_log_and_round)
    lines: list[str] = []
    assert audit_run(root, in_progress=True, out=lines.append) == 0, lines
    assert audit_run(root, out=lines.append) == 1
    assert "pass --in-progress" in lines[-2], lines


def _plant(run: Path, where: Path, key: str, value: str) -> Path:
    """Point run.json's config at a module planted beside the run (that would
    touch a marker if imported); the marker's path."""
    import json

    marker = where / "IMPORTED"
    pkg = where / "evilpkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nx = 1\n")
    meta = json.loads((run / "run.json").read_text())
    section, _, field = key.rpartition(".")
    node = meta["config"]
    for part in section.split(".") if section else []:
        node = node[part]
    node[field] = value
    (run / "run.json").write_text(json.dumps(meta))
    return marker


@pytest.mark.parametrize(
    "key", ["byzantine.attack", "defense.aggregator", "clients.partition",
            "dataset.name", ".model"],
)  # fmt: skip
def test_an_audit_imports_nothing_the_audited_run_names(
    run_dir: Path, tmp_path: Path, key: str
) -> None:
    """run.json is the audited party's own word: a module it names (planted in
    the directory the audit runs from) must not run, whatever the field."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    marker = _plant(run, tmp_path, key.lstrip("."), "evilpkg:x")
    done = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "audit", str(run)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert not marker.exists(), "the audit ran code the audited run named"
    assert done.returncode != 0  # the config no longer matches what was signed


def test_a_users_aggregation_rule_is_imported_only_when_allowed(
    tmp_path: Path,
) -> None:
    """A run whose layer 3 is a user's rule (by import path): the replay needs
    it, and the audit imports it only with --allow-imports."""
    root = tmp_path / "run"
    config = load_config(
        overrides={
            "training.rounds": 2, "clients.samples_per_client": 100,
            "defense.aggregator": "tests.test_examples:MedianOfThem",
        }
    )  # fmt: skip
    Simulation(config, dataset=load_dataset("mnist"),
               artefacts=ArtefactWriter(root)).run()  # fmt: skip
    refused = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "audit", str(root)],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert refused.returncode != 0
    assert "--allow-imports" in refused.stdout + refused.stderr
    allowed = subprocess.run(
        [sys.executable, "-m", "protogalaxy.cli", "audit", "--allow-imports",
         str(root)],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stdout[-2000:] + allowed.stderr[-2000:]


def test_an_unreadable_reference_blames_the_global_aggregator_alone(
    run_dir: Path, tmp_path: Path
) -> None:
    """reference.pgt1 is the global aggregator's to publish: garbage there names
    it, and each galaxy is held to its own signed transcript that round, so the
    next round does not blame the galaxies for states the audit never carried."""
    root = mutated(
        run_dir,
        tmp_path,
        lambda r: (r / "audit/rounds/000001/reference.pgt1").write_bytes(
            b"PGT1garbage"
        ),
    )
    failures, text = audit(root)
    fails = [line for line in text.splitlines() if line.startswith("FAIL")]
    assert failures and fails, text
    assert all("round 1 global" in line for line in fails), text
