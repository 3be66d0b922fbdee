"""Byzantine attacks.

Data poisoning (applied to a Byzantine client's batches during local training):

* ``label_flip``: ``y -> (C - 1) - y`` (``9 - y`` for ten classes).
* ``targeted_flip``: ``source_class -> target_class`` only (3 -> 7 by default).
* ``backdoor``: a 4x4 bright patch in the bottom-right corner, relabelled to
  ``backdoor_target``, on a fraction of each batch (Bagdasaryan et al. 2020 style);
  success is measured as the attack success rate on triggered test images.

Model poisoning (applied to the trained update before it is committed):

* ``sign_flip``: ``-k u`` (``k = sign_flip_scale``, 4 by default: with ``k = 1`` a
  30% minority only slows plain averaging down); ``scaling``: ``lambda * u``;
  ``gaussian``: ``N(0, sigma^2)``.
* ``alie``, "A Little Is Enough" (Baruch, Baruch, Goldberg, NeurIPS 2019):
  ``mean - z * std`` of the benign updates, coordinate-wise, with
  ``z = Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - f``.
* ``ipm``, inner product manipulation (Xie, Koyejo, Gupta, UAI 2019):
  ``-epsilon * mean`` of the benign updates.
* ``min_max`` and ``min_sum`` (Shejwalkar and Houmansadr, NDSS 2021):
  ``mean - gamma * std`` of the benign updates, ``gamma`` as large as keeps the
  update's largest distance (min-max) or summed squared distance (min-sum) to the
  benign updates within theirs to each other.
* ``adaptive``: knows the defense's configuration (public: its digest is in every
  round record) and layer 2's direction reference (the running mean of the
  published global updates). Every attacker sends one row, turned from the benign
  mean's direction towards ``-p`` and on towards the benign mean's opposite, then
  lengthened, each as far as a replica of its galaxy's layers 2 and 3 neither
  flags an attacker row nor drops them all: it stays just inside the
  thresholds, so layer 4 sees a clean client (:func:`adaptive_rows`). ``p`` is
  ``byzantine.params.perturbation``: ``std`` (the benign standard deviation, the
  default) or ``sign`` (the benign mean's signs).

ALIE, IPM, min-max, min-sum and the adaptive attack are omniscient: they use the
benign updates of the attacker's galaxy.
An attack may be intermittent: active in a seeded fraction of rounds.

Your own attack is a function registered with :func:`data_attack` or
:func:`model_attack` (the built-ins above are registered the same way); a
configuration names it (``byzantine.attack: name``, or ``package.module:attr`` to
import it), and its settings come from ``byzantine.params``. See
``examples/own_attack.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from protogalaxy.plugins import resolve

__all__ = [
    "ATTACKS",
    "PERTURBATIONS",
    "Attack",
    "AttackConfig",
    "ModelAttackContext",
    "adaptive_rows",
    "add_trigger",
    "alie_z",
    "attack_names",
    "check_adaptive_params",
    "data_attack",
    "data_transform",
    "is_active",
    "model_attack",
    "poison_updates",
    "resolve_attack",
    "train_clients",
]

DATA_ATTACKS = ("label_flip", "targeted_flip", "backdoor")
MODEL_ATTACKS = (
    "sign_flip",
    "scaling",
    "gaussian",
    "alie",
    "ipm",
    "min_max",
    "min_sum",
    "adaptive",
)
#: The built-in attacks (``none`` is no attack).
ATTACKS = ("none", *DATA_ATTACKS, *MODEL_ATTACKS)


@dataclass(frozen=True)
class AttackConfig:
    name: str = "label_flip"
    num_classes: int = 10
    scale: float = 10.0
    sign_flip_scale: float = 4.0
    noise_std: float = 0.1
    ipm_epsilon: float = 0.5
    alie_z: float | None = None
    backdoor_target: int = 0
    backdoor_fraction: float = 0.5
    rounds_fraction: float = 1.0
    #: targeted_flip: the class relabelled, and what it becomes
    source_class: int = 3
    target_class: int = 7
    #: A user's attack's own settings (``byzantine.params`` in the config).
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name != "none":
            resolve_attack(self.name)  # raises for an unknown name
        if not 0.0 < self.rounds_fraction <= 1.0:
            raise ValueError(
                f"rounds_fraction must be in (0, 1], got {self.rounds_fraction}"
            )
        if not 0.0 < self.backdoor_fraction <= 1.0:
            raise ValueError("backdoor_fraction must be in (0, 1]")
        if self.name == "adaptive":
            check_adaptive_params(self.params)


@dataclass(frozen=True)
class ModelAttackContext:
    """What a model-poisoning attack sees: one galaxy's trained updates (rows are
    its clients in this round, honest and Byzantine), which rows are Byzantine,
    the attack's settings and a seeded generator. An attack that uses the honest
    rows is omniscient, as ALIE and IPM are."""

    updates: torch.Tensor
    byzantine: torch.Tensor
    config: AttackConfig
    generator: torch.Generator
    #: the run's defense (a ``DefenseConfig``): public, since its digest is in
    #: every signed round record. None where the caller has none.
    defense: Any = None
    #: layer 2's direction reference, the running mean of the accepted global
    #: updates (public, as every global model is); None before the first round's
    #: or where the caller does not track it.
    reference: torch.Tensor | None = None

    @property
    def rows(self) -> torch.Tensor:
        """Indices of the Byzantine rows, in order."""
        return self.byzantine.nonzero().squeeze(1)

    @property
    def own(self) -> torch.Tensor:
        """The Byzantine clients' own honestly trained updates."""
        return self.updates[self.rows]

    @property
    def benign(self) -> torch.Tensor:
        """The honest rows (all rows when every client is Byzantine)."""
        return (
            self.updates[~self.byzantine]
            if bool((~self.byzantine).any())
            else self.updates
        )


