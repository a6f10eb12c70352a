"""utils of the sync package."""
