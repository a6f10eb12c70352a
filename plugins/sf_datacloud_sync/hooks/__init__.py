"""hooks of the sync package."""
