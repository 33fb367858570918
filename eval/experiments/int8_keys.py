"""What the LUT decode kernel's int8 keys (`kernels.DECODE_TUNING["warp_lut_int8_keys"] = 1`) would cost in
perplexity, emulated on CPU, then the CLI run with the given arguments:

    python eval/experiments/int8_keys.py eval ppl --settings k4v4,k4v4-seed1,k4v4-seed2 --max-tokens 8192 --window 2048 --chunk 32

The kernel scores a compressed key as n · w (q8 · u − 64 Σ q8) (`tqpatch.kernels.groups`, int8 keys section), which is
exactly ⟨q', k̃'⟩ with
    k̃' = n Πᵀ c̃,  c̃ = (u − 64) / s   the key decoded with the 7-bit table (`int8_centroid_scale`, `lut_table_i8`)
    q'  = Πᵀ q8 m / 127,  q8 = round(127 Π q / m), m = max|Π q|   the query rounded per query row in the rotated space.
Here every 4-bit key codec of one group (what the LUT kernel reads) decodes with c̃, and the attention of each patched
layer scores its compressed tokens with q' (sinks, window and the current chunk with q). Set TQ_INT8_QUERY=0 for
the table's rounding alone, TQ_INT8_VALUES=1 to decode 4-bit single-group value codecs with their 7-bit table too
(`warp_lut_int8_values`: the kernel's value product then reads (u − 64) / s exactly, its 1088 Σ p offset removed by
an exact fp32 sum of the same fp16 probabilities, so the table is the only change). Wrapped key codecs (shaped
`-qs`, centered `-ck` keys) are left exact: the kernel would round the shaped query A⁻¹q, which this script does not
model. The PPL protocol runs chunks of queries where the kernel serves one-token decode steps;
the arithmetic per query row is the same.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root
import torch  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from tqpatch import store  # noqa: E402
from tqpatch.codec import TurboQuantCodec  # noqa: E402
from tqpatch.kernels.groups import I8_OFFSET, int8_centroid_scale, int8_table_values  # noqa: E402
from tqpatch.quantizer import TurboQuantMSE  # noqa: E402

ROUND_QUERY = os.environ.get("TQ_INT8_QUERY", "1") == "1"
INT8_VALUES = os.environ.get("TQ_INT8_VALUES", "0") == "1"
_current = [None]  # (layer, first compressed index, compressed count) of the attention call about to run


def _emulate_table(codec) -> bool:
    """Give a 4-bit single-group key codec the 7-bit table's centroids (once); whether the codec is one."""
    q = getattr(codec, "quantizer", None)
    if not isinstance(codec, TurboQuantCodec) or not isinstance(q, TurboQuantMSE) or q.bits != 4:
        return False
    if not getattr(q, "_int8_table", False):
        rot, cent, bnd = q._constants(torch.device("cpu"))
        scale = int8_centroid_scale(cent)
        u = int8_table_values(cent, scale)
        q._device_cache[torch.device("cpu")] = (rot, ((u.double() - I8_OFFSET) / scale).float(), bnd)
        q._tables.clear()
        q._int8_table = True
    return True


original_update = store.TurboQuantLayer.update


def update(self, key_states, value_states, *args, **kwargs):
    before = (self.num_sink, self.num_compressed)
    out = original_update(self, key_states, value_states, *args, **kwargs)
    first, count = before if self.prefill_exact else (self.num_sink, self.num_compressed)
    if INT8_VALUES:
        _emulate_table(self.value_codec)
    _current[0] = (self, first, count) if count and _emulate_table(self.key_codec) else None
    return out


store.TurboQuantLayer.update = update
original_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]


def sdpa_with_int8_queries(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """sdpa, except that the compressed keys' scores use q' (module docstring). query [B, Hq, T, d], key [B, Hkv, L, d]."""
    current, _current[0] = _current[0], None
    if current is None or not ROUND_QUERY:
        return original_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    layer, first, count = current
    rot = layer.key_codec.quantizer.rotation("cpu")  # Π [d, d]: rotated = Π x
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, 1)
    v = value.float().repeat_interleave(groups, 1)
    qf = query.float()
    qr = qf @ rot.T  # Π q per row
    m = qr.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    q_int8 = (torch.floor(qr * (127 / m) + 0.5) * (m / 127)) @ rot  # q' = Πᵀ q8 m / 127
    scores = qf @ k.transpose(-1, -2)
    scores[..., first:first + count] = q_int8 @ k[:, :, first:first + count].transpose(-1, -2)
    scores = scores * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    t, length = query.shape[2], key.shape[2]
    if attention_mask is None:
        pos = torch.arange(length - t, length)[:, None]
        scores = scores.masked_fill(torch.arange(length)[None, :] > pos, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :length], float("-inf"))
    else:
        scores = scores + attention_mask[..., :length].float()
    out = torch.softmax(scores, -1) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_with_int8_queries
print(f"[int8_keys] 4-bit key codecs decode with the 7-bit table; queries rounded to int8: {ROUND_QUERY}; values too: {INT8_VALUES}", flush=True)
sys.argv = ["tqpatch", *sys.argv[1:]]
from cli.main import main  # noqa: E402

main()
