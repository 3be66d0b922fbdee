"""The whole ProtoGalaxy round in one process.

The galaxies and the global aggregator are the protocol classes the services use,
over in-memory stores; the clients train together in one vectorized call and then
each commits, verifies its receipt and reveals exactly as a client runner does. Only
the transport (function calls instead of HTTP) and the stores differ.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protogalaxy.artefacts import ArtefactWriter
from protogalaxy.codec import encode_update
from protogalaxy.config import SimulationConfig
from protogalaxy.crypto.commitment import commit
from protogalaxy.crypto.errors import VerificationError
from protogalaxy.crypto.identity import (
    SigningKey,
    sign_commitment,
    sign_registration,
    sign_reveal,
)
from protogalaxy.crypto.keyring import client_key, parse_keyring, provision
from protogalaxy.crypto.receipts import verify_receipt
from protogalaxy.defense.pipeline import DefenseConfig, GalaxyDefense, GlobalDefense
from protogalaxy.defense.robust import resolve_aggregator
from protogalaxy.learning.attacks import AttackConfig, add_trigger, train_clients
from protogalaxy.learning.datasets import Dataset, load_dataset
from protogalaxy.learning.models import build_model
from protogalaxy.learning.partition import partition
from protogalaxy.learning.server import server_step
from protogalaxy.learning.training import (
    BatchedTrainer,
    ClientTask,
    evaluate,
    round_lr,
)
from protogalaxy.protocol.assignment import Assignment
from protogalaxy.protocol.audit import updates_needed
from protogalaxy.protocol.compromised import CompromisedGalaxy, GalaxyAttack
from protogalaxy.protocol.galaxy import ClientRoster, GalaxyAggregator, Rejected
from protogalaxy.protocol.global_aggregator import (
    AuditSettings,
    GlobalAggregator,
    GlobalRoundResult,
)
from protogalaxy.protocol.stores import MemoryGalaxyStore
from protogalaxy.protocol.transcript import digest_hex
from protogalaxy.spec import UpdateSpec

__all__ = [
    "STATE_FILE",
    "ClientSide",
    "RoundMetrics",
    "Simulation",
    "SimulationResult",
    "StateError",
]

#: a simulation's saved state in its run directory (``simulate --resume``)
STATE_FILE = "state.pkl"
_STATE_VERSION = 3
#: files the artefacts only ever append to: cut back to the saved state's sizes
_APPENDED = ("evidence.jsonl", "receipts.jsonl", "audit/log.bin")


class StateError(ValueError):
    """A saved state that cannot be resumed."""


@dataclass
class _Progress:
    """Where :meth:`Simulation.run` is: what the rounds so far produced."""

    next_round: int = 0
    rounds: list[RoundMetrics] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    history: dict[int, list[float]] = field(default_factory=dict)
    quarantined_ever: set[int] = field(default_factory=set)
    #: wall seconds of the rounds run so far (across resumes)
    seconds: float = 0.0
    stopped: bool = False


_log = logging.getLogger("protogalaxy.simulation")

#: rounds of state (revealed updates, trees) a galaxy keeps, as the services'
#: default ``PG_KEEP_ROUNDS``
KEEP_ROUNDS = 3


@dataclass
class RoundMetrics:
    round: int
    accuracy: float
    loss: float
    flagged: int
    quarantined: int
    banned: int
    flags_integrity: int
    flags_statistics: int
    flags_robust: int
    galaxies_excluded: int
    aggregation_seconds: float
    round_seconds: float
    eval_seconds: float
    attack_success_rate: float | None = None
    #: galaxies isolated (so far) for misbehaving
    galaxies_isolated: int = 0
    #: Byzantine clients flagged by any layer this round (quarantine follows
    #: only after several such rounds)
    byzantine_flagged: int = 0
    #: galaxies whose defense failed this round and fell back to the coordinate
    #: median (a broken rule, e.g. a user's; the log has the error)
    defense_fallbacks: int = 0


@dataclass
class SimulationResult:
    config: SimulationConfig
    rounds: list[RoundMetrics]
    byzantine: list[int]
    quarantined_ever: list[int]
    removed_at_end: list[int]
    events: list[dict[str, Any]]
    reputation_history: dict[int, list[float]]
    wall_seconds: float
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        byz = set(self.byzantine)
        honest = set(range(self.config.clients.count)) - byz
        detected = byz & set(self.removed_at_end)
        false_pos = honest & set(self.quarantined_ever)
        last = self.rounds[-1]
        out: dict[str, Any] = {
            "final_accuracy": last.accuracy,
            "final_loss": last.loss,
            "detection_rate": len(detected) / len(byz) if byz else None,
            "false_positive_rate": len(false_pos) / len(honest) if honest else None,
            "rounds": len(self.rounds),
            "wall_seconds": self.wall_seconds,
            "byzantine_clients": sorted(byz),
            "quarantined_clients": sorted(self.removed_at_end),
            "honest_ever_quarantined": sorted(false_pos),
            "attack": self.config.byzantine.attack,
            "aggregator": self.config.defense.aggregator,
            "layers": self.config.defense.layers,
            "seed": self.config.seed,
            "stopped_early": self.stopped_early,
            "mean_round_seconds": sum(r.round_seconds for r in self.rounds)
            / len(self.rounds),
            "mean_aggregation_seconds": sum(r.aggregation_seconds for r in self.rounds)
            / len(self.rounds),
        }
        out["byzantine_flagged_last_round"] = last.byzantine_flagged
        if byz and not detected and last.byzantine_flagged:
            rep = self.config.defense.reputation
            out["note"] = (
                f"detection counts quarantined clients: {last.byzantine_flagged} of "
                f"{len(byz)} Byzantine clients were flagged in the last round, but "
                f"quarantine needs a reputation below {rep.quarantine_below} (from "
                f"{rep.initial}), which takes several flagged rounds "
                "(docs/defense.md); run more rounds"
            )
        fallbacks = sum(r.defense_fallbacks for r in self.rounds)
        if fallbacks:
            out["defense_fallbacks"] = fallbacks
            out["note"] = ("; ".join([out["note"]]) + "; " if "note" in out else "") + (
                f"the galaxies' defense failed {fallbacks} time(s) and fell back to "
                f"the coordinate median ({self.config.defense.aggregator} did not "
                "run there; the log names the error)"
            )
        if self.config.byzantine.attack in ("backdoor", "targeted_flip"):
            out["attack_success_rate"] = last.attack_success_rate
        galaxies = self.extra.get("galaxies")
        if galaxies is not None:
            out["galaxies"] = galaxies
        return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "training.device is cuda, but this torch "
            f"({torch.__version__}) sees no CUDA device: use auto or cpu, or "
            "install a CUDA build of torch on a machine with a GPU"
        )
    return torch.device(name)


def choose_byzantine(config: SimulationConfig) -> list[int]:
    """``round(fraction * size)`` Byzantine clients in every galaxy, chosen by seed."""
    g = torch.Generator().manual_seed(config.seed + 7919)
    chosen: list[int] = []
    per = config.byzantine_per_galaxy()
    for gid, members in config.galaxy_members().items():
        order = torch.randperm(len(members), generator=g)[: per[gid]]
        chosen += [members[i] for i in order.tolist()]
    return sorted(chosen)


@dataclass
class ClientSide:
    """What every client-side process derives from the config, in one fixed order
    (global seed, generator, model, partition, Byzantine choice, trainer), so the
    simulation and the services' client runner train identically."""

    generator: torch.Generator
    model: torch.nn.Module
    spec: UpdateSpec
    parts: list[torch.Tensor]
    byzantine: list[int]
    attack: AttackConfig
    trainer: BatchedTrainer
    #: the run's defense, public: what an adaptive attack tunes itself against
    defense: DefenseConfig

    @classmethod
    def build(
        cls,
        config: SimulationConfig,
        data: Dataset,
        *,
        device: torch.device | str = "cpu",
    ) -> ClientSide:
        torch.manual_seed(config.seed)  # dropout draws from the global RNG
        generator = torch.Generator().manual_seed(config.seed)
        model = build_model(
            config.model, num_classes=data.num_classes, seed=config.seed
        )
        model = model.to(device)
        spec = UpdateSpec.from_params(
            {k: v.detach().cpu() for k, v in model.named_parameters()}
        )
        parts = partition(
            data.y_train,
            num_clients=config.clients.count,
            samples_per_client=config.clients.samples_per_client,
            scheme=config.clients.partition,
            alpha=config.clients.dirichlet_alpha,
            power=config.clients.powerlaw_exponent,
            generator=generator,
        )
        trainer = BatchedTrainer(
            model,
            lr=config.training.lr,
            momentum=config.training.momentum,
            batch_size=config.training.batch_size,
            epochs=config.training.local_epochs,
            local_steps=config.training.local_steps,
            min_steps=config.training.min_local_steps,
            device=device,
        )
        # The attack's classes are the data's (a 3-class dataset flips 0 <-> 2).
        attack = dataclasses.replace(config.attack(), num_classes=data.num_classes)
        if attack.name == "backdoor" and attack.backdoor_target >= data.num_classes:
            raise ValueError(
                f"byzantine.backdoor_target {attack.backdoor_target} is not a class "
                f"of {data.name} ({data.num_classes} classes)"
            )
        if attack.name == "targeted_flip" and (
            max(attack.source_class, attack.target_class) >= data.num_classes
        ):
            raise ValueError(
                f"byzantine.source_class {attack.source_class} or target_class "
                f"{attack.target_class} is not a class of {data.name} "
                f"({data.num_classes} classes)"
            )
        return cls(
            generator,
            model,
            spec,
            parts,
            choose_byzantine(config),
            attack,
            trainer,
            config.defense.build(),
        )


