"""``python -m services keygen``: provision the global aggregator's Ed25519 key in a
Kubernetes Secret, once.

The Helm chart runs this as a pre-install/pre-upgrade hook Job. The Secret holds
``signing.key`` (the raw 32-byte private key, mounted only into the global
aggregator) and ``public-key`` (hex, given to the client runners, which pin it and
verify every receipt against it). An existing Secret is never changed, so the key
survives upgrades and a reinstall that keeps the Secret.

Environment: ``PG_KEY_SECRET`` (the Secret's name), ``POD_NAMESPACE``.
"""

from __future__ import annotations

import base64
import sys

from protogalaxy.crypto import SigningKey
from services.common import env


def main() -> int:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    config.load_incluster_config()  # type: ignore[no-untyped-call]
    name, namespace = env("PG_KEY_SECRET"), env("POD_NAMESPACE")
    api = client.CoreV1Api()
    try:
        existing = api.read_namespaced_secret(name, namespace)
        public = base64.b64decode((existing.data or {})["public-key"]).decode()
        print(f"keygen: secret {name} exists; global public key {public}")
        return 0
    except ApiException as exc:
        if exc.status != 404:
            raise
    key = SigningKey.generate()
    public = key.public_key.to_bytes().hex()
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(
            name=name,
            labels={"app.kubernetes.io/managed-by": "protogalaxy-keygen"},
        ),
        type="Opaque",
        data={
            "signing.key": base64.b64encode(key.to_bytes()).decode(),
            "public-key": base64.b64encode(public.encode()).decode(),
        },
    )
    try:
        api.create_namespaced_secret(namespace, body)
    except ApiException as exc:
        if exc.status != 409:  # another keygen won the race: keep its key
            raise
    print(f"keygen: created secret {name}; global public key {public}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
