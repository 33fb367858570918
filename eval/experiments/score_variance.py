"""Softmax of noisy scores: add the posterior variance's half, α·σ²/2, to each compressed key's score.

Lloyd-Max codes decode to conditional means, so the true score is s = ŝ + n with n of zero mean given the
codes and variance σ² = Σ_g r_g² (D_g / d_g) ‖q̃_g‖² (group g: d_g rotated coordinates at unit-vector MSE D_g,
r_g its stored norm, q̃ the query in the stored basis). Then E[exp s | codes] = exp(ŝ + σ²/2): tokens whose
scores are less certain deserve more weight than exp(ŝ) gives them. Usage (ALPHA default 1):
ALPHA=1 python score_variance.py eval ppl ...
"""
import importlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from tqpatch.codebook import coordinate_density
from tqpatch.codec import RopeKeyCodec, SplitCodec, TurboQuantCodec
from tqpatch.packing import unpack_codes

S = importlib.import_module("tqpatch.store")
ALPHA = float(os.environ.get("ALPHA", "1"))
MODE = os.environ.get("MODE", "mean")  # mean: D_g/d_g per coordinate; cell: per-code conditional variance
_pending = [None]
_cell_tables = {}


def cell_variances(quantizer) -> torch.Tensor:
    """Var(t | t in cell k) [2^b] of one rotated coordinate t ~ f_d, the cells of the quantizer's codebook."""
    key = (quantizer.head_dim, quantizer.bits)
    if key not in _cell_tables:
        import numpy as np

        book = quantizer.codebook
        edges = np.concatenate([[-1.0], book.boundaries.numpy(), [1.0]])
        out = []
        for k in range(len(edges) - 1):
            t = np.linspace(edges[k], edges[k + 1], 4001)
            f = coordinate_density(t, quantizer.head_dim)
            mass = np.trapezoid(f, t)
            mean = np.trapezoid(f * t, t) / mass
            out.append(np.trapezoid(f * (t - mean) ** 2, t) / mass)
        _cell_tables[key] = torch.tensor(out, dtype=torch.float32)
    return _cell_tables[key]


def _groups(codec, parts):
    """[(channel index [H, d_g] or None, r_g² D_g / d_g [B, H, L])] of the stored vectors; q transform."""
    inner, transform = codec, None
    if isinstance(codec, RopeKeyCodec):
        inner = codec.inner
        if codec.shaping is not None:
            transform = codec.shaping[1]  # M⁻¹ [H, d, d]: q̃ = q @ M⁻ᵀ
    out = []
    if isinstance(inner, SplitCodec):
        for group, quantizer, index in (("hi", inner.outlier, inner.outlier_index), ("lo", inner.regular, inner.regular_index)):
            if quantizer is None:
                continue
            r = inner._norms(parts, group).float()
            out.append((index.long(), _weights(quantizer, parts[f"{group}_codes"], r)))
    elif isinstance(inner, TurboQuantCodec):
        norms = parts["norms"]
        r = (inner.norm_codes.decode(norms) if inner.norm_codes is not None else norms).float()
        out.append((None, _weights(inner.quantizer, parts["codes"], r)))
    else:
        raise TypeError(type(inner))
    return out, transform


def _weights(quantizer, codes, r):
    """MODE mean: r² D/d [B, H, L]; MODE cell: (r² Var(t | cell of code j) [B, H, L, d_g], quantizer)."""
    if MODE == "mean":
        return r * r * quantizer.codebook.unit_vector_mse / quantizer.head_dim
    variances = cell_variances(quantizer)[unpack_codes(codes, quantizer.bits, quantizer.head_dim)]
    return (r[..., None] * r[..., None] * variances, quantizer)


_orig_update = S.TurboQuantLayer.update


def update(self, key_states, value_states, *args, **kwargs):
    before_sink, before_comp = self.num_sink, self.num_compressed
    parts = self.compressed_keys.parts if before_comp else None
    groups = _groups(self.key_codec, parts) if parts else None
    keys, values = _orig_update(self, key_states, value_states, *args, **kwargs)
    if groups is not None:
        _pending[0] = (keys, before_sink, before_comp, groups)
    return keys, values


S.TurboQuantLayer.update = update


def _bias(query, keys, sink, count, groups):
    """[B, Hq, Tq, Lk]: α/2 · scaling² is applied by the caller; here Σ_g ‖q̃_g‖² w_g for the compressed columns."""
    spec, transform = groups
    b, hq, tq, d = query.shape
    hkv = keys.shape[1]
    q = query.float().view(b, hkv, hq // hkv, tq, d)
    if transform is not None:
        q = torch.einsum("bhgtd,hed->bhgte", q, transform)
    bias = query.new_zeros(b, hkv, hq // hkv, tq, keys.shape[2], dtype=torch.float32)
    for index, w in spec:  # w [B, Hkv, L] (mean) or ([B, Hkv, L, d_g], quantizer) (cell)
        qg = q if index is None else torch.gather(q, -1, index[None, :, None, None, :].expand(b, hkv, hq // hkv, tq, -1))
        if isinstance(w, tuple):
            w, quantizer = w
            rotated = quantizer.rotate(qg)  # Π q̃_g: the error is per rotated coordinate
            bias[..., sink : sink + count] += torch.einsum("bhgtj,bhlj->bhgtl", rotated * rotated, w)
        else:
            qn = (qg * qg).sum(-1)  # [B, Hkv, G, Tq]
            bias[..., sink : sink + count] += qn[..., None] * w[:, :, None, None, :]
    return bias.view(b, hq, tq, -1)


def _wrap(name):
    base = ALL_ATTENTION_FUNCTIONS[name]

    def attention(module, query, key, value, attention_mask, **kwargs):
        pending = _pending[0]
        if pending is not None and pending[0] is key and ALPHA != 0:
            _pending[0] = None
            _, sink, count, groups = pending
            scaling = kwargs.get("scaling") or module.scaling
            bias = (ALPHA * 0.5 * scaling * scaling) * _bias(query, key, sink, count, groups)
            if attention_mask is None:
                mask = bias
            elif attention_mask.dtype == torch.bool:
                mask = torch.where(attention_mask, bias, torch.finfo(torch.float32).min)
            else:
                mask = attention_mask.float() + bias
            return base(module, query, key, value, mask.to(query.dtype), **kwargs)
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


for _name in ("sdpa",):
    AttentionInterface.register(_name, _wrap(_name))

print(f"[score_variance] ALPHA={ALPHA} MODE={MODE}", flush=True)
sys.argv = ["tqpatch"] + sys.argv[1:]
from cli.main import main

main()
