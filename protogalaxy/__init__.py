"""ProtoGalaxy: hierarchical, Byzantine-robust and verifiable federated learning."""

__version__ = "0.1.0"
