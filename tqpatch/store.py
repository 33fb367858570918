"""The per-layer compressed K/V store: a transformers cache layer holding TurboQuant codes.

One `TurboQuantLayer` replaces one layer of a transformers `Cache`. Tokens of
the layer's sequence are kept in up to three places, oldest first:

    [ sink tokens (full precision) | compressed tokens (codes) | window (full precision) ]

- the first `sink_tokens` tokens of the sequence stay exact (in a sliding-window
  layer only with `sliding_sinks`, and only while its window shows them);
- the last `residual_length` tokens stay exact in the window; tokens that
  leave the window are quantized once, appended to the compressed buffers and
  never re-quantized;
- sliding-window layers (Gemma 2/3, Mistral) keep only their last
  `sliding_window - 1` tokens, like transformers' DynamicSlidingWindowLayer.

Refit (`refit_tokens`, full-attention layers): the key codec is fitted on the
first chunk it stores (centering μ, query shaping A, an eigen split's basis),
which may be a few dozen tokens. With refit_tokens = N the layer also keeps
exact copies of its first N compressed keys; once it holds N, a fresh key codec
is fitted on all of them (and on the queries seen until then), they are encoded
again with it and the copies are dropped. Reads are compressed throughout.
With a value-codec factory too (`refit_values`), the values get the same: their
outlier channels, norm ranges or eigen basis are chosen again on N tokens.

`update` returns the layer's K/V for attention, dequantized in the model's
dtype for this call only: no dequantized copy outlives the call, so at most
one layer's dequantized K/V exists at a time.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .codec import Parts, SplitCodec, TurboQuantCodec

Codec = TurboQuantCodec | SplitCodec


def _tensor_nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class TokenBuffer:
    """Named tensors sharing leading axes [B, H, T, ...], grown along T with a little spare capacity.

    `parts` holds views of the live tokens [:, :, :length]; the tensors behind
    them may hold spare room for appends (counted by `nbytes_allocated`).
    A reallocation adds length/8 spare tokens, but never fewer than MIN_SPARE
    nor more than MAX_SPARE: after a 32k-token prefill the spare is 256 tokens
    (0.8%), not 4k (12.5%), so long caches fit more sequences on a card, and
    copying the layer once per 256 decode steps adds under 1% to the bytes a
    decode step reads anyway.
    """

    GROWTH = 8
    MIN_SPARE = 16
    MAX_SPARE = 256

    def __init__(self) -> None:
        self._storage: Parts = {}
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def parts(self) -> Parts:
        return {name: t[:, :, : self.length] for name, t in self._storage.items()}

    def append(self, new: Parts) -> None:
        """Copy new tokens (each part [B, H, T_new, ...]) after the live ones."""
        added = next(iter(new.values())).shape[2]
        if added == 0:
            return
        if not self._storage:  # the first append allocates exactly what it holds
            self._storage = {name: t.clone(memory_format=torch.contiguous_format) for name, t in new.items()}
            self.length = added
            return
        for name, slot in self.reserve(added).items():
            slot.copy_(new[name])
        self.commit(added)

    def reserve(self, added: int) -> Parts | None:
        """Views [:, :, length:length+added] of the storage (grown if needed) for a kernel to write the next
        tokens into, followed by `commit(added)`; None while the buffer holds no tensors yet."""
        if not self._storage:
            return None
        needed = self.length + added
        capacity = next(iter(self._storage.values())).shape[2]
        if needed > capacity:
            grown = {}
            for name, t in self._storage.items():
                spare = min(max(self.length // self.GROWTH, self.MIN_SPARE), self.MAX_SPARE)
                buf = t.new_empty(*t.shape[:2], needed + spare, *t.shape[3:])
                buf[:, :, : self.length] = t[:, :, : self.length]
                grown[name] = buf
            self._storage = grown
        return {name: t[:, :, self.length : needed] for name, t in self._storage.items()}

    def commit(self, added: int) -> None:
        self.length += added

    def keep(self, start: int, end: int) -> None:
        """Keep tokens [start, end) only (a fresh tight copy, so dropped tokens free their memory)."""
        self._storage = {name: t[:, :, start:end].clone() for name, t in self._storage.items()}
        self.length = max(end - start, 0)

    def map_batch(self, fn) -> None:
        """Apply fn to every tensor's batch axis (reorder, select, repeat)."""
        self._storage = {name: fn(t[:, :, : self.length]) for name, t in self._storage.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of the live tokens."""
        return sum(_tensor_nbytes(t) for t in self.parts.values())

    @property
    def nbytes_allocated(self) -> int:
        return sum(_tensor_nbytes(t) for t in self._storage.values())


def _cat(*tensors: torch.Tensor | None) -> torch.Tensor:
    present = [t for t in tensors if t is not None and t.shape[-2] > 0]
    return present[0] if len(present) == 1 else torch.cat(present, dim=-2)


class TurboQuantLayer(CacheLayerMixin):
    """A transformers cache layer storing K/V as TurboQuant codes (see the module docstring)."""

    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        key_codec: Codec,
        value_codec: Codec,
        residual_length: int = 0,
        sink_tokens: int = 0,
        sliding_sinks: bool = False,
        prefill_exact: bool = True,
        sliding_window: int | None = None,
        refit_tokens: int = 0,
        make_key_codec=None,
        make_value_codec=None,
        score_variance: bool = False,
    ):
        super().__init__()
        self.key_codec = key_codec
        self.value_codec = value_codec
        self.residual_length = residual_length
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        # A sliding-window layer sees its sinks only until its window moves past them (its first `sliding_window`
        # queries); they are kept exact there only when asked for (`sliding_sinks`), and trimmed first.
        self.sink_tokens = sink_tokens if (sliding_sinks or not self.is_sliding) else 0
        self.prefill_exact = prefill_exact
        self.compressed_keys = TokenBuffer()
        self.compressed_values = TokenBuffer()
        self.sink_keys: torch.Tensor | None = None  # [B, H, S, d] model dtype
        self.sink_values: torch.Tensor | None = None
        self.window_keys: torch.Tensor | None = None  # [B, H, W, d] model dtype
        self.window_values: torch.Tensor | None = None
        self.cumulative_length = 0  # tokens ever added (what get_seq_length reports)
        self.compressed_start = 0  # sequence index of compressed token 0 (of the next one while none is stored)
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.fused = False  # set by tqpatch.attention.prepare: decode steps attend on the codes (CUDA)
        self.score_variance = score_variance  # attention adds σ²/2 to the compressed keys' logits (tqpatch.attention)
        # refit (module docstring): exact copies of the first compressed keys until the key codec is fitted again
        self.refit_tokens = refit_tokens if (make_key_codec is not None and not self.is_sliding) else 0
        self._make_key_codec = make_key_codec
        self._make_value_codec = make_value_codec  # None: the values keep the codec fitted on their first chunk
        self.refit_pending = self.refit_tokens > 0
        self._exact_keys: torch.Tensor | None = None  # [B, H, n, d] model dtype, n < refit_tokens
        self._exact_values: torch.Tensor | None = None  # the same for values (with make_value_codec)

    def __repr__(self) -> str:
        kind = "sliding" if self.is_sliding else "full"
        return f"TurboQuantLayer({kind}, k={self.key_codec.bits}b, v={self.value_codec.bits}b, stored={self.stored_length})"

    # -- sizes -------------------------------------------------------------------
    @property
    def num_sink(self) -> int:
        return 0 if self.sink_keys is None else self.sink_keys.shape[-2]

    @property
    def num_window(self) -> int:
        return 0 if self.window_keys is None else self.window_keys.shape[-2]

    @property
    def num_compressed(self) -> int:
        return len(self.compressed_keys)

    @property
    def stored_length(self) -> int:
        return self.num_sink + self.num_compressed + self.num_window

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        """(kv_length, kv_offset) of the K/V the next `update` returns (query_length may be a cache_position tensor)."""
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        return min(self.cumulative_length, self.sliding_window - 1) + query_length, kv_offset

    # -- writing -----------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype = key_states.dtype
        self.device = key_states.device
        self.is_initialized = True

    def observe_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """The model's RoPE cos/sin [B, T, d] of this call, for codecs that center keys before RoPE."""
        for codec in (self.key_codec, self.value_codec):
            if getattr(codec, "uses_positions", False):
                codec.observe_rope(cos, sin)

    @property
    def wants_queries(self) -> bool:
        """True while the key codec is fitting a query-shaped transform (before its first encode, or its refit)."""
        moments = getattr(self.key_codec, "queries", None)
        return getattr(self.key_codec, "wants_queries", False) or (self.refit_pending and moments is not None)

    def observe_queries(self, queries: torch.Tensor, kv_heads: int) -> None:
        """Pre-RoPE queries [B, T, Hq, d] of this call (read by `shape_keys` codecs until they calibrate or refit)."""
        if getattr(self.key_codec, "wants_queries", False):
            self.key_codec.observe_queries(queries, kv_heads)
        elif self.wants_queries:
            self.key_codec.queries.observe(queries, kv_heads)

    @staticmethod
    def _encode(codec: Codec, x: torch.Tensor, first_index: int) -> Parts:
        return codec.encode(x, first_index) if getattr(codec, "uses_positions", False) else codec.encode(x)

    @staticmethod
    def _decode(codec: Codec, parts: Parts, dtype: torch.dtype, first_index: int) -> torch.Tensor:
        return codec.decode(parts, dtype, first_index) if getattr(codec, "uses_positions", False) else codec.decode(parts, dtype)

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append new tokens [B, H, T, d]: fill the sinks, then the window; quantize what leaves the window."""
        first = self.cumulative_length - keys.shape[-2]  # the sequence index of the first new token (update counted them)
        if first < self.sink_tokens:  # by index, not by num_sink: a sliding layer's trimmed sinks stay taken
            take = min(self.sink_tokens - first, keys.shape[-2])
            # A copy: a view would pin the caller's whole K/V tensor (a prefill's, uncompressed) in memory.
            self.sink_keys = _cat(self.sink_keys, keys[..., :take, :]).clone()
            self.sink_values = _cat(self.sink_values, values[..., :take, :]).clone()
            keys, values = keys[..., take:, :], values[..., take:, :]
            self.compressed_start += take
        if keys.shape[-2] == 0:
            return
        window_keys = _cat(self.window_keys, keys)
        window_values = _cat(self.window_values, values)
        overflow = window_keys.shape[-2] - self.residual_length
        if overflow > 0:
            from .attention import store_compressed  # the store kernel on fused CUDA layers, else codec.encode

            store_compressed(self, self.compressed_keys, self.key_codec, window_keys[..., :overflow, :])
            store_compressed(self, self.compressed_values, self.value_codec, window_values[..., :overflow, :])
            if self.refit_pending:
                self._exact_keys = _cat(self._exact_keys, window_keys[..., :overflow, :]).clone()
                if self._make_value_codec is not None:
                    self._exact_values = _cat(self._exact_values, window_values[..., :overflow, :]).clone()
                if self._exact_keys.shape[-2] >= self.refit_tokens:
                    self._refit()
            window_keys, window_values = window_keys[..., overflow:, :], window_values[..., overflow:, :]
        # Copy out of the caller's tensors, so the window never pins a larger buffer.
        self.window_keys, self.window_values = window_keys.clone(), window_values.clone()

    def _refit(self) -> None:
        """Fit a fresh key codec on the exact copies of all compressed keys (and the queries seen so far),
        encode them again with it and drop the copies; the same for values where they are kept."""
        from .attention import store_compressed

        old, fresh = self.key_codec, self._make_key_codec()
        for name in ("rope", "queries"):  # what the old codec observed: the RoPE table, the queries up to now
            if getattr(old, name, None) is not None:
                setattr(fresh, name, getattr(old, name))
        self.key_codec = fresh
        self.compressed_keys = TokenBuffer()
        store_compressed(self, self.compressed_keys, fresh, self._exact_keys)
        if self._exact_values is not None:
            self.value_codec = self._make_value_codec()
            self.compressed_values = TokenBuffer()
            store_compressed(self, self.compressed_values, self.value_codec, self._exact_values)
        self._exact_keys = self._exact_values = None
        self.refit_pending = False

    def _trim_front(self, count: int) -> None:
        """Forget the `count` oldest stored tokens (sliding-window layers): sinks first, then compressed ones."""
        if count <= 0:
            return
        from_sink = min(count, self.num_sink)
        if from_sink:
            kept = self.num_sink - from_sink
            self.sink_keys = self.sink_keys[..., from_sink:, :].clone() if kept else None
            self.sink_values = self.sink_values[..., from_sink:, :].clone() if kept else None
            count -= from_sink
        if count <= 0:
            return
        self.compressed_start += count  # the sequence index of the next compressed token
        from_compressed = min(count, self.num_compressed)
        if from_compressed:
            self.compressed_keys.keep(from_compressed, self.num_compressed)
            self.compressed_values.keep(from_compressed, len(self.compressed_values))
        rest = count - from_compressed
        if rest:
            self.window_keys = self.window_keys[..., rest:, :].clone()
            self.window_values = self.window_values[..., rest:, :].clone()

    def stored_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored tokens [B, H, L, d] in the model dtype, compressed ones dequantized now."""
        keys = [self.sink_keys]
        values = [self.sink_values]
        if self.num_compressed:
            first = self.compressed_start
            keys.append(self._decode(self.key_codec, self.compressed_keys.parts, self.dtype, first))
            values.append(self._decode(self.value_codec, self.compressed_values.parts, self.dtype, first))
        keys.append(self.window_keys)
        values.append(self.window_values)
        return _cat(*keys), _cat(*values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V [B, H, T, d]; return the K/V to attend to (see TurboQuantConfig.prefill_exact)."""
        if self.fused:  # one decode token on CUDA: attend on the codes (tqpatch.attention)
            from .attention import fused_update

            marker = fused_update(self, key_states, value_states)
            if marker is not None:
                return marker
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        if self.prefill_exact:
            if self.stored_length:
                past_keys, past_values = self.stored_kv()
                keys, values = _cat(past_keys, key_states), _cat(past_values, value_states)
            else:
                keys, values = key_states, value_states
            read = self._compressed_read()
            self._store(key_states, value_states)
        else:
            self._store(key_states, value_states)
            keys, values = self.stored_kv()
            read = self._compressed_read()
        if read is not None:
            from .attention import note_compressed_read

            note_compressed_read(keys, read)
        if self.is_sliding:
            self._trim_front(self.stored_length - (self.sliding_window - 1))
        return keys, values

    def _compressed_read(self):
        """What attention needs to add the scores' variance to the compressed keys `update` returns now
        (`tqpatch.attention.CompressedRead`), or None (option off, nothing compressed)."""
        if not self.score_variance or not self.num_compressed:
            return None
        from .attention import CompressedRead

        return CompressedRead(self.key_codec, self.compressed_keys.parts, self.num_sink)

    # -- editing -----------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last -tokens_to_remove tokens (tokens_to_remove <= 0); a positive value is a target length."""
        if not self.is_initialized:
            return
        remove = -tokens_to_remove if tokens_to_remove <= 0 else max(self.cumulative_length - tokens_to_remove, 0)
        if remove == 0:
            return
        if remove > self.stored_length:
            raise RuntimeError(
                f"cannot crop {remove} tokens: this layer holds only the last {self.stored_length} "
                "(a sliding-window layer forgets older tokens)"
            )
        from_window = min(remove, self.num_window)
        if from_window:
            self.window_keys = self.window_keys[..., : self.num_window - from_window, :]
            self.window_values = self.window_values[..., : self.num_window - from_window, :]
        from_compressed = min(remove - from_window, self.num_compressed)
        if from_compressed:
            self.compressed_keys.keep(0, self.num_compressed - from_compressed)
            self.compressed_values.keep(0, len(self.compressed_values) - from_compressed)
            if self._exact_keys is not None:
                self._exact_keys = self._exact_keys[..., : self.num_compressed, :]
            if self._exact_values is not None:
                self._exact_values = self._exact_values[..., : self.num_compressed, :]
        from_sink = remove - from_window - from_compressed
        if from_sink:
            self.sink_keys = self.sink_keys[..., : self.num_sink - from_sink, :]
            self.sink_values = self.sink_values[..., : self.num_sink - from_sink, :]
            self.compressed_start -= from_sink
        self.cumulative_length -= remove

    def _map_batch(self, fn) -> None:
        self.compressed_keys.map_batch(fn)
        self.compressed_values.map_batch(fn)
        for name in ("sink_keys", "sink_values", "window_keys", "window_values", "_exact_keys", "_exact_values"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices, ...])

    def reset(self) -> None:
        self.compressed_keys = TokenBuffer()
        self.compressed_values = TokenBuffer()
        self.sink_keys = self.sink_values = self.window_keys = self.window_values = self._exact_keys = self._exact_values = None
        self.cumulative_length = 0
        self.compressed_start = 0
        self.is_initialized = False

    def offload(self):
        raise NotImplementedError("tqpatch does not offload its compressed store; create the cache with offloading=False")

    def prefetch(self):
        raise NotImplementedError("tqpatch does not offload its compressed store; create the cache with offloading=False")

    # -- accounting ----------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Token counts and bytes held by this layer (compressed codes, full-precision sinks and window)."""
        full_precision = [self.sink_keys, self.sink_values, self.window_keys, self.window_values, self._exact_keys, self._exact_values]
        fp_bytes = sum(_tensor_nbytes(t) for t in full_precision)
        compressed_bytes = self.compressed_keys.nbytes + self.compressed_values.nbytes
        extra = self.key_codec.extra_nbytes + self.value_codec.extra_nbytes
        allocated = self.compressed_keys.nbytes_allocated + self.compressed_values.nbytes_allocated
        return {
            "compressed_tokens": self.num_compressed,
            "full_precision_tokens": self.num_sink + self.num_window,
            "compressed_bytes": compressed_bytes + extra,
            "full_precision_bytes": fp_bytes,
            "allocated_bytes": allocated + extra + fp_bytes,
        }
