"""hybrid package."""
