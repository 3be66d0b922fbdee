"""Configuration: defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from protogalaxy.config import ConfigError, load_config, parse_config
from protogalaxy.simulation import choose_byzantine


def test_default_is_the_seed_mvp() -> None:
    cfg = load_config()
    assert cfg.dataset.name == "mnist" and cfg.clients.count == 30
    assert cfg.galaxies.count == 3 and cfg.clients.samples_per_client == 2000
    assert cfg.training.rounds == 10 and cfg.training.local_epochs == 1
    assert cfg.byzantine.attack == "label_flip"
    byz = choose_byzantine(cfg)
    assert len(byz) == 9
    assert all(sum(1 for c in byz if c % 3 == g) == 3 for g in range(3))
    assert choose_byzantine(cfg) == byz  # seeded


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"clients": {"cuont": 3}}, "clients.cuont: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"clients": {"count": 0}}, "clients.count"),
        ({"byzantine": {"fraction": 0.6}}, "byzantine.fraction"),
        ({"byzantine": {"attack": "meteor"}}, "attack must be one of"),
        ({"defense": {"aggregator": "magic"}}, "aggregator must be one of"),
        ({"defense": {"layers": [2, 3]}}, "layers must include 1"),
        (
            {"clients": {"count": 2}, "galaxies": {"count": 3}},
            "smaller than galaxies.count",
        ),
        ({"training": {"lr": -1}}, "training.lr"),
        ({"defense": {"reputation": {"w_history": 0.5}}}, "weights must sum to 1"),
    ],
)
def test_errors_name_the_key(data: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_byzantine_fraction_multikrum_cannot_tolerate() -> None:
    with pytest.raises(
        ConfigError, match=r"byzantine\.fraction 0\.4 puts 4 Byzantine clients"
    ):
        parse_config({"byzantine": {"fraction": 0.4}})
    # Plain FedAvg makes no such promise: the baseline may run at any fraction.
    parse_config({"byzantine": {"fraction": 0.4}, "defense": {"aggregator": "fedavg"}})


def test_yaml_files_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  rounds: 3\nbyzantine:\n  attack: sign_flip\n")
    cfg = load_config(path, overrides={"seed": 5})
    assert (
        cfg.training.rounds == 3
        and cfg.byzantine.attack == "sign_flip"
        and cfg.seed == 5
    )
    path.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def _keys(model: object, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    out = []
    for name, value in model:  # type: ignore[attr-defined]
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out += _keys(value, key + ".")
        else:
            out.append(key)
    return out


def test_every_key_is_documented_and_every_documented_key_exists() -> None:
    import re

    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", doc, flags=re.M))
    keys = set(_keys(load_config()))
    assert keys - documented == set(), "undocumented keys"
    assert documented - keys == set(), "documented keys that do not exist"


def test_a_run_recorded_before_a_setting_existed_is_read_as_it_ran() -> None:
    """run.json of a run made before ``defense.statistics.norm_floor`` lacks it;
    the audit must replay that run without the floor (today's default is 0.1),
    under the defense digest such runs recorded (pinned: the digest of the
    default defense before the floor)."""
    from protogalaxy.config import recorded_config
    from protogalaxy.protocol.transcript import defense_digest

    before = "fa6447e780ab8915d46afd0ed1b150a33ba027572de46c555a13d3378d92f8ca"
    today = load_config()
    old = today.model_dump()
    del old["defense"]["statistics"]["norm_floor"]
    read = recorded_config(old)
    assert read.defense.statistics.norm_floor == 0.0
    assert defense_digest(read.defense.build()) == before
    assert "norm_floor" not in old["defense"]["statistics"]  # its input untouched
    # a run recorded with the setting keeps its own value
    assert recorded_config(today.model_dump()) == today
    assert today.defense.statistics.norm_floor == 0.1
    assert defense_digest(today.defense.build()) != before
