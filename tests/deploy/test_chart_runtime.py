"""What passes lint but breaks once the chart runs (issue 13), with the real helm
binary: values the app refuses must not render, the run's identity across
installs and upgrades, every client pod at once, names within 63 characters,
no service links, DNS that resolves on GKE."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from protogalaxy.config import ConfigError, load_config
from protogalaxy.learning.datasets import load_dataset
from tests.deploy.conftest import CHART
from tests.deploy.test_chart import (
    by_kind,
    env_of,
    pod_spec,
    render,
    run_id_of,
    script_check,
)

CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))


def _owned() -> set[str]:
    """The config keys chart values own (scripts/chart-config.py's OWNED)."""
    spec = importlib.util.spec_from_file_location(
        "chart_config", CHART.parent / "scripts" / "chart-config.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return set(module.OWNED)


OWNED = _owned()


def _reveal_sizes() -> dict[str, int]:
    from protogalaxy.codec import encode_update
    from protogalaxy.learning.models import build_model
    from protogalaxy.spec import UpdateSpec

    out = {}
    for name in ("mnist_cnn", "resnet18"):
        spec = UpdateSpec.from_params(dict(build_model(name).named_parameters()))
        out[name] = len(encode_update(spec.unflatten(torch.zeros(spec.numel))))
    return out


REVEAL = _reveal_sizes()


def helm_template(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), "template", "pg", str(CHART), "-n", "fl", *args],
        capture_output=True,
        text=True,
    )


def config_of(values: dict[str, Any]) -> dict[str, Any]:
    """The config.yaml the chart's mapping (protogalaxy.runConfig) makes of
    ``values`` merged over values.yaml, built here without helm."""
    base = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and k in out else v
        return out

    v = merge(base, values)
    config: dict[str, Any] = {
        "seed": v["run"]["seed"],
        "dataset": {"name": v["run"]["dataset"]},
        "model": v["run"]["model"],
        "clients": {"count": v["clients"]["count"], "partition": v["run"]["partition"]},
        "galaxies": {"count": v["galaxies"]["count"]},
        "byzantine": {
            "fraction": v["clients"]["byzantine"]["fraction"],
            "attack": v["clients"]["byzantine"]["attack"],
        },
        "training": {"rounds": v["run"]["rounds"]},
        "defense": {
            "aggregator": v["defense"]["aggregator"],
            "byzantine_fraction": v["defense"]["byzantineFraction"],
            "layers": v["defense"]["layers"],
        },
    }
    if v["run"]["datasetRoot"]:
        config["dataset"]["root"] = v["run"]["datasetRoot"]
    return merge(config, v["run"]["extraConfig"])


def app_refuses(values: dict[str, Any]) -> str | None:
    """Why the app would refuse to start on what ``values`` render, or None:
    its config validation, then what its image can load (MNIST is in it; any
    other dataset needs a mounted root; CIFAR-10 needs torchvision, absent)."""
    extra = _dotted(values.get("run", {}).get("extraConfig", {}))
    owned = sorted(set(extra) & set(OWNED))
    if owned:  # the Deployments, Job and keys would not follow the config
        return f"run.extraConfig sets {owned}, which chart values own"
    config = config_of(values)
    try:
        cfg = load_config(overrides=_dotted(config))
        cfg.check_services()
    except (ConfigError, ValueError) as exc:
        return str(exc)
    limit = values.get("galaxies", {}).get("maxUpdateBytes", 64 << 20)
    if limit < REVEAL[cfg.model]:  # the galaxy refuses to start (PG_MAX_UPDATE_BYTES)
        return f"maxUpdateBytes {limit} < one update of {cfg.model}"
    name = cfg.dataset.name
    if name == "cifar10":
        try:
            load_dataset("cifar10", root="/nonexistent")
        except (RuntimeError, ImportError, OSError) as exc:
            return str(exc)
    if name != "mnist" and cfg.dataset.root is None:
        return f"{name} is not in the image"
    return None


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


