"""``python -m services keygen``: provision every party's Ed25519 identity in a
Kubernetes Secret.

The Helm chart runs this as a pre-install/pre-upgrade hook Job. The Secret
(``PG_KEY_SECRET``) holds the files of :func:`protogalaxy.crypto.keyring.provision`:
``global.key`` (mounted only into the global aggregator), ``galaxy-<g>.key`` (each
mounted only into galaxy ``g``), ``clients.seed`` (only into the client Job: the
simulated clients derive their keys from it), and the public ``global.pub``,
``galaxies.pub`` and ``clients.pub``. Keys already in the Secret are never changed,
so identities survive upgrades; an upgrade to more galaxies or clients adds theirs
(``PG_GALAXIES``, ``PG_CLIENTS``) and rewrites the public keyrings.

Environment: ``PG_KEY_SECRET`` (the Secret's name), ``POD_NAMESPACE``,
``PG_GALAXIES``, ``PG_CLIENTS``.
"""

from __future__ import annotations

import base64
import sys

from protogalaxy.crypto.keyring import provision
from services.common import env


def main() -> int:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    config.load_incluster_config()  # type: ignore[no-untyped-call]
    name, namespace = env("PG_KEY_SECRET"), env("POD_NAMESPACE")
    galaxies, clients = int(env("PG_GALAXIES")), int(env("PG_CLIENTS"))
    api = client.CoreV1Api()
    for _ in range(5):  # another keygen may write between our read and our write
        existing = None
        try:
            existing = api.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        have = {
            k: base64.b64decode(v)
            for k, v in ((existing.data or {}) if existing else {}).items()
        }
        files = provision(galaxies=galaxies, clients=clients, existing=have)
        public = files["global.pub"].decode()
        if files == have:
            print(f"keygen: secret {name} is complete; global public key {public}")
            return 0
        data: dict[str, bytes | str] = {
            k: base64.b64encode(v).decode() for k, v in files.items()
        }
        try:
            if existing is None:
                api.create_namespaced_secret(
                    namespace,
                    client.V1Secret(
                        metadata=client.V1ObjectMeta(
                            name=name,
                            labels={
                                "app.kubernetes.io/managed-by": "protogalaxy-keygen"
                            },
                        ),
                        type="Opaque",
                        data=data,
                    ),
                )
            else:
                # resourceVersion makes the replace fail (409) if the Secret
                # changed since we read it: then read again and merge again.
                existing.data = data
                api.replace_namespaced_secret(name, namespace, existing)
        except ApiException as exc:
            if exc.status != 409:
                raise
            continue
        added = sorted(set(files) - set(have))
        print(
            f"keygen: secret {name} provisioned ({', '.join(added) or 'updated'}); "
            f"global public key {public}"
        )
        return 0
    print(f"keygen: secret {name} kept changing under us", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
