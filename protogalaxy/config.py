"""Run configuration: YAML, validated on load.

Unknown keys and impossible values are errors that name the key, e.g.
``byzantine.fraction: 0.4 puts 4 Byzantine clients in galaxy 0 ...``. The built-in
default is the seed MVP: MNIST, 30 clients in 3 galaxies (galaxy = client_id mod 3),
9 Byzantine label flippers, IID 2,000 samples each, 10 rounds of 1 local epoch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protogalaxy.defense.galaxy import GalaxyScreenConfig
from protogalaxy.defense.pipeline import DefenseConfig
from protogalaxy.defense.reputation import ReputationConfig
from protogalaxy.defense.robust import get_aggregator, resolve_aggregator, share_of
from protogalaxy.defense.statistical import StatisticsConfig
from protogalaxy.learning.attacks import (
    AttackConfig,
    check_adaptive_params,
    resolve_attack,
)
from protogalaxy.plugins import imports_allowed
from protogalaxy.protocol.compromised import GALAXY_ATTACKS, GalaxyAttack
from protogalaxy.protocol.sampling import MAX_EXCEED, Sampling, exceed_probability

__all__ = ["ConfigError", "SimulationConfig", "load_config", "recorded_config"]


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSection(_Section):
    #: mnist, fashion-mnist, cifar10, a name registered with
    #: protogalaxy.learning.datasets.register_dataset, or "package.module:attr"
    name: str = Field(
        "mnist",
        json_schema_extra={
            "pattern": r"^(mnist|fashion-mnist|cifar10|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$"
        },
    )

    @model_validator(mode="after")
    def _known(self) -> DatasetSection:
        from protogalaxy.learning.datasets import resolve_dataset

        if imports_allowed():  # an audit does not need it
            resolve_dataset(self.name)  # a clear error for an unknown name
        return self

    #: An IDX directory (MNIST, Fashion-MNIST) or a torchvision root (CIFAR-10).
    root: str | None = None


class ClientsSection(_Section):
    count: int = Field(30, ge=1, le=100_000)
    #: Share of each galaxy's clients that take part in a round, drawn from the
    #: run's seed (Flower's fraction_fit; protogalaxy/protocol/sampling.py).
    fraction_fit: float = Field(1.0, gt=0, le=1)
    samples_per_client: int = Field(2000, ge=1)
    #: iid, dirichlet, powerlaw, a name registered with
    #: protogalaxy.learning.partition.register_partition, or "package.module:fn"
    partition: str = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    powerlaw_exponent: float = Field(1.5, gt=0)

    @model_validator(mode="after")
    def _partition_known(self) -> ClientsSection:
        from protogalaxy.learning.partition import resolve_partition

        if imports_allowed():  # an audit does not need it
            resolve_partition(self.partition)  # a clear error for an unknown name
        return self


class GalaxiesSection(_Section):
    count: int = Field(3, ge=1)


class ByzantineSection(_Section):
    fraction: float = Field(0.3, ge=0.0, lt=0.5)
    attack: str = "label_flip"
    #: Fraction of rounds the attack is active in (intermittent attacks), seeded.
    rounds_fraction: float = Field(1.0, gt=0.0, le=1.0)
    scale: float = 10.0
    sign_flip_scale: float = Field(4.0, gt=0)
    noise_std: float = Field(0.1, gt=0)
    ipm_epsilon: float = Field(0.5, gt=0)
    alie_z: float | None = None
    backdoor_target: int = Field(0, ge=0)
    backdoor_fraction: float = Field(0.5, gt=0, le=1)
    #: targeted_flip: the class relabelled, and the class it becomes.
    source_class: int = Field(3, ge=0)
    target_class: int = Field(7, ge=0)
    #: Settings of a user's own attack, passed to it as ``config.params``.
    params: dict[str, float | int | str | bool] = {}

    @model_validator(mode="after")
    def _attack_known(self) -> ByzantineSection:
        if self.attack != "none" and imports_allowed():  # an audit does not need it
            resolve_attack(self.attack)  # a clear ValueError for an unknown name
        if self.attack == "adaptive":
            check_adaptive_params(self.params)
        return self


class TrainingSection(_Section):
    rounds: int = Field(10, ge=1)
    local_epochs: int = Field(1, ge=1)
    #: Local SGD steps per round for every client, whatever its data size (batches
    #: of min(batch_size, samples), reshuffled pass after pass); replaces
    #: local_epochs when set.
    local_steps: int | None = Field(None, ge=1)
    #: Floor on a client's local SGD steps per round: a client whose local_epochs
    #: give fewer batches takes further passes over its data (docs/scale.md: with
    #: 1,000 clients of 45 samples, one epoch is 2 steps and the model stays at
    #: chance). Clients of the default size take 63 steps an epoch, unaffected.
    min_local_steps: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0)
    #: Local learning rate by round: constant, cosine (lr down to lr_min over the
    #: run's rounds) or step (times lr_gamma every lr_step_rounds rounds).
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    lr_min: float = Field(0.0, ge=0)
    lr_step_rounds: int = Field(10, ge=1)
    lr_gamma: float = Field(0.5, gt=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    #: The global step on the combined update (docs/scale.md): fedavgm (server
    #: momentum), fedadam or fedyogi (Reddi et al. 2021).
    server_optimizer: Literal["fedavgm", "fedadam", "fedyogi"] = "fedavgm"
    #: Server step size; default 1.3 for fedavgm, 0.03 for fedadam and fedyogi.
    server_lr: float | None = Field(None, gt=0)
    #: fedavgm's momentum (0 is FedAvg), or the first-moment decay b1 of fedadam
    #: and fedyogi; default 0.5 for fedavgm, 0.9 for the others.
    server_momentum: float | None = Field(None, ge=0, lt=1)
    #: fedadam's and fedyogi's second-moment decay b2.
    server_beta2: float = Field(0.99, ge=0, lt=1)
    #: fedadam's and fedyogi's adaptivity tau (the second moment starts at tau^2).
    server_tau: float = Field(1e-3, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainingSection:
        if self.lr_schedule != "constant" and self.lr_min >= self.lr:
            raise ValueError(
                f"training.lr_min ({self.lr_min}) must be below training.lr "
                f"({self.lr}) for the {self.lr_schedule} schedule"
            )
        return self


class StatisticsSection(_Section):
    norm_k: float = Field(3.0, gt=0)
    cosine_threshold: float = Field(0.5, ge=-1, le=1)
    mad_k: float = Field(3.0, gt=0)
    bins: int = Field(64, ge=4)
    min_failures: int = Field(2, ge=1, le=4)
    #: The norm test's spread is at least this share of the median norm (0: off).
    norm_floor: float = Field(0.1, ge=0, lt=1)


class ReputationSection(_Section):
    initial: float = Field(0.5, ge=0, le=1)
    lam: float = Field(0.2, gt=0, le=1)
    #: How fast a reputation rises again (null: as fast as it falls, lam).
    lam_up: float | None = Field(0.05, gt=0, le=1)
    w_integrity: float = Field(0.1, ge=0)
    w_statistics: float = Field(0.3, ge=0)
    w_selected: float = Field(0.4, ge=0)
    w_history: float = Field(0.2, ge=0)
    quarantine_below: float = Field(0.3, ge=0, le=1)
    ban_below: float = Field(0.1, ge=0, le=1)


class GalaxyScreenSection(_Section):
    norm_k: float = Field(3.0, gt=0)
    cosine_threshold: float = Field(0.0, ge=-1, le=1)
    agreement_threshold: float = Field(0.0, ge=-1, le=1)
    min_failures: int = Field(2, ge=1, le=3)
    lam: float = Field(0.2, gt=0, le=1)
    exclude_below: float = Field(0.3, ge=0, le=1)
    #: A galaxy aggregate above this many times the median norm of the last rounds'
    #: accepted aggregates is clipped to that bound.
    max_norm_growth: float = Field(10.0, gt=1)
    #: No galaxy aggregate is applied with a norm above this many times the model's
    #: norm (at least 1): the bound with fewer than three galaxies and no history.
    max_update_ratio: float = Field(1.0, gt=0)


class DefenseSection(_Section):
    #: Layers that run: 1 integrity, 2 statistics, 3 robust aggregation,
    #: 4 reputation, 5 galaxy screening. [1] with aggregator fedavg is plain FedAvg.
    layers: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    aggregator: str = "multikrum"
    #: Fraction of Byzantine updates per galaxy the robust rule is tuned for (f).
    byzantine_fraction: float = Field(0.3, ge=0, lt=0.5)
    trust_weighted: bool = False
    #: FLTrust's root dataset: this many training samples, drawn at random, that
    #: the global aggregator holds and trains on each round (only read by a rule
    #: that needs a server update, i.e. aggregator fltrust).
    root_samples: int = Field(100, ge=1)
    statistics: StatisticsSection = StatisticsSection()
    reputation: ReputationSection = ReputationSection()
    galaxy: GalaxyScreenSection = GalaxyScreenSection()

    @model_validator(mode="after")
    def _check(self) -> DefenseSection:
        if 1 not in self.layers or not set(self.layers) <= {1, 2, 3, 4, 5}:
            raise ValueError(
                f"layers must include 1 and lie within 1..5, got {self.layers}"
            )
        resolve_aggregator(self.aggregator)  # a clear ValueError for unknown names
        w = self.reputation
        total = w.w_integrity + w.w_statistics + w.w_selected + w.w_history
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"reputation weights must sum to 1, got {total}")
        if w.ban_below > w.quarantine_below:
            raise ValueError("reputation.ban_below must not exceed quarantine_below")
        return self

    def build(self) -> DefenseConfig:
        return DefenseConfig(
            layers=frozenset(self.layers),
            aggregator=self.aggregator,
            byzantine_fraction=self.byzantine_fraction,
            trust_weighted=self.trust_weighted,
            statistics=StatisticsConfig(**self.statistics.model_dump()),
            reputation=ReputationConfig(**self.reputation.model_dump()),
            galaxy=GalaxyScreenConfig(**self.galaxy.model_dump()),
        )


class AuditSection(_Section):
    #: Check every galaxy's signed transcript and replay galaxies' rounds (off only
    #: to show what the audit catches).
    enabled: bool = True
    #: Share of the galaxies replayed from their updates each round (drawn after
    #: the aggregates arrived); the others' transcripts are still checked.
    fraction: float = Field(1.0, ge=0, le=1)
    #: Rounds of revealed updates kept in the run directory for `protogalaxy audit`
    #: (the last ones; 0 keeps none, the transcripts are always kept).
    keep_updates: int = Field(3, ge=0)


class GalaxyAttackSection(_Section):
    #: The galaxy that is compromised (none: every galaxy is honest).
    galaxy: int | None = Field(None, ge=0)
    #: modify, drop, frame_rejection, frame_statistics, inflate_weight,
    #: inconsistent_aggregate or withhold_transcript.
    kind: str = "modify"
    #: The first round it lies in.
    from_round: int = Field(2, ge=0)
    #: Share of its clients it lies about each round (at least one).
    fraction: float = Field(0.2, gt=0, le=1)

    @model_validator(mode="after")
    def _kind_known(self) -> GalaxyAttackSection:
        if self.kind not in GALAXY_ATTACKS:
            raise ValueError(
                f"kind must be one of {', '.join(GALAXY_ATTACKS)}; got {self.kind!r}"
            )
        return self


class EarlyStopSection(_Section):
    enabled: bool = False
    metric: Literal["accuracy", "loss"] = "accuracy"
    #: Stop when the metric improved by less than min_delta over this many rounds.
    window: int = Field(3, ge=1)
    min_delta: float = Field(0.002, ge=0)


class SimulationConfig(_Section):
    seed: int = 0
    dataset: DatasetSection = DatasetSection()
    #: mnist_cnn, resnet18, a name registered with
    #: protogalaxy.learning.models.register_model, or "package.module:attr"
    model: str = Field(
        "mnist_cnn",
        # What a deployment can name (a registered name exists only in a process
        # that registered it): the chart's schema refuses anything else.
        json_schema_extra={
            "pattern": r"^(mnist_cnn|resnet18|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$"
        },
    )
    clients: ClientsSection = ClientsSection()
    galaxies: GalaxiesSection = GalaxiesSection()
    byzantine: ByzantineSection = ByzantineSection()
    training: TrainingSection = TrainingSection()
    defense: DefenseSection = DefenseSection()
    audit: AuditSection = AuditSection()
    galaxy_attack: GalaxyAttackSection = GalaxyAttackSection()
    early_stop: EarlyStopSection = EarlyStopSection()
    #: Largest accepted update body in bytes.
    max_update_bytes: int = Field(64 << 20, ge=1024)

    def galaxy_of(self, client: int) -> int:
        return client % self.galaxies.count

    def galaxy_members(self) -> dict[int, list[int]]:
        members: dict[int, list[int]] = {g: [] for g in range(self.galaxies.count)}
        for c in range(self.clients.count):
            members[self.galaxy_of(c)].append(c)
        return members

    def byzantine_per_galaxy(self) -> dict[int, int]:
        """Byzantine clients in each galaxy: ``fraction * galaxy size`` rounded half
        to even (the product in exact decimal arithmetic, as :func:`share_of`)."""
        return {
            g: round(share_of(self.byzantine.fraction, len(m)))
            for g, m in self.galaxy_members().items()
        }

    def attack(self) -> AttackConfig:
        b = self.byzantine
        return AttackConfig(
            name=b.attack,
            scale=b.scale,
            sign_flip_scale=b.sign_flip_scale,
            noise_std=b.noise_std,
            ipm_epsilon=b.ipm_epsilon,
            alie_z=b.alie_z,
            backdoor_target=b.backdoor_target,
            backdoor_fraction=b.backdoor_fraction,
            rounds_fraction=b.rounds_fraction,
            source_class=b.source_class,
            target_class=b.target_class,
            params=dict(b.params),
        )

    def galaxy_attack_config(self) -> GalaxyAttack | None:
        """The compromised galaxy's attack, or None when every galaxy is honest."""
        a = self.galaxy_attack
        if a.galaxy is None:
            return None
        return GalaxyAttack(a.kind, a.from_round, a.fraction, self.seed)

    def check_services(self) -> None:
        """Raise a ValueError naming what the services cannot run: a rule that
        needs the server's update on a root dataset (FLTrust) runs in
        ``protogalaxy simulate`` only, since no service holds a root dataset."""
        if resolve_aggregator(self.defense.aggregator).needs_server_update:
            raise ValueError(
                f"defense.aggregator {self.defense.aggregator} needs the global "
                "aggregator's update on a root dataset, which the services do not "
                "hold: it runs in `protogalaxy simulate` only"
            )

    def sampling(self) -> Sampling:
        """Who takes part in each round (everyone unless clients.fraction_fit)."""
        return Sampling(self.clients.fraction_fit, self.seed)

    def _check_sample(self, agg: Any, g: int, n: int, b: int, k: int) -> None:
        """The defense's f must hold for the sample, not only for the galaxy: a
        sample of k clients needs as many as the rule asks for its f, and holds
        more than f of the galaxy's b attackers in at most MAX_EXCEED of rounds."""
        f = agg.f_for(k)
        if k < agg.min_clients(f):
            raise ValueError(
                f"clients.fraction_fit {self.clients.fraction_fit} samples {k} of "
                f"galaxy {g}'s {n} clients, but {self.defense.aggregator} needs at "
                f"least {agg.min_clients(f)} for f = {f}"
            )
        p = exceed_probability(n, b, k, f)
        if p > MAX_EXCEED:
            raise ValueError(
                f"clients.fraction_fit {self.clients.fraction_fit} samples {k} of "
                f"galaxy {g}'s {n} clients, {b} of them Byzantine: the sample holds "
                f"more than the f = {f} that {self.defense.aggregator} tolerates "
                f"(defense.byzantine_fraction {self.defense.byzantine_fraction}) in "
                f"{p:.1%} of rounds (at most {MAX_EXCEED:.0%} is accepted); sample "
                f"more clients or raise defense.byzantine_fraction"
            )

    @model_validator(mode="after")
    def _feasible(self) -> SimulationConfig:
        attacked = self.galaxy_attack.galaxy
        if attacked is not None and attacked >= self.galaxies.count:
            raise ValueError(
                f"galaxy_attack.galaxy {attacked} does not exist (galaxies.count "
                f"{self.galaxies.count})"
            )
        if self.clients.count < self.galaxies.count:
            raise ValueError(
                f"clients.count ({self.clients.count}) is smaller than galaxies.count "
                f"({self.galaxies.count}): every galaxy needs clients"
            )
        from protogalaxy.learning.models import model_names

        if (
            ":" not in self.model
            and self.model not in model_names()
            and imports_allowed()  # an audit does not need it
        ):
            raise ValueError(
                f"model {self.model!r} is not one of {model_names()} nor an import "
                "path 'package.module:attr' (register your own with "
                "protogalaxy.learning.models.register_model)"
            )
        if self.model == "mnist_cnn" and self.dataset.name == "cifar10":
            raise ValueError(
                "model mnist_cnn takes 28x28 grey images; use resnet18 for cifar10"
            )
        if self.training.server_optimizer != "fedavgm" and 5 not in self.defense.layers:
            raise ValueError(
                f"training.server_optimizer {self.training.server_optimizer} needs "
                "defense layer 5: one unclipped galaxy aggregate inflates its second "
                "moment and freezes the model for hundreds of rounds"
            )
        agg = get_aggregator(
            self.defense.aggregator, byzantine_fraction=self.defense.byzantine_fraction
        )
        if self.defense.aggregator == "fedavg" or 3 not in self.defense.layers:
            return self
        members = self.galaxy_members()
        sampling = self.sampling()
        for g, b in self.byzantine_per_galaxy().items():
            n = len(members[g])
            if not sampling.everyone:
                self._check_sample(agg, g, n, b, sampling.size(n))
                continue
            f = agg.f_for(n)
            if b > f or n < agg.min_clients(f):
                raise ValueError(
                    f"byzantine.fraction {self.byzantine.fraction} puts {b} Byzantine "
                    f"clients in galaxy {g} of {n} clients, but "
                    f"{self.defense.aggregator} tolerates "
                    f"f = {f} there (defense.byzantine_fraction "
                    f"{self.defense.byzantine_fraction}; it needs at least "
                    f"{agg.min_clients(max(b, f))} clients)"
                )
        return self


