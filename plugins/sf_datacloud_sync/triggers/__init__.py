"""triggers of the sync package."""
