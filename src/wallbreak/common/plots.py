"""Writing a matplotlib figure where the user asked, with a one-line error if that fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wallbreak.errors import ConfigError


def save_figure(fig: Any, out: Path, what: str, dpi: int = 110) -> None:
    import matplotlib.pyplot as plt  # deferred: loads matplotlib

    try:
        fig.savefig(out, dpi=dpi)
    except OSError as e:
        raise ConfigError(f"cannot write {what} to {out}: {e}") from None
    finally:
        plt.close(fig)
