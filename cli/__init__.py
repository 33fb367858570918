"""The `tqpatch` command line (installed as tqpatch.cli)."""
