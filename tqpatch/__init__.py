"""tqpatch: TurboQuant KV-cache compression for Hugging Face decoder models."""

from .codebook import Codebook, get_codebook
from .quantizer import QuantizedVectors, TurboQuantMSE, TurboQuantProd
from .rotation import haar_rotation, qjl_matrix

__version__ = "0.1.0"

__all__ = [
    "Codebook",
    "QuantizedVectors",
    "TurboQuantMSE",
    "TurboQuantProd",
    "get_codebook",
    "haar_rotation",
    "qjl_matrix",
]
