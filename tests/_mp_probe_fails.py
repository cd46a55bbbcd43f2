"""A module whose import fails (a preload error)."""
1 / 0
