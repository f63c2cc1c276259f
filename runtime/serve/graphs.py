"""Decode steps as CUDA graphs (`serve.cuda_graphs = true`): replay a captured step instead of launching its
operators one by one from Python, which is what a small decode batch costs on a GPU.

A pure decode step (every segment one token after a cached prefix) of n sequences runs in the graph of the
smallest bucket >= n (`BUCKETS`, up to serve.max_batch), captured on first use: the step's inputs are copied
into that graph's static buffers; rows past n are padding (token 0 at position 0, its latent written into the
cache's scratch page that no sequence owns, length 1), and the first n rows of the graph's logits are the
step's. Everything inside is device work with fixed shapes: the block table has a fixed width
(max_model_len / page_size pages), the decode kernel gets that fixed maximum length (`max_seq_len`, so no
length is read back to the host), and the MoE layers take the local dispatch path (no host synchronisation;
expert-parallel layouts do not use graphs). Other steps (prefill chunks, speculative verification, more
sequences than the largest bucket) run eagerly.

Unverified on hardware (this project's machines have no GPU). On CPU the same static-buffer step runs
without capture (`capture=False`), which the tests compare with the eager step; the config switch refuses to
start without CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.kernels import kernel_backend
from ops.paged_attention import DecodeIndex, decode_index
from runtime.serve.attention import PagedAttention, apply_table_updates

__all__ = ["BUCKETS", "DecodeGraphs"]

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class _Static:
    """One bucket's static buffers, shaped as the `StepIndex` fields `PagedAttention` reads for an
    all-decode step, its captured graph (None without capture) and its output."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    dec_table: torch.Tensor
    dec_lens: torch.Tensor
    dec_max: int
    dec_index: DecodeIndex | None = None
    all_decode: bool = True
    graph: object = None
    logits: torch.Tensor | None = None


class DecodeGraphs:
    """Bucketed static decode steps over `cache` (see the module docstring)."""

    def __init__(self, model, cache, max_batch: int, max_model_len: int, capture: bool = True) -> None:
        if cache.scratch_page is None:
            raise ValueError("decode graphs need a cache with a scratch page")
        self.model, self.cache, self.capture = model, cache, capture
        self.device = model.lm_head.weight.device
        self.width = -(-max_model_len // cache.page_size)
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.layer_slots = {li: li for li in range(len(model.model.layers))}
        cache.block_table.reserve(max_batch, self.width)
        self.static: dict[int, _Static] = {}
        self.pool = None
        self.replays = 0

    @staticmethod
    def eligible(plan) -> bool:
        return all(n == 1 for n in plan.lens) and all(o > 0 for o in plan.offsets) and all(
            int(w) == 1 for w in plan.want_logits)

    @torch.no_grad()
    def run(self, plan) -> torch.Tensor | None:
        """The step's logits [n, V] from its bucket's graph; None when the step must run eagerly."""
        n = len(plan)
        if not n or n > self.buckets[-1] or not self.eligible(plan):
            return None
        apply_table_updates(plan, self.cache)
        st = self._bucket(next(b for b in self.buckets if b >= n))
        table = self.cache.block_table.table
        rows = torch.tensor(plan.rows, dtype=torch.long, device=self.device)
        st.dec_table[:n].copy_(table.index_select(0, rows)[:, : self.width])
        inputs = torch.tensor([plan.ids, plan.positions, plan.slots, [o + 1 for o in plan.offsets]],
                              dtype=torch.long, device=self.device)
        self._fill(st, n, inputs)
        if st.graph is not None:
            st.graph.replay()
            self.replays += 1
            out = st.logits
        else:
            out = self._forward(st)
        return out[:n]

    def _fill(self, st: _Static, n: int, inputs: torch.Tensor) -> None:
        b = st.ids.shape[0]
        pad = self.cache.scratch_page * self.cache.page_size
        st.ids[:n], st.positions[:n], st.slots[:n] = inputs[0], inputs[1], inputs[2]
        st.dec_lens[:n] = inputs[3].to(torch.int32)
        if n < b:
            st.ids[n:], st.positions[n:], st.slots[n:], st.dec_lens[n:] = 0, 0, pad, 1

    def _bucket(self, b: int) -> _Static:
        st = self.static.get(b)
        if st is not None:
            return st
        dev, pad = self.device, self.cache.scratch_page * self.cache.page_size
        table = torch.full((b, self.width), self.cache.scratch_page, dtype=torch.int32, device=dev)
        st = _Static(torch.zeros(b, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.long, device=dev),
                     torch.full((b,), pad, dtype=torch.long, device=dev), table,
                     torch.ones(b, dtype=torch.int32, device=dev), self.width * self.cache.page_size)
        if self.capture:
            self._capture(st)
        self.static[b] = st
        return st

    def _forward(self, st: _Static) -> torch.Tensor:
        m = self.model
        if kernel_backend(self.device) == "torch":
            st.dec_index = decode_index(st.dec_table, st.dec_lens, self.cache.page_size, st.dec_max)
        ctx = PagedAttention(self.cache, st, self.layer_slots)
        h = m.model.embed_tokens(st.ids[None])
        cos, sin = m.rotary(st.positions, h.dtype)
        for layer in m.model.layers:
            h = layer(h, cos, sin, ctx)
        return m.head(m.model.norm(h[0])).float()

    def _capture(self, st: _Static) -> None:
        """Capture the bucket's step (its buffers hold padding only: warm-up and capture write the scratch
        page alone)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: kernel compilation and autotuning happen outside the capture
                self._forward(st)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            st.logits = self._forward(st)
        self.pool = graph.pool()
        st.graph = graph