#: ``fn(x, y, config) -> (x, y)`` on a Byzantine client's batches: ``x`` is
#: ``(..., B, *input_shape)``, ``y`` is ``(..., B)``.
DataFn = Callable[
    [torch.Tensor, torch.Tensor, AttackConfig], tuple[torch.Tensor, torch.Tensor]
]
#: ``fn(ctx) -> rows``: the ``(len(ctx.rows), d)`` updates the Byzantine clients
#: commit instead of their trained ones.
ModelFn = Callable[[ModelAttackContext], torch.Tensor]


@dataclass(frozen=True)
class Attack:
    """A named attack: data poisoning (runs inside local training) or model
    poisoning (replaces the trained updates before they are committed)."""

    name: str
    kind: Literal["data", "model"]
    fn: Callable[..., Any]


_ATTACKS: dict[str, Attack] = {}


def _register(name: str, kind: Literal["data", "model"]) -> Callable[[Any], Attack]:
    if not name or ":" in name or name == "none":
        raise ValueError(
            f"an attack name is a plain word other than none, got {name!r}"
        )

    def wrap(fn: Callable[..., Any]) -> Attack:
        if name in _ATTACKS:
            raise ValueError(f"attack {name!r} is already registered")
        attack = Attack(name, kind, fn)
        _ATTACKS[name] = attack
        return attack

    return wrap


def data_attack(name: str) -> Callable[[DataFn], Attack]:
    """Decorator: register ``fn(x, y, config) -> (x, y)`` as data-poisoning attack
    ``name``; a configuration then names it (``byzantine.attack: name``)."""
    return _register(name, "data")


def model_attack(name: str) -> Callable[[ModelFn], Attack]:
    """Decorator: register ``fn(ctx: ModelAttackContext) -> rows`` as
    model-poisoning attack ``name``."""
    return _register(name, "model")


def attack_names() -> list[str]:
    """``none`` and every registered attack, built-in first."""
    return ["none", *_ATTACKS]


def resolve_attack(name: str) -> Attack:
    """A registered attack, or ``package.module:attr`` imported (an object the
    decorators returned)."""
    found: Attack = resolve(
        name,
        _ATTACKS,
        "attack",
        choices=attack_names(),
        accepts=lambda a: isinstance(a, Attack),
        expected="an attack: decorate it with protogalaxy.learning.attacks."
        "data_attack or model_attack",
    )
    return found