#: the values the review found rendering but crashing every pod (item 8), and
#: their neighbours the app accepts
CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "fashion_mnist spelled as the old schema had it": {
        "run": {"dataset": "fashion_mnist"}
    },
    "fashion-mnist without its files": {"run": {"dataset": "fashion-mnist"}},
    "fashion-mnist with a mounted root": {
        "run": {"dataset": "fashion-mnist", "datasetRoot": "/datasets/fashion-mnist"}
    },
    "cifar10": {"run": {"dataset": "cifar10", "model": "resnet18"}},
    "cifar10 by extraConfig": {
        "run": {"extraConfig": {"dataset": {"name": "cifar10", "root": "/d"}}}
    },
    "cifar10 with mnist_cnn by extraConfig": {
        "run": {"extraConfig": {"dataset": {"name": "cifar10", "root": "/d"}}}
    },
    "byzantine fraction 0.5": {"clients": {"byzantine": {"fraction": 0.5}}},
    "byzantine fraction 0.49 with f 0.49": {
        "clients": {"byzantine": {"fraction": 0.49}},
        "defense": {"byzantineFraction": 0.49, "aggregator": "median"},
    },
    "aggregator typo": {"defense": {"aggregator": "multi_krum"}},
    "layers without 1": {"defense": {"layers": [2, 3]}},
    "layers out of range": {"defense": {"layers": [1, 6]}},
    "infeasible trimmed_mean": {
        "galaxies": {"count": 10},
        "defense": {"aggregator": "trimmed_mean"},
    },
    "feasible trimmed_mean": {"defense": {"aggregator": "trimmed_mean"}},
    # Bulyan needs 4f + 3: 10 clients a galaxy at f = 3 are too few, 30 are not.
    "infeasible bulyan": {"defense": {"aggregator": "bulyan"}},
    "feasible bulyan": {
        "galaxies": {"count": 1},
        "defense": {"aggregator": "bulyan"},
    },
    "fedavg anywhere": {"galaxies": {"count": 10}, "defense": {"aggregator": "fedavg"}},
    # FLTrust needs a root dataset at the global aggregator: simulate only.
    "fltrust": {"defense": {"aggregator": "fltrust"}},
    "no robust layer": {"galaxies": {"count": 10}, "defense": {"layers": [1, 2]}},
    # 15 clients in 3 galaxies of 5: 0.1 x 5 = 0.5 rounds to 0 in Python (half
    # to even), 1 half away from zero; f = 0.
    "half to even, 0.5": {
        "clients": {"count": 15, "byzantine": {"fraction": 0.1}},
        "defense": {"byzantineFraction": 0.1},
    },
    # 0.25 x 10 = 2.5 rounds to 2; f = floor(0.2 x 10) = 2.
    "half to even, 2.5": {
        "clients": {"count": 30, "byzantine": {"fraction": 0.25}},
        "defense": {"byzantineFraction": 0.2},
    },
    # 0.3 x 5 = 1.5 rounds to 2 either way; f = 1.
    "half to even, 1.5": {
        "clients": {"count": 15, "byzantine": {"fraction": 0.3}},
        "defense": {"byzantineFraction": 0.3, "aggregator": "median"},
    },
    # Decimal, not binary, products (the review's cases): 0.29 x 100 is 29.
    **{
        f"one galaxy of {n} at {f}": {
            "galaxies": {"count": 1},
            "clients": {"count": n, "byzantine": {"fraction": f}},
            "defense": {"byzantineFraction": f},
        }
        for n, f in ((100, 0.29), (75, 0.14), (90, 0.35), (100, 0.07), (30, 0.1))
    },
    "updates larger than the galaxies take": {"galaxies": {"maxUpdateBytes": 50000}},
    "updates exactly as large as the galaxies take": {
        "galaxies": {"maxUpdateBytes": 87608}
    },
    "unknown attack": {"clients": {"byzantine": {"attack": "labelflip"}}},
    "unknown model": {"run": {"model": "resnet50"}},
    "reputation weights off": {
        "run": {"extraConfig": {"defense": {"reputation": {"w_history": 0.3}}}}
    },
    "ban above quarantine": {
        "run": {"extraConfig": {"defense": {"reputation": {"ban_below": 0.5}}}}
    },
    "compromised galaxy out of range": {
        "run": {"extraConfig": {"galaxy_attack": {"galaxy": 3, "kind": "drop"}}}
    },
    "compromised galaxy in range": {
        "run": {"extraConfig": {"galaxy_attack": {"galaxy": 2, "kind": "drop"}}}
    },
    "extraConfig unknown key": {"run": {"extraConfig": {"training": {"epochs": 3}}}},
    "extraConfig out of range": {"run": {"extraConfig": {"training": {"lr": 0}}}},
    "extraConfig overrides the galaxy count": {
        "run": {"extraConfig": {"galaxies": {"count": 2}}}
    },
    "extraConfig overrides the client count": {
        "run": {"extraConfig": {"clients": {"count": 60}}}
    },
    "extraConfig overrides the rounds": {
        "run": {"extraConfig": {"training": {"rounds": 3}}}
    },
    "extraConfig sets what no value owns": {
        "run": {"extraConfig": {"clients": {"samples_per_client": 1000}}}
    },
    "more galaxies than clients": {"clients": {"count": 2, "perPod": 1}},
}


