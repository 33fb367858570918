"""Tiny random-weight decoder models of several architectures, built in the tests (no download)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97


def _common(**extra):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    base.update(extra)
    return base


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=512))


def _gemma3():
    config = tf.Gemma3TextConfig(**_common(head_dim=32, num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=32,
                                           layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]))
    return tf.Gemma3ForCausalLM(config)


BUILDERS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_common())),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_common(sliding_window=None))),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_common())),  # q/k/v biases
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_common(head_dim=16))),  # q/k RMSNorm
    "gemma3": _gemma3,  # hybrid sliding-window + global layers
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_common(pad_token_id=0))),  # fused qkv projection
    "gpt2": _gpt2,  # MHA, Conv1D projections, no RoPE
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[arch]().eval()
    # Larger weights than the default init make the tiny models' attention less uniform,
    # so compression errors show up in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(3.0)
    return model


def prompt(batch: int = 1, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def patched_in_chunks(model: torch.nn.Module, ids: torch.Tensor, config, chunk: int = 8):
    """(exact logits of one pass, logits of `ids` fed in chunks through a patched model, its cache); unpatches."""
    import tqpatch

    with torch.no_grad():
        exact = model(ids).logits
        tqpatch.patch(model, config)
        try:
            cache = tf.DynamicCache(config=model.config)
            steps = range(0, ids.shape[1], chunk)
            out = torch.cat([model(ids[:, s : s + chunk], past_key_values=cache, use_cache=True).logits for s in steps], dim=1)
        finally:
            tqpatch.unpatch(model)
    return exact, out, cache
