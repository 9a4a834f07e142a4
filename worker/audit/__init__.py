"""Audit: rebuild run history from the decision log, and re-decide every logged input."""
