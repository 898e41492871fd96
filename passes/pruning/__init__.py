"""Structured channel pruning: dependency analysis (what is coupled), importance (what to prune), surgery (how)."""
