"""tqpatch: TurboQuant KV-cache compression for Hugging Face decoder models.

    import tqpatch
    tqpatch.patch(model, tqpatch.TurboQuantConfig(key_bits=4, value_bits=4))
    model.generate(**inputs)          # K/V stored compressed, per layer
    tqpatch.cache_stats(model)        # what the last cache held
    tqpatch.unpatch(model)
"""

from .codebook import Codebook, get_codebook
from .config import PRESETS, TurboQuantConfig
from .patch import TQPatchError, is_patched, patch, patched_config, unpatch
from .quantizer import QuantizedVectors, TurboQuantMSE, TurboQuantProd
from .rotation import haar_rotation, qjl_matrix
from .stats import CacheStats, LayerStats, cache_stats
from .store import TurboQuantLayer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CacheStats",
    "Codebook",
    "LayerStats",
    "QuantizedVectors",
    "TQPatchError",
    "TurboQuantConfig",
    "TurboQuantLayer",
    "TurboQuantMSE",
    "TurboQuantProd",
    "cache_stats",
    "get_codebook",
    "haar_rotation",
    "is_patched",
    "patch",
    "patched_config",
    "qjl_matrix",
    "unpatch",
]
