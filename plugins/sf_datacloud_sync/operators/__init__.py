"""operators of the sync package."""
