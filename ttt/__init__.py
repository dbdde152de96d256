"""ttt package."""
