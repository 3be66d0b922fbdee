#!/usr/bin/env python3
"""Generate what the chart knows about the app's configuration from the app itself,
so a value the app refuses can never render:

* in charts/values.schema.json, ``run.extraConfig`` is the JSON schema of
  ``protogalaxy.config.SimulationConfig`` (every key optional, unknown keys
  refused), with the names the app accepts (attacks, aggregators, galaxy attacks,
  layers) as enums; the chart's own values that map onto config keys
  (``VALUES`` below) take the same constraints;
* charts/templates/_config.tpl holds the aggregators' minimum galaxy sizes,
  ``min_clients(f) = a f + c`` as ``[a, c]``, for the feasibility check in
  _helpers.tpl.

``--check`` fails instead when either file is out of date (a test runs it).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protogalaxy.config import SimulationConfig  # noqa: E402
from protogalaxy.defense.robust import (  # noqa: E402
    available_aggregators,
    get_aggregator,
    resolve_aggregator,
)
from protogalaxy.learning.attacks import ATTACKS  # noqa: E402
from protogalaxy.learning.partition import PARTITIONS  # noqa: E402
from protogalaxy.plugins import IMPORT_PATH  # noqa: E402
from protogalaxy.protocol.compromised import GALAXY_ATTACKS  # noqa: E402

SCHEMA = ROOT / "charts" / "values.schema.json"
TEMPLATE = ROOT / "charts" / "templates" / "_config.tpl"
SERVICE_AGGREGATORS = [
    a for a in available_aggregators() if not resolve_aggregator(a).needs_server_update
]

#: chart value -> the config key it renders (charts/templates/_helpers.tpl,
#: protogalaxy.runConfig)
VALUES = {
    "run.seed": "seed",
    "run.model": "model",
    "run.rounds": "training.rounds",
    "run.partition": "clients.partition",
    "clients.count": "clients.count",
    "galaxies.count": "galaxies.count",
    "clients.byzantine.fraction": "byzantine.fraction",
    "clients.byzantine.attack": "byzantine.attack",
    "defense.aggregator": "defense.aggregator",
    "defense.byzantineFraction": "defense.byzantine_fraction",
    "defense.layers": "defense.layers",
}

#: datasets the image can load (MNIST is inside it; Fashion-MNIST from a mounted
#: directory; CIFAR-10 needs torchvision, which the image does not carry)
CHART_DATASETS = ["mnist", "fashion-mnist"]


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _strip(v) for k, v in node.items() if k not in ("title", "description")
        }
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def config_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the config's schema, its definitions), draft-07, names as enums."""
    raw = SimulationConfig.model_json_schema(ref_template="#/definitions/{model}")
    defs = _strip(raw.pop("$defs"))
    top = _strip(raw)
    # a built-in attack, or a user's by import path (the module must be in the image)
    defs["ByzantineSection"]["properties"]["attack"]["pattern"] = (
        f"^({'|'.join(ATTACKS)}|{IMPORT_PATH})$"
    )
    defs["ClientsSection"]["properties"]["partition"]["pattern"] = (
        f"^({'|'.join(PARTITIONS)}|{IMPORT_PATH})$"
    )
    defense = defs["DefenseSection"]["properties"]
    # A rule that needs the server's root-data update (FLTrust) runs in
    # `protogalaxy simulate` only: the services hold no root dataset.
    defense["aggregator"]["enum"] = SERVICE_AGGREGATORS
    defense["layers"]["items"] = {"type": "integer", "enum": [1, 2, 3, 4, 5]}
    defense["layers"]["contains"] = {"const": 1}
    defense["layers"]["minItems"] = 1
    defs["GalaxyAttackSection"]["properties"]["kind"]["enum"] = list(GALAXY_ATTACKS)
    return top, defs


def leaf(top: dict[str, Any], defs: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = top
    for part in dotted.split("."):
        node = node["properties"][part]
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[1]]
    out = {k: v for k, v in node.items() if k != "default"}
    return copy.deepcopy(out)