class Simulation:
    """Build once, then :meth:`run`.

    Every party has its own key, provisioned exactly as ``protogalaxy up`` and the
    chart provision them (:func:`~protogalaxy.crypto.keyring.provision`), and every
    signature is bound to ``run_id`` (default: a fresh ``sim-<hex>``). Clients
    forward the galaxies' acknowledgements to the global aggregator, which audits
    every galaxy's signed transcript and replays the drawn ones from their updates;
    ``artefacts`` receives what a run publishes for ``protogalaxy audit``.
    """

    def __init__(
        self,
        config: SimulationConfig,
        *,
        dataset: Dataset | None = None,
        run_id: str | None = None,
        artefacts: ArtefactWriter | None = None,
    ) -> None:
        self.config = config
        self.run_id = run_id or f"sim-{secrets.token_hex(4)}"
        self.artefacts = artefacts
        self.device = _device(config.training.device)
        self.data = dataset or load_dataset(
            config.dataset.name, root=config.dataset.root
        )
        side = ClientSide.build(config, self.data, device=self.device)
        self.generator = side.generator
        self.model = side.model
        self.spec = side.spec
        self.parts = side.parts
        self.byzantine = side.byzantine
        self.attack = side.attack
        self._byzantine_set = frozenset(side.byzantine)
        self.trainer = side.trainer
        params = {k: v.detach().cpu() for k, v in self.model.named_parameters()}
        defense = self.defense_config = side.defense
        files = provision(galaxies=config.galaxies.count, clients=config.clients.count)
        self.global_key = SigningKey.from_bytes(files["global.key"])
        self.client_keys = {
            c: client_key(files["clients.seed"], c) for c in range(config.clients.count)
        }
        enrolled = parse_keyring(files["clients.pub"].decode())
        assignment = Assignment(config.clients.count, config.galaxies.count)
        attack = config.galaxy_attack_config()
        attacked = config.galaxy_attack.galaxy
        self.compromised: dict[int, GalaxyAttack] = (
            {} if attack is None or attacked is None else {attacked: attack}
        )
        self.galaxies: dict[int, GalaxyAggregator] = {}
        for gid, members in config.galaxy_members().items():
            common: dict[str, Any] = {
                "store": MemoryGalaxyStore(),
                "spec": self.spec,
                "defense": GalaxyDefense(gid, defense),
                "key": SigningKey.from_bytes(files[f"galaxy-{gid}.key"]),
                "global_key": self.global_key.public_key,
                "roster": ClientRoster(
                    gid, config.clients.count, assignment.galaxy_of, enrolled
                ),
                "run": self.run_id,
                "max_update_bytes": config.max_update_bytes,
                "sampling": config.sampling(),
            }
            agg = (
                CompromisedGalaxy(gid, attack=self.compromised[gid], **common)
                if gid in self.compromised
                else GalaxyAggregator(gid, **common)
            )
            self.galaxies[gid] = agg
            for c in members:
                self._register(agg, c)
        self.global_agg = GlobalAggregator(
            key=self.global_key,
            galaxy_keys=parse_keyring(files["galaxies.pub"].decode()),
            assignment=assignment,
            run=self.run_id,
            params=self.spec.flatten(params),
            defense=GlobalDefense(defense),
            server=server_step(config.training),
            sampling=config.sampling(),
            audit=AuditSettings(
                enabled=config.audit.enabled,
                fraction=config.audit.fraction,
                client_keys=enrolled,
                spec=self.spec,
                max_update_bytes=config.max_update_bytes,
            ),
            config_digest=digest_hex(config.model_dump()),
        )
        # FLTrust: the global aggregator's own small clean dataset, drawn from the
        # training split with a generator of its own (the clients' draws stay
        # as they are); it may overlap clients' samples, as a server's own
        # collection from the same distribution would.
        self.root: torch.Tensor | None = None
        if resolve_aggregator(config.defense.aggregator).needs_server_update:
            n = int(self.data.y_train.shape[0])
            if config.defense.root_samples > n:
                raise ValueError(
                    f"defense.root_samples {config.defense.root_samples} exceeds "
                    f"the {n} training samples"
                )
            root_gen = torch.Generator().manual_seed(config.seed + 0x5EED)
            self.root = torch.randperm(n, generator=root_gen)[
                : config.defense.root_samples
            ].clone()  # not a view of the whole permutation (saved states)
            self.root_generator = root_gen
        self.receipt_failures = 0
        self._progress = _Progress()
        #: called as each step of a round starts, with the round and the step's
        #: name (protogalaxy.progress.ROUND_PHASES): a progress display's hook
        self.on_phase: Callable[[int, str], None] | None = None
        #: honest clients whose reputation fell in a round their galaxy lied in
        #: without being caught
        self.false_attributions: set[int] = set()
        if artefacts is not None:
            artefacts.write_identity(self.run_id, config.model_dump(), files, self.spec)

    def _register(self, galaxy: GalaxyAggregator, client: int) -> None:
        key = self.client_keys[client]
        galaxy.register(
            client,
            key.public_key.to_bytes(),
            sign_registration(
                key, client_id=client, galaxy_id=galaxy.galaxy, run=self.run_id
            ),
        )

    def galaxy_of(self, client: int) -> GalaxyAggregator:
        """``client``'s galaxy now (it changes when a galaxy is isolated)."""
        return self.galaxies[self.global_agg.assignment.galaxy_of(client)]

    def _sampled(self, round: int, client: int) -> bool:
        """Whether ``client`` takes part in ``round`` (clients.fraction_fit)."""
        sample = self.galaxy_of(client).sample(round)
        return sample is None or client in sample

    # -- one round -------------------------------------------------------------

    def _train(self, round: int, clients: list[int]) -> torch.Tensor:
        return train_clients(
            self.trainer,
            self.spec.unflatten(self.global_agg.params),
            clients,
            parts=dict(enumerate(self.parts)),
            x=self.data.x_train,
            y=self.data.y_train,
            attack=self.attack,
            byzantine=set(self.byzantine),
            # the galaxies as they are now (an isolated galaxy's clients moved)
            galaxy_of=self.global_agg.assignment.galaxy_of,
            round=round,
            seed=self.config.seed,
            generator=self.generator,
            lr=round_lr(self.config.training, round),
            defense=self.defense_config,
            reference=self.global_agg.reference_direction,
        )

    def _server_update(self, round: int) -> torch.Tensor:
        """FLTrust's server update: the global model trained on the root dataset
        as a client trains (same optimizer, learning rate and number of steps)."""
        assert self.root is not None
        # FLTrust's server takes as many local iterations as a client: its root
        # samples, cycled to a client's sample count, make a client's batches
        # (100 samples in batches of 32 took 4 steps where a client of 500 takes
        # 16, and the aggregate, which has the server update's norm, crawled)
        reps = -(-self.config.clients.samples_per_client // len(self.root))
        cycled = self.root.repeat(reps)[: self.config.clients.samples_per_client]
        update: torch.Tensor = self.trainer.train(
            self.spec.unflatten(self.global_agg.params),
            [ClientTask(cycled)],
            self.data.x_train,
            self.data.y_train,
            generator=self.root_generator,
            lr=round_lr(self.config.training, round),
        ).cpu()
        return update[0]

    def run_round(self, round: int) -> tuple[RoundMetrics, dict[str, Any]]:
        """One round; ``info["phases"]`` splits its seconds (``train``, ``commit``,
        ``trees``, ``receipts``, ``reveal``, ``statistics``, ``robust``,
        ``reputation``, ``galaxy_other``, ``audit``, ``publish``, ``eval``)."""
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        mark = [t0]

        def lap(name: str) -> None:
            now = time.perf_counter()
            phases[name] = phases.get(name, 0.0) + now - mark[0]
            mark[0] = now

        step = self.on_phase or (lambda r, name: None)
        step(round, "training")
        active = {
            g: agg
            for g, agg in self.galaxies.items()
            if g not in self.global_agg.isolated
        }
        for g in active.values():
            g.open_round(round)
        clients = [
            c
            for c in range(self.config.clients.count)
            if not self.galaxy_of(c).defense.banned(c) and self._sampled(round, c)
        ]
        updates = self._train(round, clients) if clients else torch.zeros(0)
        if self.root is not None:
            server = self._server_update(round)
            statement = self.global_agg.set_server_update(round, server)
            for g in active.values():
                g.set_server_update(round, server, statement)
        lap("train")
        step(round, "commitments")
        # Commit: only the hash travels.
        secrets: dict[int, tuple[bytes, bytes, Any]] = {}
        for i, c in enumerate(clients):
            tensors = self.spec.unflatten(updates[i])
            body = encode_update(tensors)
            galaxy = self.galaxy_of(c)
            commitment, nonce = commit(
                tensors, client_id=c, galaxy_id=galaxy.galaxy, round=round
            )
            galaxy.submit_commitment(
                commitment,
                sign_commitment(self.client_keys[c], commitment, run=self.run_id),
            )
            secrets[c] = (body, nonce, commitment)
        lap("commit")
        step(round, "Merkle trees")
        # Galaxy roots -> signed global head -> receipts.
        leaves = {}
        for gid, g in active.items():
            leaf = g.close_commit(round, force=True)
            if leaf is not None:
                self.global_agg.submit_leaf(leaf)
                leaves[gid] = leaf
            else:
                self.global_agg.submit_abstention(g.abstention(round))
        head = self.global_agg.close_leaves(round)
        for gid, g in active.items():
            if g.state == (round, "committed"):
                g.accept_head(round, head, self.global_agg.proof_for(gid))
        lap("trees")
        step(round, "receipts and reveals")
        # Each client verifies its receipt before revealing, and forwards the
        # galaxy's acknowledgement of its reveal to the global aggregator.
        receipts = []
        for c, (body, nonce, commitment) in secrets.items():
            galaxy = self.galaxy_of(c)
            receipt = galaxy.receipt(round, c)
            try:
                verify_receipt(
                    receipt,
                    global_key=self.global_key.public_key,
                    run=self.run_id,
                    commitment=commitment,
                    round=round,
                )
            except VerificationError:
                self.receipt_failures += 1
                continue
            receipts.append({"client": c, "round": round, "receipt": receipt.to_dict()})
            lap("receipts")
            try:
                signature = sign_reveal(
                    self.client_keys[c], commitment, body, nonce, run=self.run_id
                )
                ack = galaxy.submit_reveal(round, c, body, nonce, signature)
            except Rejected as exc:
                _log.info("client %d reveal rejected: %s", c, exc)
                continue
            self.global_agg.submit_ack(ack)
            lap("reveal")
        lap("reveal")
        step(round, "galaxy defense")
        # Galaxy defense and aggregation, then the audits and the global step.
        agg_seconds = 0.0
        reference = self.global_agg.reference_direction
        reports = {}
        events: list[dict[str, Any]] = []
        before = {c: self.galaxy_of(c).defense.tracker.reputation(c) for c in secrets}
        for gid, g in active.items():
            if g.state != (round, "reveal"):
                continue
            result = g.close_reveal(round, reference_direction=reference, force=True)
            reports[gid] = result.report
            for layer, sec in result.report.layer_seconds.items():
                phases[layer] = phases.get(layer, 0.0) + sec
            agg_seconds += result.report.seconds
            events += result.evidence
            # What the galaxy publishes, as a transport would carry it (a
            # compromised galaxy's may differ from what it computed).
            made = g.signed_aggregate(round)
            published = g.transcript(round)
            try:
                if made is not None:
                    self.global_agg.submit_aggregate(*made)
                if published is not None:
                    self.global_agg.submit_transcript(*published)
            except Rejected as exc:
                _log.warning("galaxy %d round %d refused: %s", gid, round, exc)
        lap("galaxy")
        step(round, "audit and global step")
        t_global = time.perf_counter()
        targets = self.global_agg.audit_targets(round)
        served = {
            gid: {
                c: data
                for c in wanted
                if (data := self.galaxies[gid].audit_update(round, c)) is not None
            }
            for gid, wanted in targets.items()
        }
        global_result = self.global_agg.finish_round(round, updates=served)
        agg_seconds += time.perf_counter() - t_global
        self._attribute(round, secrets, before, global_result)
        if global_result.misbehaved:
            self._fail_over()
        lap("audit")
        round_seconds = time.perf_counter() - t0
        self._publish(round, leaves, global_result, reference, receipts, events)
        # Keep the galaxies' last rounds only, as the services do (PG_KEEP_ROUNDS):
        # every round's revealed updates stayed in memory, 87 MB a round at 1,000
        # clients, until a 30-round run held 3.4 GB.
        for g in self.galaxies.values():
            g.store.drop_rounds_before(round - (KEEP_ROUNDS - 1))
        lap("publish")
        # Evaluate the new global model.
        step(round, "evaluation")
        t_eval = time.perf_counter()
        accuracy, loss, asr = self._evaluate()
        eval_seconds = time.perf_counter() - t_eval
        lap("eval")
        # the galaxies' own time, less the defense layers timed inside it
        phases["galaxy_other"] = phases.pop("galaxy") - sum(
            phases.get(k, 0.0) for k in ("statistics", "robust", "reputation")
        )
        statuses = [
            self.galaxy_of(c).defense.tracker.status(c)
            for c in range(self.config.clients.count)
        ]
        metrics = RoundMetrics(
            round=round,
            accuracy=accuracy,
            loss=loss,
            flagged=sum(
                1
                for r in reports.values()
                for o in r.outcomes.values()
                if not o.integrity or o.flagged
            ),
            quarantined=statuses.count("quarantined"),
            banned=statuses.count("banned"),
            flags_integrity=sum(r.layer_flags["integrity"] for r in reports.values()),
            flags_statistics=sum(r.layer_flags["statistics"] for r in reports.values()),
            flags_robust=sum(r.layer_flags["robust"] for r in reports.values()),
            galaxies_excluded=len(global_result.report.excluded),
            aggregation_seconds=agg_seconds,
            round_seconds=round_seconds,
            eval_seconds=eval_seconds,
            attack_success_rate=asr,
            galaxies_isolated=len(self.global_agg.isolated),
            byzantine_flagged=sum(
                1
                for r in reports.values()
                for c, o in r.outcomes.items()
                if c in self._byzantine_set and (not o.integrity or o.flagged)
            ),
            defense_fallbacks=sum(1 for r in reports.values() if r.fallback),
        )
        info = {
            "events": events,
            "excluded_galaxies": global_result.report.excluded,
            "misbehaved": [m.to_dict() for m in global_result.misbehaved],
            "phases": phases,
        }
        return metrics, info

    def _attribute(
        self,
        round: int,
        clients: Mapping[int, Any],
        before: Mapping[int, float],
        result: GlobalRoundResult,
    ) -> None:
        """Count honest clients a lying galaxy cost reputation, where the lie was
        not caught in the round it was told (a false attribution)."""
        caught = {m.galaxy for m in result.misbehaved}
        byzantine = set(self.byzantine)
        for gid, galaxy in self.galaxies.items():
            if not isinstance(galaxy, CompromisedGalaxy) or gid in caught:
                continue
            for c in galaxy.victims.get(round, []):
                tracker = galaxy.defense.tracker
                if (
                    c not in byzantine
                    and c in clients
                    and (tracker.reputation(c) < before[c])
                ):
                    self.false_attributions.add(c)

    def _fail_over(self) -> None:
        """After an isolation: the remaining galaxies take the signed placement and
        the moved clients' reputations, and the moved clients register there."""
        doc = self.global_agg.assignment_document()
        assignment = self.global_agg.assignment
        for gid in assignment.active():
            self.galaxies[gid].apply_assignment(doc)
        for c in assignment.moved():
            galaxy = self.galaxy_of(c)
            if galaxy.store.client_key(c) is None:
                self._register(galaxy, c)

    def _publish(
        self,
        round: int,
        leaves: Mapping[int, Any],
        result: GlobalRoundResult,
        reference: torch.Tensor | None,
        receipts: list[dict[str, Any]],
        events: list[dict[str, Any]],
    ) -> None:
        """Write the round's artefacts (see :mod:`protogalaxy.artefacts`)."""
        if self.artefacts is None or result.record is None:
            return
        state = self.global_agg.finished
        assert state is not None
        galaxies = {}
        for gid, leaf in leaves.items():
            galaxies[gid] = state.artefacts_of(gid, leaf)
            t = state.transcripts.get(gid)
            if t is not None:
                try:
                    wanted = updates_needed(t[0].body)
                except (KeyError, TypeError, ValueError):
                    wanted = []
                kept = {
                    c: body
                    for c in wanted
                    if (body := self.galaxies[gid].audit_update(round, c)) is not None
                }
                self.artefacts.write_updates(round, gid, kept)
        self.artefacts.write_round(
            round,
            record=result.record,
            galaxies=galaxies,
            reference=reference,
            misbehaviour=[m.to_dict() for m in result.misbehaved],
            server_update=result.server_update,
        )
        self.artefacts.append_evidence(events)
        self.artefacts.append_receipts(receipts)

    def _evaluate(self) -> tuple[float, float, float | None]:
        params = self.spec.unflatten(self.global_agg.params.to(self.device))
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(params[name])
        acc, loss = evaluate(self.model, self.data.x_test, self.data.y_test)
        asr = None
        if self.attack.name == "backdoor":
            target = self.attack.backdoor_target
            keep = self.data.y_test != target
            x = add_trigger(self.data.x_test[keep])
            y = torch.full((int(keep.sum()),), target, dtype=torch.int64)
            asr, _ = evaluate(self.model, x, y)
        elif self.attack.name == "targeted_flip":
            # source-class test images classified as the target
            keep = self.data.y_test == self.attack.source_class
            y = torch.full((int(keep.sum()),), self.attack.target_class)
            asr = evaluate(self.model, self.data.x_test[keep], y)[0] if len(y) else 0.0
        return acc, loss, asr

    # -- the run ---------------------------------------------------------------

    def run(
        self,
        progress: Callable[[RoundMetrics], None] | None = None,
        after_round: Callable[[SimulationResult], None] | None = None,
    ) -> SimulationResult:
        """Every round (or until the early stop) from where this simulation is:
        round 0, or the round after a saved state's (:meth:`load_state`).
        ``progress`` gets each round's metrics, ``after_round`` the result so far
        after each round (what an interrupted run can still write; the moment to
        :meth:`save_state`)."""
        p = self._progress
        if not p.history:
            p.history = {c: [] for c in range(self.config.clients.count)}
        t0 = time.perf_counter() - p.seconds
        es = self.config.early_stop
        while not p.stopped and p.next_round < self.config.training.rounds:
            r = p.next_round
            metrics, info = self.run_round(r)
            p.rounds.append(metrics)
            p.events += info["events"]
            for c in p.history:
                tracker = self.galaxy_of(c).defense.tracker
                p.history[c].append(tracker.reputation(c))
                if tracker.status(c) != "active":
                    p.quarantined_ever.add(c)
            p.next_round = r + 1
            p.seconds = time.perf_counter() - t0
            if es.enabled and len(p.rounds) > es.window:
                now = getattr(p.rounds[-1], es.metric)
                then = getattr(p.rounds[-1 - es.window], es.metric)
                gain = now - then if es.metric == "accuracy" else then - now
                p.stopped = gain < es.min_delta
            if progress is not None:
                progress(metrics)
            if after_round is not None:
                after_round(self.result())
        return self.result()

    # -- saved state (simulate --resume) ---------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        state["data"] = None  # the dataset is loaded again (or passed) on resume
        state["on_phase"] = None
        # the partition's index tensors are views of one permutation of the
        # whole training set: saved alone, each would carry all of it
        state["parts"] = [p.clone() for p in self.parts]
        return state

    def save_state(self, path: str | Path) -> None:
        """Write everything the next rounds depend on to ``path`` (atomically,
        mode 0600: it holds every party's private key), so that
        :meth:`load_state` continues with exactly the results of a run that was
        never stopped. The file is a Python pickle: resume only your own."""
        path = Path(path)
        sizes = {}
        if self.artefacts is not None:
            for name in _APPENDED:
                file = self.artefacts.root / name
                sizes[name] = file.stat().st_size if file.exists() else 0
        blob = pickle.dumps(
            {
                "version": _STATE_VERSION,
                "torch": torch.__version__,
                "simulation": self,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": (
                    torch.cuda.get_rng_state_all()
                    if torch.cuda.is_available()
                    else None
                ),
                "artefact_sizes": sizes,
            },
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load_state(
        cls,
        path: str | Path,
        *,
        dataset: Dataset | None = None,
        out: str | Path | None = None,
    ) -> Simulation:
        """A simulation saved by :meth:`save_state`, ready to :meth:`run` on from
        the round after the saved one; its artefacts go on in ``out`` (default:
        the state file's directory, where ``simulate`` keeps it). Refuses a file
        that another user owns or that others can write (it is a pickle, which
        runs code when loaded)."""
        path = Path(path)
        try:  # the file checked is the file read: no link followed, no swap between
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise StateError(f"{path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise StateError(
                    f"{path} is not yours alone (owner uid {st.st_uid}, mode "
                    f"{stat.filemode(st.st_mode)}): a saved state is a pickle, which "
                    "runs code when loaded; resume only your own runs"
                )
            try:
                state = pickle.load(f)  # checked above: the user's own file
            except (
                pickle.UnpicklingError, EOFError, ImportError, AttributeError,
                ValueError, TypeError,
            ) as exc:  # fmt: skip
                raise StateError(
                    f"{path} cannot be read back ({type(exc).__name__}: {exc}); a "
                    "state made through the Python API needs the same components "
                    "registered"
                ) from None
        if (
            not isinstance(state, dict)
            or state.get("version") != _STATE_VERSION
            or not {"torch", "simulation", "torch_rng", "cuda_rng",
                    "artefact_sizes"} <= set(state)
        ):  # fmt: skip
            raise StateError(f"{path} is not a saved state this version can resume")
        if state["torch"] != torch.__version__:
            raise StateError(
                f"{path} was saved with torch {state['torch']}, this is "
                f"{torch.__version__}: the rest of the run would not match"
            )
        sim: Simulation = state["simulation"]
        if not isinstance(sim, Simulation):
            raise StateError(f"{path} is not a saved state this version can resume")
        root = Path(out) if out is not None else path.parent
        meta = root / "run.json"
        if sim.artefacts is not None and meta.exists():
            import json

            ran = json.loads(meta.read_text(encoding="utf-8")).get("run")
            if ran != sim.run_id:
                raise StateError(
                    f"{path} is of run {sim.run_id!r}, but {root} holds run "
                    f"{ran!r}: a state resumes only the run it was saved in"
                )
        sim.data = dataset or load_dataset(
            sim.config.dataset.name, root=sim.config.dataset.root
        )
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if sim.artefacts is not None:
            sim._rewind_artefacts(root, state["artefact_sizes"])
            sim.artefacts = ArtefactWriter(
                root, keep_updates=sim.artefacts.keep_updates
            )
        return sim

    def _rewind_artefacts(self, root: Path, sizes: Mapping[str, int]) -> None:
        """Drop what rounds after the saved one published (a run stopped in the
        middle of a round): they are run again."""
        for name, size in sizes.items():
            f = root / name
            if f.exists() and f.stat().st_size > size:
                with open(f, "r+b") as fh:
                    fh.truncate(size)
        for parent in (root / "audit" / "rounds", root / "audit" / "updates"):
            if parent.is_dir():
                for d in parent.iterdir():
                    if d.name.isdigit() and int(d.name) >= self._progress.next_round:
                        shutil.rmtree(d, ignore_errors=True)

    def result(self) -> SimulationResult:
        """The result of the rounds run so far."""
        p = self._progress
        removed = [
            c
            for c in range(self.config.clients.count)
            if self.galaxy_of(c).defense.tracker.status(c) != "active"
        ]
        return SimulationResult(
            self.config,
            list(p.rounds),
            self.byzantine,
            sorted(p.quarantined_ever),
            removed,
            list(p.events),
            {c: list(h) for c, h in p.history.items()},
            p.seconds,
            p.stopped,
            {
                "receipt_failures": self.receipt_failures,
                "galaxies": self._galaxy_summary(),
            },
        )

    def final_params(self) -> dict[str, torch.Tensor]:
        """The global model now, by tensor name (the model's own names)."""
        return self.spec.unflatten(self.global_agg.params.detach().clone())

    def _galaxy_summary(self) -> dict[str, Any]:
        """Galaxies compromised, isolated (with the round each was caught in),
        and false attributions."""
        isolated = self.global_agg.isolated
        compromised = sorted(self.compromised)
        return {
            "attack": None if not compromised else self.config.galaxy_attack.kind,
            "compromised": compromised,
            "isolated": {str(g): v["round"] for g, v in sorted(isolated.items())},
            "misbehaviour": {str(g): v["kind"] for g, v in sorted(isolated.items())},
            "detection_rate": (
                len(set(compromised) & set(isolated)) / len(compromised)
                if compromised
                else None
            ),
            "false_isolations": sorted(set(isolated) - set(compromised)),
            "false_attributions": len(self.false_attributions),
        }
