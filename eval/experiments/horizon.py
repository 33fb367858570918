"""HORIZON=8192 python horizon.py eval ppl ...: query shaping with the RoPE average over another number of positions
(tqpatch.shaping.HORIZON, default 2048)."""
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
shaping = importlib.import_module("tqpatch.shaping")
value = int(os.environ["HORIZON"])
shaping.rope_average.__defaults__ = (value,)
print(f"[horizon] {value}", flush=True)
sys.argv = ["tqpatch"] + sys.argv[1:]
from cli.main import main

main()
