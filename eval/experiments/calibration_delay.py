"""DELAY=128 python calibration_delay.py eval ppl ...: the codecs calibrate on the first DELAY tokens, not the first chunk.

Until a layer holds DELAY tokens it keeps them exact (a temporary full-precision window), then compresses them
all at once, so centering, query shaping and the eigen split are fitted on DELAY tokens (and the queries of
all chunks until then). This bends the protocol for the first DELAY/C chunks (their older tokens are read
exactly; the compressed-read count shows by how much), so it bounds what refitting on more tokens could give.
"""
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
store = importlib.import_module("tqpatch.store")
delay = int(os.environ["DELAY"])
original = store.TurboQuantLayer._store


def _store(self, keys, values):
    waiting = len(self.compressed_keys) == 0 and self.num_window + keys.shape[-2] < delay + self.sink_tokens
    self.residual_length = 10**9 if waiting else 0
    original(self, keys, values)


store.TurboQuantLayer._store = _store
sys.argv = ["tqpatch"] + sys.argv[1:]
from cli.main import main

main()
