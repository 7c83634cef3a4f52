"""Plain data shared by every layer: standard library only."""
