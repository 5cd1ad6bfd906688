"""Plots of the demos and benchmarks: matplotlib is an optional extra, so every plot starts here."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any | None:
    """matplotlib.pyplot on the headless Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot (pip install 'apprentice[demo]')")
        return None
    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (100 dpi PNG) and close a figure; the written path."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt  # only reached with a figure, so matplotlib is installed

    plt.close(fig)
    return path
