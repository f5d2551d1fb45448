"""Preallocated KV caches for request sessions and batched forwards.

transformers' ``DynamicCache`` appends by ``torch.cat``: every decode step copies the whole cache
of every layer, and ``forward_batch`` used to rebuild a padded batch cache from zeros and then
``cat`` each session's new keys onto its own cache.  On CPU that copying was 20% of a single
decode step and over half of a batched step (8 sessions × 3 tokens, bundled target).

``SlabCache`` keeps each layer's keys/values in a buffer with spare room (grown by doubling):
``update`` writes the new positions in place and returns views; ``crop`` only moves the length.
``batch_cache`` gathers several sessions' caches, left-padded, into one slab sized for the new
tokens (one copy per session and layer, zeros only in the padding), and ``append_rows`` copies
each session's new keys/values back.  Numerically nothing changes: attention sees exactly the
same keys and values as with ``DynamicCache``.

Only plain full-attention caches use slabs (``supports_slab``); other layer types (sliding
windows, linear attention, …) keep transformers' own cache.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_CAPACITY = 64


class SlabLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in a buffer with spare capacity."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    def _views(self) -> None:
        self.keys = self._k[..., :self.length, :]
        self.values = self._v[..., :self.length, :]

    def reserve(self, key_like: torch.Tensor, value_like: torch.Tensor, total: int) -> None:
        """Make room for ``total`` positions (keeping the first ``length``)."""
        if self._k is not None and self._k.shape[-2] >= total:
            return
        cap = max(MIN_CAPACITY, total, 2 * (self._k.shape[-2] if self._k is not None else 0))
        k = key_like.new_empty(key_like.shape[:-2] + (cap, key_like.shape[-1]))
        v = value_like.new_empty(value_like.shape[:-2] + (cap, value_like.shape[-1]))
        if self._k is not None and self.length:
            k[..., :self.length, :] = self._k[..., :self.length, :]
            v[..., :self.length, :] = self._v[..., :self.length, :]
        self._k, self._v = k, v
        self.dtype, self.device = k.dtype, k.device
        self.is_initialized = True
        self._views()

    def lazy_initialization(self, key_states, value_states) -> None:
        self.reserve(key_states, value_states, key_states.shape[-2])

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        self.reserve(key_states, value_states, self.length + n)
        self._k[..., self.length:self.length + n, :] = key_states
        self._v[..., self.length:self.length + n, :] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count (tokens to remove)")
        if tokens_to_remove and self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0
        super().reset()


class SlabCache(DynamicCache):
    """A ``DynamicCache`` of ``SlabLayer`` s (one per decoder layer, created on first use)."""

    def __init__(self):
        super(DynamicCache, self).__init__(layer_class_to_replicate=SlabLayer)


def supports_slab(config) -> bool:
    """True when every decoder layer is plain full attention (the only kind slabs implement)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return False
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    return True


def new_cache(config):
    """The cache a session of this model starts with."""
    return SlabCache() if supports_slab(config) else DynamicCache()


def copy_cache(cache, n: int):
    """A new cache holding the first ``n`` positions of ``cache`` (copied: the two then grow
    apart)."""
    if not isinstance(cache, SlabCache):
        out = copy.deepcopy(cache)
        drop = out.get_seq_length() - n
        if drop > 0:
            out.crop(-drop)
        return out
    out = SlabCache()
    for keys, values in layer_kv(cache):
        layer = SlabLayer()
        layer.reserve(keys, values, n)
        layer._k[..., :n, :] = keys[..., :n, :]
        layer._v[..., :n, :] = values[..., :n, :]
        layer.length = n
        layer._views()
        out.layers.append(layer)
    return out


def layer_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of a cache, or [] when it holds nothing yet."""
    out = []
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None \
                or layer.keys.numel() == 0:
            return []
        out.append((layer.keys, layer.values))
    return out


def batch_cache(caches: list, lc: int, n: int):
    """One cache for a batched forward: row ``i`` holds ``caches[i]`` right-aligned in the first
    ``lc`` positions (zeros before it), with room for ``n`` new positions after ``lc``."""
    kvs = [layer_kv(c) for c in caches]
    b = len(caches)
    batch = SlabCache()
    if lc == 0:
        return batch
    n_layers = max(len(kv) for kv in kvs)
    for idx in range(n_layers):
        ref_k, ref_v = next(kv[idx] for kv in kvs if kv)
        layer = SlabLayer()
        layer.reserve(ref_k.expand((b,) + tuple(ref_k.shape[1:])),  # shape only: no copy
                      ref_v.expand((b,) + tuple(ref_v.shape[1:])), lc + n)
        for i, kv in enumerate(kvs):
            have = kv[idx][0].shape[-2] if kv else 0
            if have < lc:
                layer._k[i, ..., :lc - have, :] = 0
                layer._v[i, ..., :lc - have, :] = 0
            if have:
                layer._k[i, ..., lc - have:lc, :] = kv[idx][0][0]
                layer._v[i, ..., lc - have:lc, :] = kv[idx][1][0]
        layer.length = lc
        layer._views()
        batch.layers.append(layer)
    return batch


def append_rows(cache, batch, row: int, start: int, n: int) -> None:
    """Append positions ``start:start+n`` of row ``row`` of ``batch`` to ``cache``."""
    for idx, layer in enumerate(batch.layers):
        cache.update(layer.keys[row:row + 1, ..., start:start + n, :],
                     layer.values[row:row + 1, ..., start:start + n, :], idx)
