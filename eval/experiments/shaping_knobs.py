"""Query shaping with other constants: SHRINK=0.25 (shrinkage of the second moments, default 0.5) and/or
HORIZON=8192 (positions of the RoPE average, default 2048), then the CLI's arguments:

    SHRINK=0.25 python eval/experiments/shaping_knobs.py eval ppl --settings k4v4-s4-ck-qs-n8 ...
"""

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
shaping = importlib.import_module("tqpatch.shaping")
if "SHRINK" in os.environ:  # the codec takes its shrinkage from SHAPE_PRIORS, not from the functions' defaults
    shaping.SHAPE_PRIORS["isotropic"] = (0.0, float(os.environ["SHRINK"]))
if "HORIZON" in os.environ:
    shaping.rope_average.__defaults__ = (int(os.environ["HORIZON"]),)
print(f"[shaping] isotropic prior (diagonal share, shrink) {shaping.SHAPE_PRIORS['isotropic']}, horizon {shaping.rope_average.__defaults__[0]}", flush=True)
sys.argv = ["tqpatch", *sys.argv[1:]]
from cli.main import main  # noqa: E402

main()
