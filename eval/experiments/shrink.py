"""SHRINK=0.25 python shrink.py eval ppl ...: query shaping with another shrinkage of the second moments."""
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
shaping = importlib.import_module("tqpatch.shaping")
value = float(os.environ["SHRINK"])
shaping.shaping_transform.__defaults__ = (value,)
print(f"[shrink] {value}", flush=True)
sys.argv = ["tqpatch"] + sys.argv[1:]
from cli.main import main

main()
