"""SHAPE_FROM=10 python shape_layers.py eval ppl ...: query shaping only on layers >= SHAPE_FROM."""
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
P = importlib.import_module("tqpatch.patch")
start = int(os.environ["SHAPE_FROM"])
def new_layer(self, head_dim, sliding_window):
    cfg = self.config if self.layer_idx >= start else self.config.with_(shape_keys=False)
    return P.make_layer(cfg, head_dim, *self.bits, sliding_window)
P.TurboQuantHook.new_layer = new_layer
sys.argv = ["tqpatch"] + sys.argv[1:]
from cli.main import main

main()