def _ci_cases() -> dict[str, dict[str, Any]]:
    return {
        f"charts/ci/{p.name}": yaml.safe_load(p.read_text()) or {} for p in CI_FILES
    }


@pytest.mark.parametrize(
    "values", [*CASES.values(), *_ci_cases().values()], ids=[*CASES, *_ci_cases()]
)
def test_the_chart_refuses_at_render_time_exactly_what_the_app_refuses(
    helm: Path, tmp_path: Path, values: dict[str, Any]
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    done = helm_template(helm, "-f", str(path))
    why = app_refuses(values)
    if why is None:
        assert done.returncode == 0, (
            f"the app takes it, the chart refuses: {done.stderr}"
        )
        # and what renders is what the app reads
        docs = [d for d in yaml.safe_load_all(done.stdout) if d]
        (cm,) = [
            d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]
        ]
        rendered = load_config(
            overrides=_dotted(yaml.safe_load(cm["data"]["config.yaml"]))
        )
        assert rendered == load_config(overrides=_dotted(config_of(values)))
    else:
        assert done.returncode != 0, f"the chart renders what the app refuses: {why}"


def test_the_schema_and_aggregator_table_come_from_the_app() -> None:
    script_check("chart-config.py")


# -- the run's identity --------------------------------------------------------


def clients_job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = [j for n, j in by_kind(docs, "Job").items() if "-clients-" in n]
    return job


def _run_and_job(docs: list[dict[str, Any]]) -> tuple[str, str]:
    return run_id_of(docs), clients_job(docs)["metadata"]["name"]


def test_each_install_is_a_new_run(helm: Path) -> None:
    # A reinstall under the same name (revision 1 again) must not resume the
    # last run's checkpoints or Redis keys: the family is drawn at install.
    first, second = run_id_of(render(helm)), run_id_of(render(helm))
    assert first != second
    assert first.split("-")[1] == second.split("-")[1]  # same config, same hash


def test_an_upgrade_continues_the_run_unless_the_config_changes(helm: Path) -> None:
    # helm template cannot look the family up; pinning run.id is what the
    # lookup of the <fullname>-run ConfigMap gives an upgrade on a cluster.
    pin = ("--set", "run.id=fam1")
    run0, job0 = _run_and_job(render(helm, *pin))
    # How it runs: same run, same Job (a rolling restart of what changed).
    run1, job1 = _run_and_job(render(helm, *pin, "--set", "galaxies.logLevel=info"))
    assert (run1, job1) == (run0, job0)
    # A new image: same run, and a new Job (the template is immutable).
    run2, job2 = _run_and_job(render(helm, *pin, "--set", "image.tag=0.2.0"))
    assert run2 == run0 and job2 != job0
    # What it computes: a new run, a new Job, a new data directory.
    docs = render(helm, *pin, "--set", "galaxies.count=5", "--set", "clients.count=50")
    run3, job3 = _run_and_job(docs)
    assert run3 != run0 and run3.startswith("fam1-") and job3 != job0
    sts = by_kind(docs, "StatefulSet")["pg-protogalaxy-global"]
    assert env_of(pod_spec(sts)["containers"][0])["PG_DATA_DIR"] == f"/data/{run3}"


def test_every_client_pod_runs_at_once(helm: Path) -> None:
    for values in (CHART / "ci" / "galaxies-10-values.yaml", CHART / "values.yaml"):
        spec = clients_job(render(helm, "-f", str(values)))["spec"]
        assert spec["parallelism"] == spec["completions"], spec
    docs = render(helm, "--set", "clients.count=1000", "--set", "galaxies.count=20")
    job = clients_job(docs)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 100


# -- what a namespace or a long name does to the pods --------------------------


def _pods(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        pod_spec(d) if d["kind"] != "Pod" else d["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")
    ]


def test_no_service_links_and_explicit_ports(helm: Path) -> None:
    docs = render(helm)
    for spec in _pods(docs):
        assert spec["enableServiceLinks"] is False, spec
    for kind in ("Deployment", "StatefulSet", "Job"):
        for obj in by_kind(docs, kind).values():
            for c in pod_spec(obj)["containers"]:
                if c["name"] in ("redis", "keygen"):  # no listener in keygen
                    continue
                env = env_of(c)
                assert env["PG_PORT"] == "8000" and env["PG_HOST"] == "0.0.0.0", c


def test_long_release_names_stay_within_63_characters(helm: Path) -> None:
    release = "a" * 53  # the longest release name helm accepts
    docs = render(
        helm, "--set", "galaxies.count=12", "--set", "clients.count=120",
        release=release,
    )  # fmt: skip
    for d in docs:
        name = d["metadata"]["name"]
        assert len(name) <= 63, name
        if d["kind"] == "StatefulSet":
            # the controller-revision-hash label: <name>-<10 characters>
            assert len(name) + 11 <= 63, name
            for claim in d["spec"].get("volumeClaimTemplates", []):
                assert len(f"{claim['metadata']['name']}-{name}-0") <= 63
        for value in d["metadata"].get("labels", {}).values():
            assert len(str(value)) <= 63, (name, value)


