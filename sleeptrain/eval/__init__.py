"""Evaluation: accuracy by depth on the synthetic tasks."""