def check_adaptive_params(params: Mapping[str, Any]) -> None:
    """The adaptive attack's ``byzantine.params``: a ValueError naming the key."""
    p = params.get("perturbation", "std")
    if p not in PERTURBATIONS:
        raise ValueError(
            "byzantine.params.perturbation must be one of "
            f"{', '.join(PERTURBATIONS)}, got {p!r}"
        )


def is_active(config: AttackConfig, round: int, seed: int) -> bool:
    """Whether the (possibly intermittent) attack runs in ``round``; seeded."""
    if config.name == "none":
        return False
    if config.rounds_fraction >= 1.0:
        return True
    g = torch.Generator().manual_seed(seed * 1_000_003 + round)
    return bool(torch.rand((), generator=g) < config.rounds_fraction)


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    """Stamp the backdoor trigger on ``x`` (images ``(..., H, W)``): a 4x4 patch one
    pixel in from the bottom-right corner, set to the brightest value in ``x``."""
    out = x.clone()
    out[..., -5:-1, -5:-1] = x.max()
    return out


@data_attack("label_flip")
def _label_flip(
    x: torch.Tensor, y: torch.Tensor, config: AttackConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    return x, (config.num_classes - 1) - y


@data_attack("targeted_flip")
def _targeted_flip(
    x: torch.Tensor, y: torch.Tensor, config: AttackConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    return x, torch.where(y == config.source_class, config.target_class, y)


@data_attack("backdoor")
def _backdoor(
    x: torch.Tensor, y: torch.Tensor, config: AttackConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    # the first k samples of each client's batch (batch is the last dim of y)
    k = max(1, round(config.backdoor_fraction * y.shape[-1]))
    x = x.clone()
    y = y.clone()
    x[..., :k, :, :, :] = add_trigger(x[..., :k, :, :, :])
    y[..., :k] = config.backdoor_target
    return x, y


def data_transform(
    config: AttackConfig,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """The batch transform of a data-poisoning attack, or None."""
    if config.name == "none":
        return None
    attack = resolve_attack(config.name)
    if attack.kind != "data":
        return None
    fn = attack.fn

    def transform(
        x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = fn(x, y, config)
        ok = isinstance(out, tuple) and len(out) == 2
        if not ok or out[0].shape != x.shape or out[1].shape != y.shape:
            raise ValueError(
                f"attack {config.name!r} must return (x, y) of the shapes it was "
                f"given, {tuple(x.shape)} and {tuple(y.shape)}"
            )
        labels = out[1]
        if labels.numel() and (
            int(labels.min()) < 0 or int(labels.max()) >= config.num_classes
        ):
            raise ValueError(
                f"attack {config.name!r} made labels outside [0, "
                f"{config.num_classes}): {int(labels.min())}..{int(labels.max())}"
            )
        pair: tuple[torch.Tensor, torch.Tensor] = out
        return pair

    return transform


def alie_z(n: int, f: int) -> float:
    """The ALIE ``z_max`` for ``n`` clients of which ``f`` are Byzantine."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    p = min(max(p, 1e-6), 1 - 1e-6)
    # Phi^-1(p) = sqrt(2) erfinv(2p - 1)
    return float(math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0 * p - 1.0)))


@model_attack("sign_flip")
def _sign_flip(ctx: ModelAttackContext) -> torch.Tensor:
    return -ctx.config.sign_flip_scale * ctx.own


@model_attack("scaling")
def _scaling(ctx: ModelAttackContext) -> torch.Tensor:
    return ctx.config.scale * ctx.own


@model_attack("gaussian")
def _gaussian(ctx: ModelAttackContext) -> torch.Tensor:
    shape = (len(ctx.rows), ctx.updates.shape[1])
    noise = torch.randn(*shape, generator=ctx.generator)
    return ctx.config.noise_std * noise.to(ctx.updates.dtype)


@model_attack("alie")
def _alie(ctx: ModelAttackContext) -> torch.Tensor:
    n, f = len(ctx.updates), len(ctx.rows)
    z = ctx.config.alie_z if ctx.config.alie_z is not None else alie_z(n, f)
    row = ctx.benign.mean(0) - z * ctx.benign.std(0)
    return row.expand(f, -1)


@model_attack("ipm")
def _ipm(ctx: ModelAttackContext) -> torch.Tensor:
    row = -ctx.config.ipm_epsilon * ctx.benign.mean(0)
    return row.expand(len(ctx.rows), -1)


def _optimised(ctx: ModelAttackContext, *, min_sum: bool) -> torch.Tensor:
    """Shejwalkar and Houmansadr (NDSS 2021), AGR-agnostic, with the inverse
    standard deviation as perturbation: ``mean - gamma * std`` with the largest
    ``gamma`` (binary search from 10, 20 halvings) whose largest distance to a
    benign update (min-max) or sum of squared distances to them (min-sum) stays
    within the benign updates' own largest such figure."""
    benign = ctx.benign.double()
    mu, p = benign.mean(0), benign.std(0) if len(benign) > 1 else benign[0] * 0
    d = torch.cdist(benign, benign).pow(2)
    bound = float(d.sum(1).max() if min_sum else d.max())

    def fits(gamma: float) -> bool:
        far = (benign - (mu - gamma * p)).pow(2).sum(1)
        return float(far.sum() if min_sum else far.max()) <= bound

    gamma, step, best = 10.0, 5.0, 0.0
    for _ in range(20):
        if fits(gamma):
            best = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    row = (mu - best * p).to(ctx.updates.dtype)
    return row.expand(len(ctx.rows), -1)


@model_attack("min_max")
def _min_max(ctx: ModelAttackContext) -> torch.Tensor:
    return _optimised(ctx, min_sum=False)


@model_attack("min_sum")
def _min_sum(ctx: ModelAttackContext) -> torch.Tensor:
    return _optimised(ctx, min_sum=True)


PERTURBATIONS = ("std", "sign")


def _perturbation(benign: torch.Tensor, name: str) -> torch.Tensor:
    """The adaptive attack's ``p``: the benign coordinate-wise standard deviation
    (``std``) or the benign mean's signs (``sign``); only its direction counts."""
    check_adaptive_params({"perturbation": name})
    if name == "std":
        return benign.std(0) if len(benign) > 1 else torch.zeros_like(benign[0])
    return benign.mean(0).sign()


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = float(v.norm())
    return v / n if n > 0 else v


def adaptive_rows(
    ctx: ModelAttackContext, perturbation: str = "std"
) -> tuple[float, float, torch.Tensor]:
    """The adaptive attack's ``(tau, scale, rows)``. One row for every attacker
    (identical rows cluster, which Krum's scores reward), moved along a path of
    growing harm and then lengthened, as far as a fresh replica of the galaxy's
    layers 2 and 3 (``ctx.defense``, ``ctx.reference``) flags none of the
    attacker rows and selects at least one (it is then in the aggregate).

    The path runs from the benign mean's direction (``tau = 0``) to the
    perturbation's opposite ``-p`` (``tau = 1``) to the opposite of the benign
    mean (``tau = 2``); the row is ``scale * median norm`` long. First the
    largest ``tau`` that passes at the benign median norm (bisection), then the
    largest ``scale`` that passes there (doubling up to 64, then bisection).
    A rule that needs the server's update (FLTrust) is replayed with the benign
    mean in its place: the attacker does not see the server's root data. When
    even the benign mean's direction is caught, it sends that (``tau = 0``)."""
    from dataclasses import replace

    from protogalaxy.defense.pipeline import DefenseConfig, GalaxyDefense

    cfg = ctx.defense if ctx.defense is not None else DefenseConfig()
    # layer 4 only scores what layers 2 and 3 decided; layer 5 screens galaxies
    replica_cfg = replace(cfg, layers=cfg.layers & frozenset({1, 2, 3}))
    benign = ctx.benign.double()
    mu = benign.mean(0)
    median = float(torch.linalg.vector_norm(benign, dim=1).median())
    toward_mu, away = _unit(mu), _unit(-_perturbation(benign, perturbation))
    rows, n = ctx.rows, len(ctx.updates)
    replica = GalaxyDefense(0, replica_cfg)
    server = (
        mu.to(ctx.updates.dtype) if replica.aggregator.needs_server_update else None
    )

    def poisoned(tau: float, scale: float) -> torch.Tensor:
        if tau <= 1:
            v = (1 - tau) * toward_mu + tau * away
        else:
            v = (2 - tau) * away - (tau - 1) * toward_mu
        row = (scale * median) * _unit(v)
        return row.to(ctx.updates.dtype).expand(len(rows), -1)

    def passes(tau: float, scale: float) -> bool:
        x = ctx.updates.clone()
        x[rows] = poisoned(tau, scale)
        report = replica.run(
            round=0,
            clients=list(range(n)),
            updates=x,
            reference_direction=ctx.reference,
            server_update=server,
        )
        out = [report.outcomes[int(i)] for i in rows]
        return (
            report.fallback is None
            and not any(o.flagged for o in out)
            and any(o.selected for o in out)
        )

    def largest(ok: Callable[[float], bool], lo: float, hi: float) -> float:
        for _ in range(12):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo

    if median == 0 or not passes(0.0, 1.0):
        return 0.0, 1.0, poisoned(0.0, 1.0)
    tau = 2.0 if passes(2.0, 1.0) else largest(lambda t: passes(t, 1.0), 0.0, 2.0)
    scale = 1.0
    while scale < 64 and passes(tau, 2 * scale):
        scale *= 2
    if scale < 64:
        scale = largest(lambda s: passes(tau, s), scale, 2 * scale)
    return tau, scale, poisoned(tau, scale)


@model_attack("adaptive")
def _adaptive(ctx: ModelAttackContext) -> torch.Tensor:
    perturbation = str(ctx.config.params.get("perturbation", "std"))
    return adaptive_rows(ctx, perturbation)[2]


def poison_updates(
    config: AttackConfig,
    updates: torch.Tensor,
    byzantine: torch.Tensor,
    *,
    generator: torch.Generator,
    defense: Any = None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace the rows ``byzantine`` (bool mask) of one galaxy's ``updates``;
    ``defense`` and ``reference`` are what an adaptive attack may know (see
    :class:`ModelAttackContext`)."""
    if config.name == "none" or not bool(byzantine.any()):
        return updates
    attack = resolve_attack(config.name)
    if attack.kind != "model":
        return updates
    # copies: an attack writing into what it was given (in place) changes only
    # its own rows, never the honest clients' updates
    ctx = ModelAttackContext(
        updates.clone(),
        byzantine.clone(),
        config,
        generator,
        defense,
        None if reference is None else reference.clone(),
    )
    rows = attack.fn(ctx)
    want = (len(ctx.rows), updates.shape[1])
    if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != want:
        got = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows)
        raise ValueError(
            f"attack {config.name!r} returned {got}; it must return the Byzantine "
            f"rows, a tensor of shape {want}"
        )
    out = updates.clone()
    out[ctx.rows] = rows.to(updates.dtype)
    return out


def train_clients(
    trainer: Any,
    params: dict[str, torch.Tensor],
    clients: list[int],
    *,
    parts: Mapping[int, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    byzantine: set[int],
    galaxy_of: Callable[[int], int],
    round: int,
    seed: int,
    generator: torch.Generator,
    lr: float | None = None,
    defense: Any = None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """One round of local training for ``clients``, honest and Byzantine alike,
    at learning rate ``lr`` (the trainer's own when None). ``defense`` and
    ``reference`` are handed to model attacks (the run's public defense
    configuration and layer 2's direction reference).

    Data poisoning runs inside training; model poisoning replaces the Byzantine rows
    afterwards, galaxy by galaxy (ALIE and IPM see their own galaxy's benign updates).
    ``trainer`` is a :class:`~protogalaxy.learning.training.BatchedTrainer`. The
    simulation and the client runner both call this, so they train alike.
    """
    from protogalaxy.learning.training import ClientTask

    active = is_active(attack, round, seed)
    transform = data_transform(attack) if active else None
    tasks = [
        ClientTask(parts[c], transform if c in byzantine else None) for c in clients
    ]
    updates: torch.Tensor = trainer.train(
        params, tasks, x, y, generator=generator, lr=lr
    ).cpu()
    if active:
        for g in sorted({galaxy_of(c) for c in clients}):
            rows = [i for i, c in enumerate(clients) if galaxy_of(c) == g]
            mask = torch.tensor([clients[i] in byzantine for i in rows])
            updates[rows] = poison_updates(
                attack,
                updates[rows],
                mask,
                generator=generator,
                defense=defense,
                reference=reference,
            )
    return updates
