"""Structured channel pruning: dependency analysis (what is coupled), importance (what to prune), surgery (how)."""

from passes.pruning.prune import PrunePass  # noqa: F401
