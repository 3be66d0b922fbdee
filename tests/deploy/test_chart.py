"""The Helm chart, with the real helm binary: lint, render, API schemas, topology.

Every rendered object is validated (strict) against the Kubernetes API schemas of
two minor versions. Topology tests read the rendered objects: names and counts per
galaxy count, env wiring between services, selectors, the PVC template, the Job,
GPU fields, NetworkPolicy peers and security contexts. validateValues and the
schema must refuse impossible settings.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import CHART

K8S_VERSIONS = ["1.33.0", "1.35.0"]
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
CRDS = {"ServiceMonitor"}  # not in the core API schemas


def render(helm: Path, *args: str, release: str = "pg") -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(helm), "template", release, str(CHART), "--namespace", "fl", *args],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def refused(helm: Path, *args: str) -> str:
    out = subprocess.run(
        [str(helm), "template", "pg", str(CHART), *args], capture_output=True, text=True
    )
    assert out.returncode != 0, "helm rendered settings that cannot work"
    return out.stderr


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def run_id_of(docs: list[dict[str, Any]]) -> str:
    """The run id the render recorded in its <fullname>-run ConfigMap."""
    (run,) = [
        d["data"]["id"]
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-run")
    ]
    return str(run)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return obj["spec"]
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("values", CI_FILES, ids=lambda p: p.stem)
def test_lint_is_clean(helm: Path, values: Path) -> None:
    out = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), "-f", str(values)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[ERROR]" not in out.stdout and "[WARNING]" not in out.stdout


@pytest.mark.parametrize("values", CI_FILES, ids=lambda p: p.stem)
def test_every_object_validates_against_the_api_schemas(
    helm: Path, values: Path
) -> None:
    docs = render(helm, "-f", str(values))
    for version in K8S_VERSIONS:
        for d in docs:
            if d["kind"] in CRDS:
                continue
            kubernetes_validate.validate(d, version, strict=True)


@pytest.mark.parametrize("galaxies", [1, 3, 5, 10])
def test_topology_per_galaxy_count(helm: Path, galaxies: int) -> None:
    clients, per_pod = 10 * galaxies, 4
    docs = render(
        helm,
        "--set",
        f"galaxies.count={galaxies}",
        "--set",
        f"clients.count={clients}",
        "--set",
        f"clients.perPod={per_pod}",
    )
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    names = {f"pg-protogalaxy-galaxy-{g}" for g in range(galaxies)}
    assert set(deployments) == names
    assert names <= set(services)
    assert set(services) - names == {"pg-protogalaxy-global", "pg-protogalaxy-redis"}
    # Each galaxy knows its id, the global aggregator and its own Redis user.
    for g in range(galaxies):
        dep = deployments[f"pg-protogalaxy-galaxy-{g}"]
        (c,) = pod_spec(dep)["containers"]
        env = env_of(c)
        assert c["args"] == ["galaxy"]
        assert env["PG_GALAXY_ID"] == str(g)
        # "<family>-<config hash>": one id for every party of the render
        assert re.fullmatch(r"[a-z0-9]{8}-[0-9a-f]{8}", env["PG_RUN_ID"])
        assert env["PG_RUN_ID"] == run_id_of(docs)
        assert env["PG_GLOBAL_URL"] == "http://pg-protogalaxy-global:8000"
        assert env["PG_REDIS_URL"] == f"redis://galaxy-{g}@pg-protogalaxy-redis:6379/0"
        assert env["PG_REDIS_PASSWORD_FILE"] == "/etc/protogalaxy-redis/password"
        # The Service selects exactly this galaxy's pods.
        sel = services[f"pg-protogalaxy-galaxy-{g}"]["spec"]["selector"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert sel.items() <= labels.items()
        assert dep["spec"]["selector"]["matchLabels"] == sel
        for other in range(galaxies):
            if other != g:
                other_labels = deployments[f"pg-protogalaxy-galaxy-{other}"]["spec"][
                    "template"
                ]["metadata"]["labels"]
                assert not sel.items() <= other_labels.items()
    # The global aggregator learns the galaxy list from the same value.
    (glob,) = by_kind(docs, "StatefulSet")["pg-protogalaxy-global"]["spec"]["template"][
        "spec"
    ]["containers"]
    assert env_of(glob)["PG_GALAXIES"] == str(galaxies)
    # The client Job: completions from clients / perPod, galaxy URLs from the id.
    (job,) = [
        d
        for d in docs
        if d["kind"] == "Job" and d["metadata"]["name"].startswith("pg-protogalaxy-cl")
    ]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == math.ceil(clients / per_pod)
    (client,) = pod_spec(job)["containers"]
    cenv = env_of(client)
    assert cenv["PG_CLIENTS_PER_POD"] == str(per_pod)
    for g in range(galaxies):
        url = cenv["PG_GALAXY_URL_TEMPLATE"].format(galaxy=g)
        assert url == f"http://pg-protogalaxy-galaxy-{g}:8000"
    assert cenv["PG_GLOBAL_PUBLIC_KEY_FILE"] == "/etc/protogalaxy-keys/global.pub"
    # The config every service reads has the same galaxy count.
    config = yaml.safe_load(
        by_kind(docs, "ConfigMap")["pg-protogalaxy-config"]["data"]["config.yaml"]
    )
    assert config["galaxies"]["count"] == galaxies
    assert config["clients"]["count"] == clients
    # One Redis ACL user per galaxy, limited to its own key prefix.
    acl = by_kind(docs, "Secret")["pg-protogalaxy-redis"]["data"]["users.acl"]
    lines = base64.b64decode(acl).decode().splitlines()
    users = [line for line in lines if line.startswith("user galaxy-")]
    assert len(users) == galaxies
    for g, line in enumerate(users):
        assert f" ~pg:galaxy:{g}:* " in line and "~*" not in line
    # A PDB only with more than one replica.
    assert by_kind(docs, "PodDisruptionBudget") == {}


def test_pdb_when_replicated_and_pvc_template(helm: Path) -> None:
    docs = render(
        helm,
        "--set",
        "galaxies.replicas=2",
        "--set",
        "globalAggregator.persistence.size=5Gi",
        "--set",
        "globalAggregator.persistence.storageClass=premium-rwo",
    )
    assert len(by_kind(docs, "PodDisruptionBudget")) == 3
    sts = by_kind(docs, "StatefulSet")["pg-protogalaxy-global"]
    assert sts["spec"]["serviceName"] == "pg-protogalaxy-global"
    (pvc,) = sts["spec"]["volumeClaimTemplates"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["spec"]["storageClassName"] == "premium-rwo"
    (c,) = pod_spec(sts)["containers"]
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    assert env_of(c)["PG_DATA_DIR"].startswith("/data/")
    headless = by_kind(docs, "Service")["pg-protogalaxy-global"]
    assert headless["spec"]["clusterIP"] == "None"


def test_gpu_clients(helm: Path) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "gpu-values.yaml"))
    (job,) = [
        d for d in docs if d["kind"] == "Job" and "clients" in d["metadata"]["name"]
    ]
    spec = pod_spec(job)
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        spec["tolerations"]
    )
    cpu_job = next(
        d
        for d in render(helm)
        if d["kind"] == "Job" and "clients" in d["metadata"]["name"]
    )
    assert "nvidia.com/gpu" not in str(cpu_job)


def test_external_redis(helm: Path) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "external-redis-values.yaml"))
    assert "pg-protogalaxy-redis" not in by_kind(docs, "StatefulSet")
    dep = by_kind(docs, "Deployment")["pg-protogalaxy-galaxy-0"]
    env = env_of(pod_spec(dep)["containers"][0])
    assert env["PG_REDIS_URL"] == "rediss://10.0.0.3:6378/0"
    assert env["PG_REDIS_PASSWORD_FILE"] == "/etc/protogalaxy-redis/password"
    np = by_kind(docs, "NetworkPolicy")["pg-protogalaxy-galaxy"]
    assert {"ports": [{"port": 6378}]} in np["spec"]["egress"]


def test_monitoring(helm: Path) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "monitoring-values.yaml"))
    monitors = by_kind(docs, "ServiceMonitor")
    assert set(monitors) == {"pg-protogalaxy-galaxy", "pg-protogalaxy-global"}
    for m in monitors.values():
        assert m["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert m["spec"]["endpoints"] == [
            {"port": "http", "path": "/metrics", "interval": "15s"}
        ]
    assert by_kind(render(helm), "ServiceMonitor") == {}


def _peers(rule: dict[str, Any], key: str) -> set[str]:
    return {
        p["podSelector"]["matchLabels"].get("app.kubernetes.io/component", "?")
        for p in rule.get(key, [])
        if "podSelector" in p and "namespaceSelector" not in p
    }


def test_network_policies(helm: Path) -> None:
    nps = by_kind(render(helm), "NetworkPolicy")
    galaxy, glob = nps["pg-protogalaxy-galaxy"], nps["pg-protogalaxy-global"]
    redis, clients = nps["pg-protogalaxy-redis"], nps["pg-protogalaxy-clients"]
    # Clients reach only galaxies and the global aggregator (and DNS); nothing
    # reaches the clients.
    assert clients["spec"]["ingress"] == []
    assert [_peers(r, "to") for r in clients["spec"]["egress"]] == [
        {"galaxy", "global"},
        set(),
    ]
    # Galaxies: reached by clients, the auditing global aggregator and the helm
    # test; reach global and Redis.
    assert [_peers(r, "from") for r in galaxy["spec"]["ingress"]] == [
        {"clients", "global", "test"}
    ]
    assert [_peers(r, "to") for r in galaxy["spec"]["egress"]][:2] == [
        {"global"},
        {"redis"},
    ]
    assert [_peers(r, "from") for r in glob["spec"]["ingress"]] == [
        {"galaxy", "clients", "test"}
    ]
    # The global aggregator reaches only the galaxies (replay audits) and DNS.
    assert [_peers(r, "to") for r in glob["spec"]["egress"]] == [{"galaxy"}, set()]
    # Nothing but galaxies reaches Redis, and Redis reaches nobody.
    assert [_peers(r, "from") for r in redis["spec"]["ingress"]] == [{"galaxy"}]
    assert redis["spec"]["egress"] == [] and "Egress" in redis["spec"]["policyTypes"]
    assert (
        by_kind(render(helm, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")
        == {}
    )


def test_security_contexts(helm: Path) -> None:
    docs = render(helm, "-f", str(CHART / "ci" / "galaxies-10-values.yaml"))
    pods = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")]
    assert len(pods) == 10 + 2 + 2 + 1
    for obj in pods:
        spec = pod_spec(obj)
        name = obj["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        is_keygen = name.endswith("-keygen")
        assert spec["automountServiceAccountToken"] is is_keygen, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], name
        if obj["kind"] in ("Deployment", "StatefulSet") and "redis" not in name:
            (c,) = spec["containers"]
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
            assert c["livenessProbe"]["httpGet"]["port"] == "http"
            assert (
                "checksum/config" in obj["spec"]["template"]["metadata"]["annotations"]
            )


def test_impossible_settings_are_refused(helm: Path) -> None:
    err = refused(helm, "--set", "galaxies.count=0")
    assert "galaxies.count" in err or "minimum" in err
    assert "every galaxy needs clients" in refused(helm, "--set", "clients.count=2")
    err = refused(helm, "--set-json", "clients.byzantine.fraction=0.4")
    assert "tolerates f = 3" in err and "galaxy 0 of 10" in err
    err = refused(helm, "--set", "galaxies.count=10")  # 3 clients per galaxy
    assert "multikrum tolerates f = 0" in err
    assert "additional" in refused(helm, "--set", "galaxies.typo=1").lower()
    assert "externalRedis.host" in refused(helm, "--set", "redis.enabled=false")
    # Trimmed mean cannot trim the one Byzantine client of 3 either (the app
    # refuses it); FedAvg tolerates no one and is not checked.
    err = refused(
        helm, "--set", "galaxies.count=10", "--set", "defense.aggregator=trimmed_mean"
    )
    assert "trimmed_mean tolerates f = 0" in err
    render(helm, "--set", "galaxies.count=10", "--set", "defense.aggregator=fedavg")


def test_tokens_are_generated_and_notes_name_the_logs_command(helm: Path) -> None:
    secret = by_kind(render(helm), "Secret")["pg-protogalaxy-auth"]
    assert set(secret["data"]) == {
        "service-token",
        "auditor-token",
        "auditor-token-sha256",
    }
    token = base64.b64decode(secret["data"]["auditor-token"])
    digest = base64.b64decode(secret["data"]["auditor-token-sha256"]).decode()
    assert digest == hashlib.sha256(token).hexdigest()
    out = subprocess.run(
        [str(helm), "install", "pg", str(CHART), "--dry-run=client", "-n", "fl"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (
        "kubectl -n fl logs -l app.kubernetes.io/instance=pg,"
        "app.kubernetes.io/component=galaxy" in out.stdout
    )
    assert 'grep \'"event": "client_quarantined"\'' in out.stdout
    tests = [d for d in yaml.safe_load_all(out.stdout.split("NOTES:")[0]) if d]
    hooks = [
        d
        for d in tests
        if d.get("metadata", {}).get("annotations", {}).get("helm.sh/hook") == "test"
    ]
    assert len(hooks) == 1 and hooks[0]["kind"] == "Pod"


def key_items(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """The (Secret key, file) pairs a pod mounts from the release's key Secret."""
    out = []
    for vol in pod_spec(obj).get("volumes", []):
        secret = vol.get("secret")
        if secret and secret["secretName"] == "pg-protogalaxy-keys":
            out += [(i["key"], i["path"]) for i in secret["items"]]
    return out


