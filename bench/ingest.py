"""Ingest benchmark (issue 4): one update of ~11M float32 values (ResNet-18's
11,173,962 parameters, 44.7 MB) revealed to a galaxy over HTTP: reveal signature,
commitment digest, strict decode, shape/dtype/finite checks, Redis write (streamed
into a stage while the body arrives, AOF on, as `protogalaxy up` runs Redis).

The floor is a server on the same stack (uvicorn, FastAPI, the same bounded body
reader) that receives the same body and discards it. Reported as the galaxy's
throughput relative to the floor's (goal: >= 0.50): each reveal is timed right
after a discard of the same body, and the figure is the median of those paired
ratios (the floor alone swings by 2x on a shared 2-core machine).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import report
from protogalaxy.codec import encode_update
from protogalaxy.config import load_config
from protogalaxy.crypto import commit
from protogalaxy.crypto.identity import sign_commitment, sign_registration, sign_reveal
from protogalaxy.crypto.keyring import client_key
from protogalaxy.learning.models import build_model
from protogalaxy.services.up import LocalCluster, _port_block
from protogalaxy.spec import UpdateSpec

CLIENTS = 9

_DISCARD = """
import sys, uvicorn
from fastapi import FastAPI, Request
from protogalaxy.services.common import read_body
app = FastAPI()
@app.put("/discard")
async def discard(request: Request) -> dict:
    body = await read_body(request, 64 << 20)
    return {"bytes": len(body)}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def run(quick: bool = False) -> list[dict[str, Any]]:
    print("ingest benchmark (ResNet-18-sized update through a galaxy)")
    spec = UpdateSpec.from_params(dict(build_model("resnet18").named_parameters()))
    config = load_config(
        overrides={
            "model": "resnet18",
            "dataset.name": "cifar10",
            "clients.count": CLIENTS,
            "galaxies.count": 1,
            "byzantine.fraction": 0.0,
            "defense.byzantine_fraction": 0.0,
            "defense.layers": [1],
            "defense.aggregator": "fedavg",
            "training.rounds": 1,
        }
    )
    g = torch.Generator().manual_seed(0)
    updates = [
        spec.unflatten(0.01 * torch.randn(spec.numel, generator=g))
        for _ in range(CLIENTS)
    ]
    bodies = [encode_update(u) for u in updates]
    port = _port_block(1)
    discard = subprocess.Popen([sys.executable, "-c", _DISCARD, str(port)])
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(config, Path(tmp), max_update_bytes=64 << 20)
        try:
            cluster.start(clients=False)
            base = cluster.galaxy_url(0)
            run = cluster.run_id
            seed = (cluster.keys / "clients.seed").read_bytes()
            keys = {c: client_key(seed, c) for c in range(CLIENTS)}
            for c, k in keys.items():
                httpx.post(
                    base + "/v1/register",
                    json={
                        "client_id": c,
                        "public_key": k.public_key.to_bytes().hex(),
                        "signature": sign_registration(
                            k, client_id=c, galaxy_id=0, run=run
                        ).hex(),
                    },
                )
            made = {}
            for c in range(CLIENTS):
                com, nonce = commit(updates[c], client_id=c, galaxy_id=0, round=0)
                httpx.post(
                    base + "/v1/commitments",
                    json={
                        "commitment": com.to_dict(),
                        "signature": sign_commitment(keys[c], com, run=run).hex(),
                    },
                )
                made[c] = (com, nonce)
            while httpx.get(base + "/v1/round").json()["phase"] != "reveal":
                time.sleep(0.05)
            cluster.wait_ready(f"http://127.0.0.1:{port}", "/docs")
            client = httpx.Client(timeout=120)
            floor, galaxy = [], []
            for c in range(CLIENTS):
                body = bodies[c]
                t0 = time.perf_counter()
                r = client.put(f"http://127.0.0.1:{port}/discard", content=body)
                floor.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                com, nonce = made[c]
                sig = sign_reveal(keys[c], com, body, nonce, run=run)
                t0 = time.perf_counter()
                r = client.put(
                    base + f"/v1/rounds/0/reveals/{c}",
                    content=body,
                    headers={
                        "x-pg-nonce": nonce.hex(),
                        "x-pg-signature": sig.hex(),
                        "content-type": "application/octet-stream",
                    },
                )
                galaxy.append(time.perf_counter() - t0)
                assert r.status_code == 202, r.text
        finally:
            cluster.stop()
            discard.terminate()
            discard.wait()
    mb = len(bodies[0]) / 1e6
    ratio = statistics.median(f / g for f, g in zip(floor, galaxy, strict=True))
    return [
        report(
            "ingest 11.2M float32 via galaxy (vs discard)",
            ratio,
            ">= 0.50",
            ratio >= 0.50,
            f"{mb:.1f} MB: discard {mb / statistics.median(floor):.0f} MB/s, galaxy "
            f"{mb / statistics.median(galaxy):.0f} MB/s (medians of {CLIENTS} pairs)",
        )
    ]
