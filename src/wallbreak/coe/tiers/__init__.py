"""Three memory tiers an expert's weights move through: disk -> host arena -> device slot."""

from wallbreak.coe.tiers.config import TierConfig, TierStats
from wallbreak.coe.tiers.manager import Lease, TierManager

__all__ = ["Lease", "TierConfig", "TierManager", "TierStats"]
