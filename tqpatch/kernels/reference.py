"""PyTorch references for the kernels: the CPU fallback and the oracle of the kernel tests.

Both are written with tqpatch's own quantizer/codec code (dequantize, then
ordinary float32 attention), so a kernel that agrees with them agrees with
the library's definition of TurboQuant.
"""

from __future__ import annotations

import torch

from ..codec import Parts


def encode_reference(codec, x: torch.Tensor) -> Parts:
    """What the store kernel must produce: codec.encode(x) for x [B, H, T, d]."""
    return codec.encode(x)


def decode_attention_reference(
    q: torch.Tensor,  # [B, Hq, d] one query token per row
    key_codec,
    value_codec,
    key_parts: Parts,  # [B, Hkv, L, ...] compressed keys
    value_parts: Parts,  # [B, Hkv, L, ...] compressed values
    fp_keys: torch.Tensor | None,  # [B, Hkv, F, d] full-precision keys (sinks, window, new token)
    fp_values: torch.Tensor | None,  # [B, Hkv, F, d]
    scaling: float,
    valid: torch.Tensor | None = None,  # [B, L] bool, compressed token validity (None: all valid)
    fp_valid: torch.Tensor | None = None,  # [B, F] bool
    key_bias: torch.Tensor | None = None,  # [B, Hq, L] float32, added to ⟨q, k̃⟩ of the compressed tokens
    code_query: torch.Tensor | None = None,  # [B, Hq, d]: scores the compressed tokens instead of q
    norm_bias: torch.Tensor | None = None,  # [B, Hq, groups] float32: Σ_g norm_bias_g ‖k_g‖² added to ⟨q, k̃⟩ too
) -> torch.Tensor:
    """Softmax attention of one query token over dequantized compressed tokens + exact fp tokens, float32: [B, Hq, d].

    Logit of compressed token j: (⟨q_c, k̃_j⟩ + key_bias[j]) · scaling, with q_c = code_query or q
    (key_bias: ⟨q, R_p μ⟩ of centered keys; code_query: A⁻¹q of query-shaped keys; norm_bias: the score variance's
    σ²/2 / scaling over the groups' stored norms, `codec.score_variance`); fp token: ⟨q, k⟩ · scaling."""
    keys = [key_codec.decode(key_parts, torch.float32)]
    values = [value_codec.decode(value_parts, torch.float32)]
    b = q.shape[0]
    masks = [valid if valid is not None else torch.ones(b, keys[0].shape[2], dtype=torch.bool, device=q.device)]
    if fp_keys is not None and fp_keys.shape[2] > 0:
        keys.append(fp_keys.float())
        values.append(fp_values.float())
        masks.append(fp_valid if fp_valid is not None else torch.ones(b, fp_keys.shape[2], dtype=torch.bool, device=q.device))
    k, v, m = torch.cat(keys, 2), torch.cat(values, 2), torch.cat(masks, 1)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # [B, Hq, L, d]
    v = v.repeat_interleave(groups, dim=1)
    n = keys[0].shape[2]
    scores = torch.einsum("bhd,bhld->bhl", q.float(), k)
    if code_query is not None:
        scores = torch.cat([torch.einsum("bhd,bhld->bhl", code_query.float(), k[:, :, :n]), scores[..., n:]], dim=-1)
    if key_bias is not None:
        scores = torch.cat([scores[..., :n] + key_bias.float(), scores[..., n:]], dim=-1)
    if norm_bias is not None:
        norms2 = key_codec.group_norms(key_parts).square().repeat_interleave(groups, dim=1)  # [B, Hq, L, groups]
        scores = torch.cat([scores[..., :n] + torch.einsum("bhg,bhlg->bhl", norm_bias.float(), norms2), scores[..., n:]], dim=-1)
    scores = scores * scaling
    scores = scores.masked_fill(~m[:, None, :], float("-inf"))
    return torch.einsum("bhl,bhld->bhd", torch.softmax(scores, dim=-1), v)
