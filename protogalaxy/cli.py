"""The ``protogalaxy`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protogalaxy import __version__

if TYPE_CHECKING:
    from protogalaxy.config import SimulationConfig


def _verify_receipt(args: argparse.Namespace) -> int:
    from protogalaxy.crypto import VerificationError, VerifyKey, verify_receipt

    try:
        given = args.global_key.strip()
        if not all(ch in "0123456789abcdefABCDEF" for ch in given):
            given = Path(given).read_text().strip()  # a file holding the hex key
        try:
            key = VerifyKey.from_bytes(bytes.fromhex(given))
        except ValueError:
            raise ValueError(
                f"--global-key {args.global_key}: not a 64-hex-digit public key or "
                "a file holding one (a run's keys/global.pub)"
            ) from None
        receipt = _one_receipt(Path(args.receipt), args.client, args.round)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Without --run the receipt is checked as a receipt of the run its head names
    # (printed below); with --run it must be that run's.
    run = args.run or receipt.head.head.run
    try:
        verify_receipt(receipt, global_key=key, run=run, round=args.round)
    except VerificationError as exc:
        print(f"INVALID: {type(exc).__name__}: {exc}")
        return 1
    c = receipt.commitment
    print(
        f"OK: client {c.client_id} galaxy {c.galaxy_id} round {c.round} of run {run} "
        f"is included in global root {receipt.head.head.root.hex()}"
    )
    return 0


def _config(path: str | None, overrides: dict[str, Any] | None = None) -> Any:
    """The configuration, or None after printing why it is refused."""
    from protogalaxy.config import ConfigError, load_config

    try:
        return load_config(path, overrides=overrides)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _out_dir(args: argparse.Namespace, command: str) -> Path | None:
    """The run's directory, checked and created before anything runs (a run
    that cannot be written is not started), or None after printing why not."""
    import time

    from protogalaxy.report import OutDirError, prepare_out

    try:
        return prepare_out(
            args.out or f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}",
            overwrite=args.overwrite,
        )
    except OutDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _one_receipt(path: Path, client: int | None, rnd: int | None) -> Any:
    """The receipt at ``path``: a receipt's JSON, or a run's receipts.jsonl (or
    its directory), from which ``client``'s receipt of round ``rnd`` is taken
    (the last round it has when ``rnd`` is None)."""
    import json

    from protogalaxy.crypto import Receipt

    if path.is_dir():
        path = path / "receipts.jsonl"
    if path.suffix != ".jsonl":
        return Receipt.from_json(path.read_bytes())
    if client is None:
        raise ValueError(f"{path} holds many clients' receipts: pass --client")
    found = None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("client") == client and (rnd is None or rec.get("round") == rnd):
            found = rec
    if found is None:
        which = "any round" if rnd is None else f"round {rnd}"
        raise ValueError(f"{path} holds no receipt of client {client} for {which}")
    return Receipt.from_dict(found["receipt"])


def _log_level(value: str) -> str:
    """A log level, any case; ``warn`` is ``warning``."""
    value = value.lower()
    return "warning" if value == "warn" else value


def _lock_run(out: Path) -> Any:
    """Hold ``out`` for this process (an advisory lock, released when it exits),
    or None when another process holds it: two processes writing one run would
    interleave its append-only logs."""
    import fcntl

    handle = open(out / ".protogalaxy.lock", "a")  # noqa: SIM115 (held to exit)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def _simulate(args: argparse.Namespace) -> int:
    import signal

    import torch

    from protogalaxy.logs import setup_logging

    setup_logging(args.log_level, fmt=args.log_format)
    from protogalaxy.artefacts import ArtefactWriter
    from protogalaxy.report import write_model, write_outputs, write_progress
    from protogalaxy.simulation import (
        STATE_FILE,
        RoundMetrics,
        Simulation,
        SimulationResult,
    )

    if args.resume:
        clash = [f"--{n}" for n in ("config", "out", "seed") if getattr(args, n)]
        if clash or args.overwrite:
            print(
                f"error: --resume continues a run as it was configured; drop "
                f"{', '.join(clash + (['--overwrite'] if args.overwrite else []))}",
                file=sys.stderr,
            )
            return 2
        out = Path(args.resume)
        state = out / STATE_FILE
        lock = _lock_run(out) if out.is_dir() else None
        if out.is_dir() and lock is None:
            print(
                f"error: another protogalaxy process is writing {out}", file=sys.stderr
            )
            return 2
        if not state.exists():
            print(
                f"error: {out} holds no saved state ({STATE_FILE}): it is not a "
                "run directory, or its run finished",
                file=sys.stderr,
            )
            return 2
        try:
            sim = Simulation.load_state(state)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        config = sim.config
        done = len(sim.result().rounds)
        print(
            f"protogalaxy simulate: resuming {out}/ after round {done - 1} "
            f"({done}/{config.training.rounds} done)",
            flush=True,
        )
        recorded = out / "config.yaml"
        if recorded.exists():
            import yaml

            saved = yaml.safe_load(yaml.safe_dump(config.model_dump()))
            if yaml.safe_load(recorded.read_text()) != saved:
                print(
                    f"warning: {recorded} differs from the configuration the run was "
                    "saved with; the run goes on as it was configured (and rewrites "
                    "the file): start a new run to change it",
                    file=sys.stderr,
                )
    else:
        loaded = _config(args.config, {} if args.seed is None else {"seed": args.seed})
        if loaded is None:
            return 2
        config = loaded
        made = _out_dir(args, "simulate")
        if made is None:
            return 2
        out = made
        lock = _lock_run(out)
        if lock is None:
            print(
                f"error: another protogalaxy process is writing {out}", file=sys.stderr
            )
            return 2
        if args.tensorboard and not _tensorboard_dir_ok(args.tensorboard):
            return 2
        _print_header(config, out)
        try:
            artefacts = ArtefactWriter(out, keep_updates=config.audit.keep_updates)
            sim = Simulation(config, artefacts=artefacts)
        except (FileNotFoundError, RuntimeError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    total = config.training.rounds

    from protogalaxy.progress import RunProgress

    bars = (
        RunProgress(total, done=len(sim.result().rounds))
        if RunProgress.wanted()
        else None
    )
    if bars is not None:
        sim.on_phase = bars.phase

    def progress(m: RoundMetrics) -> None:
        asr = (
            ""
            if m.attack_success_rate is None
            else f"  attack success {m.attack_success_rate:.3f}"
        )
        line = (
            f"round {m.round:>3} ({m.round + 1}/{total})  accuracy {m.accuracy:.4f}  "
            f"loss {m.loss:.4f}  flagged {m.flagged:>3}  "
            f"quarantined {m.quarantined:>3}  banned {m.banned:>3}"
            f"{asr}  ({m.round_seconds:.1f} s)"
        )
        if bars is not None:
            bars.finished(line)
        else:
            print(line, flush=True)

    latest: list[SimulationResult] = []
    model: list[dict[str, torch.Tensor]] = []

    board = None
    if args.tensorboard:
        if not _tensorboard_dir_ok(args.tensorboard):
            return 2
        from protogalaxy.tblog import TensorBoardLog

        board = TensorBoardLog(args.tensorboard)

    def after_round(result: SimulationResult) -> None:
        # Ctrl-C waits until the round's files and state are all on disk: an
        # interrupt in between left a metrics.csv one round ahead of the summary
        # and the saved state (a race the Ctrl-C and resume tests caught)
        # (a handler that only takes note: blocking the signal in this thread
        # would not do, torch's threads would take it)
        pending: list[int] = []
        held = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(1))
        try:
            latest[:] = [result]
            model[:] = [sim.final_params()]  # the model those rounds made
            write_progress(result, out)  # every finished round is on disk
            if board is not None:
                board(result)
            sim.save_state(out / STATE_FILE)  # and can be continued from
        finally:
            signal.signal(signal.SIGINT, held)
        if pending:
            raise KeyboardInterrupt

    try:
        if bars is not None:
            with bars:
                result = sim.run(progress=progress, after_round=after_round)
        else:
            result = sim.run(progress=progress, after_round=after_round)
    except KeyboardInterrupt:
        print(flush=True)  # end the line ^C was typed on
        done = len(latest[0].rounds) if latest else 0
        if latest:
            write_outputs(latest[0], out)
            write_model(model[0], out)
        print(
            f"interrupted after {done} of {total} rounds; wrote what they produced "
            f"to {out}/"
            + (
                f"\ncontinue with: protogalaxy simulate --resume {out}"
                if (out / STATE_FILE).exists()
                else ""
            ),
            flush=True,
        )
        return 130
    summary = write_outputs(result, out)
    write_model(sim.final_params(), out)
    # the saved state holds every party's private key: gone once the run is done
    (out / STATE_FILE).unlink(missing_ok=True)
    _print_summary(summary, f"{out}/")
    return 0


def _tensorboard_dir_ok(path: str) -> bool:
    """``--tensorboard DIR`` can be created and written (checked before the run)."""
    from protogalaxy.report import writable_dir

    target = Path(path)
    try:
        writable_dir(target)
    except OSError as exc:
        print(
            f"error: --tensorboard {target} cannot be created or written: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return False
    return True


def _print_header(config: SimulationConfig, out: Path) -> None:
    total = config.training.rounds
    byzantine = sum(config.byzantine_per_galaxy().values())
    print(
        f"protogalaxy simulate: {config.dataset.name}, {config.clients.count} "
        f"clients in {config.galaxies.count} galaxies, {byzantine} Byzantine "
        f"({config.byzantine.attack}), {total} rounds"
        + (
            f", {config.clients.fraction_fit:g} of each galaxy's clients a round"
            if config.clients.fraction_fit < 1
            else ""
        )
        + "\n"
        f"  defense layers {config.defense.layers} with {config.defense.aggregator}"
        f"\n  writing to {out}/",
        flush=True,
    )


def _config_show(args: argparse.Namespace) -> int:
    """The whole configuration a run would use: the defaults with the file on top."""
    import yaml

    config = _config(args.config)
    if config is None:
        return 2
    print(yaml.safe_dump(config.model_dump(), sort_keys=False), end="")
    return 0


def _rate(value: object) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.3f}"


def _print_summary(summary: dict[str, object], wrote: str) -> None:
    """The closing line of simulate and up: the same figures, the same words."""
    import textwrap

    print(
        f"final accuracy {summary['final_accuracy']:.4f}, detection rate "
        f"{_rate(summary['detection_rate'])}, false-positive rate "
        f"{_rate(summary['false_positive_rate'])}, "
        f"{float(str(summary['wall_seconds'])):.1f} s\nwrote {wrote}",
        flush=True,
    )
    if summary.get("note"):
        print(textwrap.fill(f"note: {summary['note']}", width=100), flush=True)


def _up(args: argparse.Namespace) -> int:
    import time

    config = _config(args.config)
    if config is None:
        return 2
    try:
        config.check_services()
    except ValueError as exc:  # before a run directory is made
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The services are adapters outside the library; imported only for this command.
    from protogalaxy.services.up import LocalCluster

    out = _out_dir(args, "up")
    if out is None:
        return 2
    cluster = LocalCluster(
        config,
        out,
        commit_deadline_s=args.deadline,
        reveal_deadline_s=args.deadline,
        global_deadline_s=max(args.deadline, 120.0),
    )
    total = config.training.rounds
    print(
        f"protogalaxy up: redis, global, {config.galaxies.count} galaxies and "
        f"{config.clients.count} clients as local processes; logs in {out}/logs",
        flush=True,
    )
    t0 = time.perf_counter()

    def progress(record: dict[str, object]) -> None:
        rnd = int(str(record["round"]))
        acc = record.get("accuracy")
        accuracy = f"{acc:.4f}" if isinstance(acc, (int, float)) else "n/a"
        galaxies = record.get("galaxies")
        excluded = record.get("excluded") or {}
        out_of = (
            f"  excluded {', '.join(f'{g} ({why})' for g, why in excluded.items())}"
            if isinstance(excluded, dict) and excluded
            else ""
        )
        print(
            f"round {rnd:>3} ({rnd + 1}/{total})  accuracy {accuracy}  "
            f"galaxies {len(galaxies) if isinstance(galaxies, list) else galaxies}"
            f"{out_of}",
            flush=True,
        )

    try:
        cluster.start()
        status = cluster.wait_finished(args.timeout, progress=progress)
        summary = cluster.summary(status, time.perf_counter() - t0)
        _print_summary(summary, f"{out}/summary.json")
        if args.keep_running:
            _serve_until_interrupted(cluster, out)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
    return 0


def _serve_until_interrupted(cluster: Any, out: Path) -> None:
    """``up --keep-running``: the services stay up for a user to query (receipts,
    transcripts, the audit log) until Ctrl-C."""
    import os
    import time

    token = out / "secrets" / "auditor.token"  # for protogalaxy audit --url
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(cluster.auditor_token + "\n")
    galaxies = ", ".join(
        f"{g}: {cluster.galaxy_url(g)}" for g in sorted(cluster.galaxy_ports)
    )
    print(
        "the services are up until Ctrl-C:\n"
        f"  global aggregator {cluster.global_url}\n"
        f"  galaxies {galaxies}\n"
        f"  global public key {cluster.global_public_key}\n"
        f"  receipts in {out}/receipts.jsonl, the auditor token in {token}",
        flush=True,
    )
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping the services", flush=True)


def _audit(args: argparse.Namespace) -> int:
    from protogalaxy.auditor import audit_run

    if args.global_key and Path(args.global_key).is_file():
        args.global_key = Path(args.global_key).read_text().strip()
    options = {
        "global_key": args.global_key,
        "in_progress": args.in_progress,
        "allow_imports": args.allow_imports,
    }
    if args.url:
        import tempfile

        from protogalaxy.services.audit_fetch import (  # the transport
            FetchError,
            fetch_run,
        )

        with tempfile.TemporaryDirectory(prefix="pg-audit-") as tmp:
            try:
                fetch_run(args.url, Path(tmp), token=args.token)
            except FetchError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            return 1 if audit_run(tmp, **options) else 0
    if args.run_dir is None:
        print("error: give RUN_DIR or --url", file=sys.stderr)
        return 2
    return 1 if audit_run(args.run_dir, **options) else 0


def _partition_names() -> list[str]:
    from protogalaxy.robustness import PARTITIONS

    return list(PARTITIONS)


def _bench_robustness(args: argparse.Namespace) -> int:
    import time

    from protogalaxy.logs import setup_logging
    from protogalaxy.robustness import (
        ATTACKS,
        DEFENSE_IDS,
        DEFENSES,
        GALAXY_ATTACKS,
        PARTITIONS,
        defense_named,
        pending_runs,
        run_galaxy_table,
        run_grid,
        write_galaxy_tables,
        write_tables,
    )

    setup_logging("error")  # 98 runs' quarantine events would drown the table

    attacks = args.attacks.split(",") if args.attacks else ATTACKS
    defenses = list(DEFENSES)
    if args.defenses:
        named = [(d, defense_named(d)) for d in args.defenses.split(",")]
        unknown = [d for d, table in named if table is None]
        if unknown:
            print(
                f"error: --defenses: unknown {unknown[0]!r}; one of "
                f"{', '.join(DEFENSE_IDS)}",
                file=sys.stderr,
            )
            return 2
        defenses = [table for _, table in named if table is not None]
    galaxy_attacks = (
        args.galaxy_attacks.split(",") if args.galaxy_attacks else list(GALAXY_ATTACKS)
    )
    partitions = args.partitions.split(",") if args.partitions else list(PARTITIONS)
    for given, known, flag in (
        (attacks, ATTACKS, "--attacks"),
        (galaxy_attacks, list(GALAXY_ATTACKS), "--galaxy-attacks"),
        (partitions, list(PARTITIONS), "--partitions"),
    ):
        for a in given:
            if a not in known:
                print(
                    f"error: {flag}: unknown {a!r}; one of {', '.join(known)}",
                    file=sys.stderr,
                )
                return 2
    try:
        fractions = (
            [float(f) for f in args.fractions.split(",")] if args.fractions else []
        )
    except ValueError:
        print(f"error: --fractions: not numbers: {args.fractions!r}", file=sys.stderr)
        return 2
    if any(not 0.0 < f < 0.5 for f in fractions):
        print("error: --fractions: each must lie in (0, 0.5)", file=sys.stderr)
        return 2
    sweep = args.sweep_attacks.split(",") if fractions else []
    if args.seeds < 1 or args.jobs < 1:
        print("error: --seeds and --jobs must be at least 1", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/robustness-{time.strftime('%Y%m%d-%H%M%S')}")
    args.out = str(out)  # the galaxy tables go beside the client tables
    started = time.monotonic()
    done = [0]
    grid_settings: dict[str, Any] = {
        "samples_per_client": args.samples_per_client,
        "rounds": args.rounds,
        "seed": args.seed,
        "seeds": args.seeds,
        "defenses": defenses,
        "partitions": partitions,
        "cache": out / "runs.jsonl",
    }
    grids = [grid_settings | {"attacks": attacks, "fractions": None}]
    if fractions:
        grids.append(grid_settings | {"attacks": sweep, "fractions": fractions})
    # what a resumed grid has left (rows there whose defense is today's stand)
    runs = pending_runs(grids)

    if args.tables in ("all", "clients"):
        from protogalaxy.progress import RunProgress

        bars = (
            RunProgress(runs, unit="run", phases=()) if RunProgress.wanted() else None
        )

        def progress(row: dict[str, object]) -> None:
            done[0] += 1
            left = (time.monotonic() - started) / done[0] * max(runs - done[0], 0)
            what = (
                f"n/a ({row['infeasible']})"
                if row.get("infeasible")
                else (
                    f"accuracy {row['final_accuracy']}  detection "
                    f"{row['detection_rate']}  fpr {row['false_positive_rate']}  "
                    f"attack success {row['attack_success']}  ({row['seconds']} s)"
                )
            )
            line = (
                f"[{done[0]}/{runs}, about {left / 60:.0f} min left] "
                f"{row['partition']:<15} {row['attack']:<13} {row['defense']:<17} "
                f"{float(str(row['fraction'])):.0%} seed {row['seed']}  {what}"
            )
            if bars is not None:
                bars.finished(line[:300])
            else:
                print(line[:300], flush=True)

        common: dict[str, Any] = grid_settings | {
            "target": args.target,
            "jobs": args.jobs,
            "progress": progress,
        }

        def grid() -> list[dict[str, Any]]:
            rows = run_grid(attacks=attacks, **common)
            if fractions:
                rows += run_grid(attacks=sweep, fractions=fractions, **common)
            unique = {
                (r["partition"], r["attack"], r["defense"], r["fraction"], r["seed"]): r
                for r in rows
            }
            return list(unique.values())

        if bars is not None:
            with bars:
                rows = grid()
        else:
            rows = grid()
        seeds = (
            f"seed {args.seed}"
            if args.seeds == 1
            else f"seeds {args.seed}-{args.seed + args.seeds - 1}"
        )
        settings = (
            f"Settings: MNIST, 30 clients in 3 galaxies, 9 Byzantine (30%) unless a "
            f"sweep says otherwise, {args.samples_per_client} samples per client, "
            f"{args.rounds} rounds of one local epoch, {seeds}; everything else as "
            f"the default config. Rounds to target: first round at accuracy "
            f">= {args.target}. Every run is in `runs.jsonl` (a rerun with the same "
            "--out skips what is there)."
        )
        write_tables(rows, out, settings=settings)
        print(f"wrote {out}/robustness.md, robustness.csv and the heatmaps")
    if args.tables in ("all", "galaxies"):
        _bench_galaxies(args, galaxy_attacks, run_galaxy_table, write_galaxy_tables)
    return 0


def _bench_galaxies(
    args: argparse.Namespace,
    attacks: list[str],
    run_galaxy_table: Any,
    write_galaxy_tables: Any,
) -> None:
    import tempfile

    from protogalaxy.learning.datasets import load_dataset
    from protogalaxy.simulation import Simulation

    data = load_dataset("mnist")

    def simulate(config: SimulationConfig) -> dict[str, Any]:
        return Simulation(config, dataset=data).run().summary()

    runners = {"simulate": simulate}
    if args.up:
        from protogalaxy.services.up import (
            LocalCluster,  # the services, outside the library
        )

        def up(config: SimulationConfig) -> dict[str, Any]:
            with tempfile.TemporaryDirectory(prefix="pg-bench-up-") as tmp:
                cluster = LocalCluster(
                    config,
                    Path(tmp),
                    commit_deadline_s=300,
                    reveal_deadline_s=300,
                    global_deadline_s=300,
                )
                try:
                    cluster.start()
                    status = cluster.wait_finished(timeout=1800)
                    return dict(cluster.summary(status, 0.0))
                finally:
                    cluster.stop()

        runners["up"] = up

    def progress(row: dict[str, object]) -> None:
        print(
            f"{row['runner']:<9} audit {row['audit']:<4} {row['attack']:<23} "
            f"accuracy {row['final_accuracy']}  caught in round "
            f"{row['caught_in_round']}  false attributions "
            f"{row['false_attributions']}  false isolations {row['false_isolations']}"
            f"  ({row['seconds']} s)",
            flush=True,
        )

    rows = run_galaxy_table(runners, attacks=attacks, seed=args.seed, progress=progress)
    settings = (
        "Settings: the default config (MNIST, 30 clients in 3 galaxies, 9 Byzantine "
        f"clients doing label_flip, 10 rounds), seed {args.seed}; galaxy 1 "
        "compromised from round 2, lying about 20% of its clients a round."
    )
    write_galaxy_tables(rows, Path(args.out), settings=settings)
    print(f"wrote {args.out}/robustness-galaxies.md and robustness-galaxies.csv")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protogalaxy",
        description="Hierarchical, Byzantine-robust, verifiable federated learning.",
    )
    parser.add_argument(
        "--version", action="version", version=f"protogalaxy {__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="run the whole system in one process")
    s.add_argument("--config", help="YAML config (default: the built-in seed MVP)")
    s.add_argument("--out", help="output directory (default: runs/simulate-<time>)")
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in --out (refused otherwise)",
    )
    s.add_argument("--seed", type=int, default=None, help="override the config's seed")
    s.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also write TensorBoard scalars per round and per layer to DIR "
        "(view: tensorboard --logdir DIR)",
    )
    s.add_argument(
        "--resume",
        metavar="DIR",
        help="continue an interrupted run in DIR from its last finished round, with "
        "the results an uninterrupted run would have had",
    )
    s.add_argument(
        "--log-level",
        default="warning",
        type=_log_level,
        choices=["debug", "info", "warning", "error"],
        help="log level on stderr (quarantines and bans are warnings)",
    )
    s.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "human"],
        help="stderr's log lines: one short line each on a terminal, JSON "
        "otherwise (auto), or as named; evidence.jsonl keeps every record whole",
    )
    s.set_defaults(func=_simulate)
    c = sub.add_parser("config", help="the configuration a run would use")
    csub = c.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser(
        "show", help="print the whole configuration: the defaults, --config on top"
    )
    show.add_argument("--config", help="YAML config (default: the built-in seed MVP)")
    show.set_defaults(func=_config_show)
    u = sub.add_parser("up", help="run the real services as local processes with Redis")
    u.add_argument("--config", help="YAML config (default: the built-in seed MVP)")
    u.add_argument("--out", help="output directory (default: runs/up-<time>)")
    u.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in --out (refused otherwise)",
    )
    u.add_argument(
        "--deadline",
        type=float,
        default=300.0,
        help="phase deadline in seconds (the first round includes client start-up)",
    )
    u.add_argument(
        "--timeout", type=float, default=1800.0, help="give up after, seconds"
    )
    u.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the services up after the run (until Ctrl-C), printing their "
        "URLs and the global public key",
    )
    u.set_defaults(func=_up)
    b = sub.add_parser("bench", help="benchmarks that belong to the command")
    bsub = b.add_subparsers(dest="bench", required=True)
    r = bsub.add_parser("robustness", help="every attack against every defense (table)")
    r.add_argument(
        "--out",
        help="directory for the tables (default: runs/robustness-<time>; "
        "--out docs regenerates the committed ones)",
    )
    r.add_argument("--samples-per-client", type=int, default=500)
    r.add_argument("--rounds", type=int, default=10)
    r.add_argument("--seed", type=int, default=0, help="the first seed")
    r.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="independent runs per cell (seeds --seed, --seed+1, ...): the tables "
        "give mean ± std and a paired t-test of Full against the best baseline",
    )
    r.add_argument("--attacks", help="comma-separated subset of the attacks")
    r.add_argument(
        "--defenses",
        help="comma-separated subset of the defenses: fedavg, krum, multikrum, "
        "median, trimmed_mean, bulyan, centered_clipping, fltrust (layer 1 and "
        "that rule), lite (ProtoGalaxy-Lite), full (ProtoGalaxy-Full) and "
        "full-fltrust (every layer, FLTrust as layer 3); the tables' names work "
        "too",
    )
    r.add_argument(
        "--partitions",
        help="comma-separated subset of: " + ", ".join(_partition_names()),
    )
    r.add_argument(
        "--fractions",
        help="an attacker-fraction sweep, e.g. 0.1,0.2,0.3,0.4, of the "
        "--sweep-attacks against every defense (the rule is told the fraction)",
    )
    r.add_argument(
        "--sweep-attacks",
        default="label_flip",
        help="the attacks the --fractions sweep runs (default: label_flip)",
    )
    r.add_argument(
        "--target",
        type=float,
        default=0.9,
        help="the accuracy whose first round each run records (rounds to target)",
    )
    r.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, in separate processes (each gets cores / jobs threads)",
    )
    r.add_argument(
        "--tables",
        choices=["all", "clients", "galaxies"],
        default="all",
        help="client attacks x defenses, compromised galaxies x the audit, or both",
    )
    r.add_argument(
        "--galaxy-attacks", help="comma-separated subset of the galaxy attacks"
    )
    r.add_argument(
        "--up",
        action="store_true",
        help="also run the galaxy table through the services (protogalaxy up)",
    )
    r.set_defaults(func=_bench_robustness)
    a = sub.add_parser(
        "audit",
        help="verify a run from what it published: signatures, proofs, "
        "transcripts, replays, evidence, receipts",
    )
    a.add_argument(
        "run_dir", nargs="?", help="the directory simulate or up wrote (RUN_DIR)"
    )
    a.add_argument("--url", help="the live global aggregator instead (its URL)")
    a.add_argument(
        "--global-key",
        help="pin the global aggregator's public key (hex, or a file holding it); "
        "default: the run's own",
    )
    a.add_argument(
        "--in-progress",
        action="store_true",
        help="the run may not have finished: a log that ends before its last "
        "configured round is not a failure",
    )
    a.add_argument(
        "--allow-imports",
        action="store_true",
        help="import the code the run's config names as package.module:attr (a "
        "user's aggregation rule, which the replay needs); importing runs it, so "
        "only for runs you trust. Without it, nothing the run names is imported",
    )
    a.add_argument(
        "--token",
        default=os.environ.get("PG_AUDITOR_TOKEN"),
        help="auditor bearer token for --url (default: $PG_AUDITOR_TOKEN)",
    )
    a.set_defaults(func=_audit)
    p = sub.add_parser(
        "verify-receipt", help="verify a client's two-level receipt (JSON)"
    )
    p.add_argument(
        "receipt",
        help="a receipt's JSON, or a run's receipts.jsonl or directory (with --client)",
    )
    p.add_argument(
        "--global-key",
        required=True,
        help="the global aggregator's public key you trust: hex, or a file holding "
        "it (a run's keys/global.pub)",
    )
    p.add_argument(
        "--client", type=int, default=None, help="whose receipt, in a receipts.jsonl"
    )
    p.add_argument(
        "--round", type=int, default=None, help="the round the receipt must be for"
    )
    p.add_argument(
        "--run",
        default=None,
        help="the run the receipt must be of (default: the run its head names)",
    )
    p.set_defaults(func=_verify_receipt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:  # a command's own handler writes what it has first
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # `protogalaxy ... | head`: the reader left
        # Python's advice: point stdout at devnull so the exit flush is quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
