"""The run's plots, read as figure objects (issue 15): every axis labelled, a
legend, whole-round ticks, titles that name the defense and the layers."""

from __future__ import annotations

from matplotlib.ticker import MaxNLocator

from protogalaxy.config import load_config
from protogalaxy.learning.datasets import Dataset
from protogalaxy.report import defense_name, figures
from protogalaxy.simulation import Simulation


def test_the_plots_say_what_they_show(mnist: Dataset) -> None:
    config = load_config(
        overrides={
            "clients.count": 10,
            "galaxies.count": 2,
            "clients.samples_per_client": 60,
            "byzantine.fraction": 0.2,
            "training.rounds": 3,
        }
    )
    result = Simulation(config, dataset=mnist).run()
    figs = figures(result)
    assert set(figs) == {"accuracy.png", "reputation.png", "flags.png"}
    for name, fig in figs.items():
        (ax,) = fig.axes
        assert ax.get_title(), name
        assert ax.get_xlabel() == "round" and ax.get_ylabel(), name
        assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator), name
        ticks = [t for t in ax.get_xticks() if 0 <= t <= 2]
        assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
        legend = ax.get_legend()
        assert legend is not None and legend.get_texts(), name
    assert "ProtoGalaxy-Full" in figs["accuracy.png"].axes[0].get_title()
    labels = [t.get_text() for t in figs["flags.png"].axes[0].get_legend().get_texts()]
    assert [label.split(":")[0] for label in labels] == [
        f"layer {i}" for i in range(1, 6)
    ]
    rep = [
        t.get_text() for t in figs["reputation.png"].axes[0].get_legend().get_texts()
    ]
    assert "honest (mean)" in rep and "Byzantine (mean)" in rep


def test_the_defense_is_named() -> None:
    assert defense_name([1, 2, 3, 4, 5]) == "ProtoGalaxy-Full"
    assert defense_name([3, 1]) == "ProtoGalaxy-Lite"
    assert defense_name([1, 2, 3]) == "layers 1, 2, 3"
