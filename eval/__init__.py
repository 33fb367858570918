"""Evaluations as plain functions returning result dataclasses (installed as tqpatch.eval)."""
