"""What a run writes: metrics.csv, summary.json, evidence.jsonl, config.yaml, plots,
and the final model (model.pt, model.pgt1).

The tables are rewritten as each round ends (:func:`write_progress`), each file
replaced whole (written beside it, then renamed), so an interrupted run leaves
every round it finished, readable. :func:`prepare_out` checks the output
directory before a run starts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from protogalaxy.simulation import SimulationResult

__all__ = [
    "RUN_FILES",
    "OutDirError",
    "prepare_out",
    "write_model",
    "write_outputs",
    "write_progress",
    "write_records",
]

#: what a run writes at the top of its directory (simulate and up)
RUN_FILES = (
    "accuracy.png",
    "audit",
    "config.yaml",
    "evidence.jsonl",
    "flags.png",
    "global",
    "keys",
    "logs",
    "metrics.csv",
    "model.pgt1",
    "model.pt",
    "receipts.jsonl",
    "redis",
    "reputation.png",
    "run.json",
    "secrets",
    "state.pkl",
    "summary.json",
)


def _ours(name: str) -> bool:
    """A run's file: one of :data:`RUN_FILES`, its lock, or the temporary file a
    write in progress leaves when the process is killed (``.<name>.tmp``)."""
    if name in RUN_FILES or name == ".protogalaxy.lock":
        return True
    return name.startswith(".") and name.endswith(".tmp") and name[1:-4] in RUN_FILES


class OutDirError(ValueError):
    """The output directory cannot take this run."""


def writable_dir(path: Path) -> None:
    """Create ``path`` and write a file in it (an OSError if either fails)."""
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".protogalaxy-write-test"
    probe.write_bytes(b"")
    probe.unlink()


def prepare_out(path: str | Path, *, overwrite: bool = False) -> Path:
    """Check and create the run's output directory before anything runs.

    Refused (:class:`OutDirError`): a path that is a file or cannot be created
    or written, and a directory that already holds files, unless ``overwrite``;
    then a previous run's files (:data:`RUN_FILES`) are removed and nothing else
    is touched (a directory holding anything else is still refused).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file, not a directory")
    if out.is_dir():
        present = sorted(p.name for p in out.iterdir())
        if present and not overwrite:
            ours = [n for n in present if _ours(n)]
            what = "a previous run" if ours else "other files"
            raise OutDirError(
                f"--out {out} already holds {what} ({', '.join(present[:4])}"
                f"{', ...' if len(present) > 4 else ''}); choose another directory "
                "or pass --overwrite to replace a previous run"
            )
        foreign = [n for n in present if not _ours(n)]
        if foreign:
            raise OutDirError(
                f"--out {out} holds files that are not a run's "
                f"({', '.join(foreign[:4])}): --overwrite replaces only a previous "
                "run; choose another directory"
            )
        for name in present:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
    try:
        writable_dir(out)
    except OSError as exc:
        raise OutDirError(
            f"--out {out} cannot be created or written: {exc.strerror or exc}"
        ) from None
    return out


def _replace(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole, or what it held before."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_progress(result: SimulationResult, out: str | Path) -> dict[str, Any]:
    """metrics.csv, summary.json, evidence.jsonl and config.yaml for the rounds
    finished so far; the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [dataclasses.asdict(r) for r in result.rounds]
    if rows:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        _replace(out / "metrics.csv", buf.getvalue())
    summary = result.summary() if rows else {"rounds": 0}
    _replace(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _replace(
        out / "evidence.jsonl",
        "".join(json.dumps(e, default=str) + "\n" for e in result.events),
    )
    _replace(
        out / "config.yaml",
        yaml.safe_dump(result.config.model_dump(), sort_keys=False),
    )
    return summary


def write_outputs(result: SimulationResult, out: str | Path) -> dict[str, Any]:
    """Everything of a finished (or interrupted) run: the tables and the plots."""
    summary = write_progress(result, out)
    if result.rounds:
        _plots(result, Path(out))
    return summary


def write_records(
    records: list[dict[str, Any]], out: str | Path, *, title: str
) -> None:
    """``up``'s per-round tables, from the global aggregator's round records:
    metrics.csv (round, accuracy, loss, galaxies, galaxies excluded and why,
    whether the step was applied) and accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    rows = [
        {
            "round": r["round"],
            "accuracy": r.get("accuracy"),
            "loss": r.get("loss"),
            "galaxies": len(r.get("galaxies") or []),
            "excluded": json.dumps(r.get("excluded") or {}, sort_keys=True),
            "applied": r.get("applied"),
        }
        for r in records
        if not r.get("skipped")
    ]
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _replace(out / "metrics.csv", buf.getvalue())
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(r["round"], r["accuracy"]) for r in rows if r["accuracy"] is not None]
    ax.plot(
        [p[0] for p in points], [p[1] for p in points], marker="o", label="accuracy"
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)


