"""Three memory tiers an expert's weights move through: disk -> host arena -> device slot."""

from wallbreak.coe.tiers.manager import Lease, TierConfig, TierManager, TierStats

__all__ = ["Lease", "TierConfig", "TierManager", "TierStats"]