def aggregator_offsets() -> dict[str, list[int]]:
    """[a, c] with min_clients(f) = a f + c for each aggregator (checked to be
    linear in f)."""
    out = {}
    for name in SERVICE_AGGREGATORS:
        agg = get_aggregator(name, byzantine_fraction=0.3)
        if name == "fedavg":  # never checked: it tolerates no one
            out[name] = [0, 0]
            continue
        a = agg.min_clients(2) - agg.min_clients(1)
        c = agg.min_clients(1) - a
        if any(agg.min_clients(f) != a * f + c for f in range(1, 50)):
            raise SystemExit(f"{name}: min_clients is not a f + c; teach the chart")
        out[name] = [a, c]
    return out


def render_schema(current: dict[str, Any]) -> dict[str, Any]:
    top, defs = config_schema()
    schema = copy.deepcopy(current)
    schema["definitions"] = defs
    run = schema["properties"]["run"]["properties"]
    extra = {k: v for k, v in top.items() if k not in ("required",)}
    extra["description"] = "Further config keys, merged last (docs/configuration.md)"
    run["extraConfig"] = extra
    for value, key in VALUES.items():
        node = schema
        for part in value.split("."):
            node = node["properties"][part]
        node.clear()
        node.update(leaf(top, defs, key))
    # One Deployment, Service, key and Redis user per galaxy: the chart's limit
    # (the Redis Secret holding every galaxy's password stays far below 1 MiB).
    schema["properties"]["galaxies"]["properties"]["count"]["maximum"] = 1000
    dataset = schema["properties"]["run"]["properties"]["dataset"]
    dataset.clear()
    dataset.update({"type": "string", "enum": CHART_DATASETS})
    return schema


#: config keys a chart value sets (run.extraConfig may not: the workloads follow
#: the value, e.g. one Deployment per galaxy, one key per client)
OWNED = {key: value for value, key in VALUES.items()} | {
    "dataset.name": "run.dataset",
    "dataset.root": "run.datasetRoot",
}


def reveal_sizes() -> dict[str, int]:
    """Bytes of one reveal (a whole update) of each model, 10 classes."""
    import torch

    from protogalaxy.codec import encode_update
    from protogalaxy.learning.models import _MODELS, build_model
    from protogalaxy.spec import UpdateSpec

    out = {}
    for name in sorted(_MODELS):
        spec = UpdateSpec.from_params(dict(build_model(name).named_parameters()))
        out[name] = len(encode_update(spec.unflatten(torch.zeros(spec.numel))))
    return out


def render_template() -> str:
    table = json.dumps(aggregator_offsets(), sort_keys=True)
    sizes = json.dumps(reveal_sizes(), sort_keys=True)
    owned = json.dumps(OWNED, sort_keys=True)
    return (
        "{{/* Generated by scripts/chart-config.py from the app: do not edit. */}}\n"
        "{{/* Each aggregator's smallest galaxy: min_clients(f) = a f + c, "
        "as [a, c]. */}}\n"
        '{{- define "protogalaxy.aggregatorMinClients" -}}\n'
        f"{table}\n"
        "{{- end }}\n"
        "{{/* Bytes of one update of each model (galaxies.maxUpdateBytes floor). */}}\n"
        '{{- define "protogalaxy.revealBytes" -}}\n'
        f"{sizes}\n"
        "{{- end }}\n"
        "{{/* Config keys chart values set (config key -> value). */}}\n"
        '{{- define "protogalaxy.ownedConfigKeys" -}}\n'
        f"{owned}\n"
        "{{- end }}\n"
    )


def main(argv: list[str]) -> int:
    check = argv == ["--check"]
    current = json.loads(SCHEMA.read_text())
    schema = json.dumps(render_schema(current), indent=2) + "\n"
    template = render_template()
    stale = [
        p.relative_to(ROOT).as_posix()
        for p, text in ((SCHEMA, schema), (TEMPLATE, template))
        if not p.exists() or p.read_text() != text
    ]
    if check:
        if stale:
            print(f"out of date: {', '.join(stale)} (run scripts/chart-config.py)")
            return 1
        return 0
    SCHEMA.write_text(schema)
    TEMPLATE.write_text(template)
    print("wrote", ", ".join(stale) or "nothing (current)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
