"""Quickstart: ProtoGalaxy on MNIST from Python, in ten lines.

30 clients in 3 galaxies, 9 of them flipping labels, all five defense layers:
the same engine `protogalaxy simulate` runs. Run: python examples/quickstart.py
"""

from protogalaxy.config import load_config
from protogalaxy.simulation import Simulation

config = load_config(
    overrides={"training.rounds": 3, "clients.samples_per_client": 500}
)
result = Simulation(config).run(
    progress=lambda m: print(f"round {m.round}: accuracy {m.accuracy:.3f}")
)
print(result.summary())
