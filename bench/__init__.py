"""ProtoGalaxy benchmarks. Run with ``./dev bench`` (all) or ``./dev bench crypto``.

Every figure is a ratio against a floor measured in the same process on the same
inputs, so results carry across machines; none is a CI gate.
"""