def write_model(params: dict[str, torch.Tensor], out: str | Path) -> None:
    """The final global model: ``model.pt`` (a state dict:
    ``model.load_state_dict(torch.load("model.pt"), strict=False)`` on the
    configuration's model) and ``model.pgt1`` (the same tensors in the signed
    update format, :func:`protogalaxy.codec.decode_update`)."""
    from protogalaxy.codec import encode_update

    out = Path(out)
    tensors = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    tmp = out / ".model.pt.tmp"
    torch.save(tensors, tmp)
    os.replace(tmp, out / "model.pt")
    tmp = out / ".model.pgt1.tmp"
    tmp.write_bytes(encode_update(tensors))
    os.replace(tmp, out / "model.pgt1")


def defense_name(layers: list[int] | tuple[int, ...]) -> str:
    """ProtoGalaxy-Full (all five layers), -Lite (layers 1 and 3), or the layers."""
    if sorted(layers) == [1, 2, 3, 4, 5]:
        return "ProtoGalaxy-Full"
    if sorted(layers) == [1, 3]:
        return "ProtoGalaxy-Lite"
    return "layers " + ", ".join(str(x) for x in sorted(layers))


def figures(result: SimulationResult) -> dict[str, Any]:
    """The run's plots as matplotlib figures, by file name (accuracy.png,
    reputation.png, flags.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cfg = result.config
    rounds = [r.round for r in result.rounds]
    defense = f"{defense_name(cfg.defense.layers)} ({cfg.defense.aggregator})"
    out: dict[str, Any] = {}

    def whole_rounds(ax: Any) -> None:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r.accuracy for r in result.rounds], marker="o", label="accuracy")
    if result.rounds[-1].attack_success_rate is not None:
        ax.plot(
            rounds,
            [r.attack_success_rate or 0.0 for r in result.rounds],
            marker="x",
            label="attack success",
        )
    whole_rounds(ax)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{cfg.byzantine.attack} vs {defense}")
    fig.tight_layout()
    out["accuracy.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 4))
    byz = set(result.byzantine)
    rep = cfg.defense.reputation
    for group, colour, members in (
        ("honest", "tab:blue", [c for c in result.reputation_history if c not in byz]),
        ("Byzantine", "tab:red", [c for c in result.reputation_history if c in byz]),
    ):
        if not members:
            continue
        hist = torch.tensor([result.reputation_history[c] for c in members])
        xs = rounds[: hist.shape[1]]
        ax.plot(xs, hist.mean(0).tolist(), color=colour, label=f"{group} (mean)")
        ax.fill_between(
            xs,
            hist.min(0).values.tolist(),
            hist.max(0).values.tolist(),
            color=colour,
            alpha=0.15,
            label=f"{group} (range)",
        )
        # the round each client first fell below the quarantine line
        marks = []
        for h in hist:
            below = (h < rep.quarantine_below).nonzero()
            if len(below):
                i = int(below[0, 0])
                marks.append((xs[i], float(h[i])))
        if marks:
            ax.scatter(
                [m[0] for m in marks],
                [m[1] for m in marks],
                marker="v",
                color=colour,
                label=f"{group} quarantined",
                zorder=3,
            )
    ax.axhline(rep.quarantine_below, color="k", linestyle="--", linewidth=1)
    ax.axhline(rep.ban_below, color="k", linestyle=":", linewidth=1)
    whole_rounds(ax)
    ax.set_ylabel("reputation")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    ax.set_title("layer 4: reputation (dashed: quarantine, dotted: ban)")
    fig.tight_layout()
    out["reputation.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (
        ("flags_integrity", "layer 1: integrity failures"),
        ("flags_statistics", "layer 2: statistical flags"),
        ("flags_robust", "layer 3: left out by the aggregator"),
        ("quarantined", "layer 4: clients quarantined"),
        ("galaxies_excluded", "layer 5: galaxies excluded"),
    ):
        ax.plot(
            rounds, [getattr(r, name) for r in result.rounds], marker=".", label=label
        )
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set_ylim(bottom=-0.5)
    whole_rounds(ax)
    ax.set_ylabel("clients (galaxies for layer 5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("per layer, each round (quarantined clients are not screened)")
    fig.tight_layout()
    out["flags.png"] = fig
    return out


def _plots(result: SimulationResult, out: Path) -> None:
    import matplotlib.pyplot as plt

    for name, fig in figures(result).items():
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
