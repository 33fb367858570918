"""Refit on sliding-window layers too: `refit_tokens` (spec -fit<N>) normally refits full-attention layers only; this
wraps `TurboQuantLayer.__init__` so that sliding layers refit as well, on min(N, sliding_window - 1) tokens (fewer
than the window holds, so no copy is trimmed before the refit), then runs the CLI with the given arguments:

    python eval/experiments/refit_sliding.py eval ppl --model gemma3-270m --settings k4v4-s4-ck-qsd-n8-fit256 ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
from tqpatch import store  # noqa: E402

original_init = store.TurboQuantLayer.__init__


def init_refitting_sliding_layers(self, *args, refit_tokens: int = 0, make_key_codec=None, **kwargs):
    original_init(self, *args, refit_tokens=refit_tokens, make_key_codec=make_key_codec, **kwargs)
    if self.is_sliding and refit_tokens and make_key_codec is not None:
        self.refit_tokens = min(refit_tokens, self.sliding_window - 1)
        self.refit_pending = True


store.TurboQuantLayer.__init__ = init_refitting_sliding_layers
print("[refit_sliding] sliding-window layers refit too", flush=True)
sys.argv = ["tqpatch", *sys.argv[1:]]
from cli.main import main  # noqa: E402

main()