def auth_items(obj: dict[str, Any]) -> list[str]:
    """The bearer tokens a pod mounts from the release's auth Secret."""
    out = []
    for vol in pod_spec(obj).get("volumes", []):
        secret = vol.get("secret")
        if secret and secret["secretName"] == "pg-protogalaxy-auth":
            out += [i["key"] for i in secret["items"]]
    return sorted(out)


def secret_refs(container: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def test_every_party_holds_its_own_key_and_clients_hold_no_token(helm: Path) -> None:
    """Identities are provisioned by the keygen hook into one Secret, and each pod
    mounts only its part: a galaxy its own key and the clients' public keys, the
    global aggregator its key and the galaxies' public keys, the client Job the
    clients' seed. No client pod gets a bearer token."""
    docs = render(helm, "--set", "galaxies.count=3")
    for g in range(3):
        dep = by_kind(docs, "Deployment")[f"pg-protogalaxy-galaxy-{g}"]
        assert key_items(dep) == [
            (f"galaxy-{g}.key", "signing.key"),
            ("clients.pub", "clients.pub"),
            ("global.pub", "global.pub"),
        ]
        (c,) = pod_spec(dep)["containers"]
        env = env_of(c)
        assert env["PG_SIGNING_KEY_FILE"] == "/etc/protogalaxy-keys/signing.key"
        assert env["PG_CLIENT_KEYS_FILE"] == "/etc/protogalaxy-keys/clients.pub"
        # the auditors' token only as its hash: a galaxy checks it, never holds it
        assert auth_items(dep) == ["auditor-token-sha256", "service-token"]
        assert not secret_refs(c)  # no credential in the environment
    glob = by_kind(docs, "StatefulSet")["pg-protogalaxy-global"]
    # The global aggregator also pins the clients' keys: its replay audit checks
    # every published reveal against its client's signature.
    assert key_items(glob) == [
        ("global.key", "signing.key"),
        ("galaxies.pub", "galaxies.pub"),
        ("clients.pub", "clients.pub"),
        ("global.pub", "global.pub"),
    ]
    (gc,) = pod_spec(glob)["containers"]
    genv = env_of(gc)
    assert genv["PG_CLIENT_KEYS_FILE"] == "/etc/protogalaxy-keys/clients.pub"
    assert (
        genv["PG_GALAXY_URL_TEMPLATE"] == "http://pg-protogalaxy-galaxy-{galaxy}:8000"
    )
    assert genv["PG_AUDIT_DIR"] == f"/data/{run_id_of(docs)}/artefacts"
    assert auth_items(glob) == ["auditor-token", "service-token"]
    assert genv["PG_AUDITOR_TOKEN_FILE"] == "/etc/protogalaxy-auth/auditor-token"
    (job,) = [
        d
        for d in docs
        if d["kind"] == "Job" and d["metadata"]["name"].startswith("pg-protogalaxy-cl")
    ]
    assert key_items(job) == [
        ("clients.seed", "clients.seed"),
        ("galaxies.pub", "galaxies.pub"),
        ("global.pub", "global.pub"),
    ]
    (client,) = pod_spec(job)["containers"]
    env = env_of(client)
    assert not [k for k in env if "TOKEN" in k], env
    assert not secret_refs(client) and not auth_items(job)
    assert env["PG_GLOBAL_PUBLIC_KEY_FILE"] == "/etc/protogalaxy-keys/global.pub"
    assert env["PG_RUN_ID"] == run_id_of(docs)
    assert env["PG_CLIENT_SEED_FILE"] == "/etc/protogalaxy-keys/clients.seed"
    assert env["PG_GALAXY_KEYS_FILE"] == "/etc/protogalaxy-keys/galaxies.pub"
    assert env["PG_GLOBAL_URL"] == "http://pg-protogalaxy-global:8000"
    # The hook makes a key for every galaxy and client of the release, and may
    # touch no Secret but its own (besides creating it).
    (keygen,) = [
        d
        for d in docs
        if d["kind"] == "Job" and d["metadata"]["name"] == "pg-protogalaxy-keygen"
    ]
    kenv = env_of(pod_spec(keygen)["containers"][0])
    assert (kenv["PG_GALAXIES"], kenv["PG_CLIENTS"]) == ("3", "30")
    (role,) = by_kind(docs, "Role").values()
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["pg-protogalaxy-keys"],
            "verbs": ["get", "update"],
        }
    ]
    assert [r["verbs"] for r in role["rules"] if not r.get("resourceNames")] == [
        ["create"]
    ]