def test_dns_resolves_on_gke(helm: Path) -> None:
    """NodeLocal DNSCache (169.254.20.10) and Cloud DNS (169.254.169.254) are
    reachable on port 53 from every pod that has an egress policy."""
    docs = render(helm)
    for policy in by_kind(docs, "NetworkPolicy").values():
        if not policy["spec"].get("egress"):
            continue  # no egress at all (Redis talks to no one)
        dns = [
            rule
            for rule in policy["spec"]["egress"]
            if {"port": 53, "protocol": "UDP"} in rule.get("ports", [])
        ]
        assert dns, policy["metadata"]["name"]
        peers = dns[0]["to"]
        cidrs = {p["ipBlock"]["cidr"] for p in peers if "ipBlock" in p}
        assert {"169.254.20.10/32", "169.254.169.254/32"} <= cidrs
        assert any("podSelector" in p for p in peers)


def test_the_service_monitor_does_not_open_the_ports_to_every_namespace(
    helm: Path,
) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "monitoring-values.yaml"))
    for policy in by_kind(docs, "NetworkPolicy").values():
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                assert peer.get("namespaceSelector") != {} or "podSelector" in peer, (
                    policy["metadata"]["name"],
                    peer,
                )


def test_torch_threads_follow_the_cpu_request(helm: Path) -> None:
    docs = render(
        helm, "--set", "clients.resources.requests.cpu=1500m",
        "--set", "galaxies.resources.requests.cpu=2",
    )  # fmt: skip
    job = clients_job(docs)
    assert env_of(pod_spec(job)["containers"][0])["PG_TORCH_THREADS"] == "2"
    galaxy = by_kind(docs, "Deployment")["pg-protogalaxy-galaxy-0"]
    assert env_of(pod_spec(galaxy)["containers"][0])["PG_TORCH_THREADS"] == "2"


def test_only_gpu_client_pods_use_the_cuda_image(helm: Path) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "gpu-values.yaml"))
    images = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod"):
            spec = d["spec"] if d["kind"] == "Pod" else pod_spec(d)
            for c in spec["containers"]:
                images[d["metadata"]["name"]] = c["image"]
    clients = [n for n in images if "-clients-" in n]
    assert clients and all(images[n].endswith("-cuda") for n in clients), images
    others = [n for n in images if n not in clients and "redis" not in n]
    assert others and not any(images[n].endswith("-cuda") for n in others), images


@pytest.mark.parametrize(
    ("tag", "ok"),
    [("7.2.16-alpine", True), ("7.2.10", False), ("7.4.5", False), ("7.4.6", True),
     ("8.0.3-alpine", False), ("8.0.4", True), ("8.2.2", True), ("6.2.14", False)],
)  # fmt: skip
def test_redis_tags_without_the_lua_fixes_are_refused(
    helm: Path, tag: str, ok: bool
) -> None:
    done = helm_template(helm, "--set", f"redis.image.tag={tag}")
    assert (done.returncode == 0) == ok, done.stderr


def test_only_the_aggregators_carry_a_cloud_identity(helm: Path) -> None:
    key = "iam.gke.io/gcp-service-account"
    docs = render(helm, "--set-json", f'serviceAccount.annotations={{"{key}":"a@b"}}')
    accounts = by_kind(docs, "ServiceAccount")
    annotated = {
        n for n, a in accounts.items() if key in a["metadata"].get("annotations", {})
    }
    assert annotated == {"pg-protogalaxy"}
    for kind in ("Deployment", "StatefulSet", "Job"):
        for name, obj in by_kind(docs, kind).items():
            account = pod_spec(obj).get("serviceAccountName")
            aggregator = "-galaxy-" in name or name.endswith("-global")
            assert (account in annotated) == aggregator, (name, account)


def test_the_keygen_hook_reaches_only_the_api_server_it_is_given(helm: Path) -> None:
    peer = {"ipBlock": {"cidr": "10.0.0.1/32"}}
    docs = render(helm, "--set-json", f"networkPolicy.apiServer=[{json.dumps(peer)}]")
    policy = by_kind(docs, "NetworkPolicy")["pg-protogalaxy-keygen"]
    api = [
        r
        for r in policy["spec"]["egress"]
        if {"port": 443, "protocol": "TCP"} in r["ports"]
    ]
    assert [r["to"] for r in api] == [[peer]]
