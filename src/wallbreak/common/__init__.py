"""What both halves of wallbreak share: atomic files, JSON reading, plots."""