def _format(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _suggestion(err["loc"])
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def _suggestion(loc: tuple[Any, ...]) -> str:
    """ ", did you mean 'x'?" for a misspelt key, from the keys of its section."""
    import difflib

    model: Any = SimulationConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type):
            return ""
        if not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    prefix = ".".join(str(p) for p in loc[:-1])
    return (
        f", did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
    )


def parse_config(data: dict[str, Any] | None) -> SimulationConfig:
    try:
        return SimulationConfig.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None


#: Settings added after runs were already being recorded, with the value that
#: reproduces what a run recorded before them did (its run.json lacks them).
_BEFORE_THEY_EXISTED: dict[tuple[str, ...], Any] = {
    ("defense", "statistics", "norm_floor"): 0.0,
}


def recorded_config(data: dict[str, Any]) -> SimulationConfig:
    """The configuration a run recorded (``run.json``): a setting added after the
    run was made takes the value that reproduces the run as it ran, not today's
    default, so an audit replays it with the rules it used."""
    data = copy.deepcopy(data)
    for path, value in _BEFORE_THEY_EXISTED.items():
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node.setdefault(path[-1], value)
    return parse_config(data)


def load_config(
    path: str | Path | None = None, *, overrides: dict[str, Any] | None = None
) -> SimulationConfig:
    """The default config, or ``path`` (YAML) on top of it; ``overrides`` last."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return parse_config(data)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value