def test_values_are_all_documented() -> None:
    """Every leaf in values.yaml has a ``# --`` comment and a row in the README."""
    text = (CHART / "values.yaml").read_text()
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load(text)
    schema = json.loads((CHART / "values.schema.json").read_text())

    def leaves(node: Any, prefix: str, sch: dict[str, Any]) -> list[str]:
        props = sch.get("properties")
        if isinstance(node, dict) and node and props:
            out = []
            for k, v in node.items():
                assert k in props, f"{prefix}{k} is not in values.schema.json"
                out += leaves(v, f"{prefix}{k}.", props[k])
            return out
        return [prefix.rstrip(".")]

    for key in leaves(values, "", schema):
        assert f"`{key}`" in readme, f"{key} is missing from charts/README.md"


def script_check(name: str) -> None:
    """``scripts/<name> --check``: a generated file is current."""
    out = subprocess.run(
        [sys.executable, str(CHART.parent / "scripts" / name), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_chart_readme_is_current() -> None:
    script_check("chart-readme.py")


def test_grafana_dashboard(helm: Path) -> None:
    """Behind metrics.grafanaDashboard.enabled, the dashboard JSON ships as a
    ConfigMap with the label Grafana's sidecar selects (queries are checked
    against the services' exports in tests/services/test_up.py)."""
    import json

    maps = by_kind(render(helm, "-f", str(CHART / "ci" / "monitoring-values.yaml")),
                   "ConfigMap")  # fmt: skip
    board = maps["pg-protogalaxy-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["metadata"]["annotations"] == {"grafana_folder": "ProtoGalaxy"}
    shipped = json.loads(board["data"]["protogalaxy.json"])
    assert shipped == json.loads(
        (CHART / "dashboards" / "protogalaxy.json").read_text()
    )
    assert shipped["panels"] and all(p["targets"] for p in shipped["panels"])
    assert "pg-protogalaxy-dashboard" not in by_kind(render(helm), "ConfigMap")
