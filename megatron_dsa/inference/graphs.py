"""CUDA graphs for the decode step: one graph per batch-size bucket, so a step's time is the
GPU's, not the launcher's.

A graph replays fixed launches on fixed addresses. The decode step qualifies: the paged cache's
pools, block table and lengths are allocated once and read on the device, the Triton decode
kernels' grids depend on the cache's capacity, not the lengths, and the MoE runs without
reading its routing on the host (``DSAInference._stacked_moe``). A batch of B sequences runs
the smallest bucket >= B; the extra rows repeat the first sequence's token (the same row written
twice with the same values) and their logits are dropped. A graph is captured on a bucket's
first use, for one cache.
"""

from __future__ import annotations

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def capture(fn):
    """(graph, output) of ``fn`` captured as a CUDA graph, after two warm-up calls on a side stream
    (the kernels compile and allocate outside the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class DecodeGraphs:
    def __init__(self, engine, buckets=BUCKETS):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; this process has none")
        self.engine = engine
        self.buckets = tuple(sorted(buckets))
        self._graphs: dict[int, tuple] = {}  # bucket -> (graph, tokens, seqs, logits)
        self._cache = None

    def bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"a decode batch of {batch} is larger than the largest CUDA graph bucket {self.buckets[-1]}")

    def _capture(self, size: int, cache):
        tokens = torch.zeros(size, dtype=torch.long, device=self.engine.device)
        seqs = torch.zeros(size, dtype=torch.long, device=self.engine.device)
        graph, logits = capture(lambda: self.engine.decode_step(tokens, seqs, cache, graphed=True))
        return graph, tokens, seqs, logits

    def run(self, tokens: torch.Tensor, seqs: torch.Tensor, cache) -> torch.Tensor:
        """logits [B, V] of ``engine.decode_step(tokens, seqs, cache)``, replayed from the graph."""
        if cache is not self._cache:  # graphs hold the cache's addresses
            self._graphs.clear()
            self._cache = cache
        B = tokens.shape[0]
        size = self.bucket(B)
        if size not in self._graphs:
            # Capture writes the first sequence's next row with dummy values; the replay rewrites it.
            self._graphs[size] = self._capture(size, cache)
        graph, tok_buf, seq_buf, logits = self._graphs[size]
        tok_buf.copy_(tokens[:1].expand(size))
        seq_buf.copy_(seqs[:1].expand(size))
        tok_buf[:B].copy_(tokens)
        seq_buf[:B].copy_(seqs)
        graph.replay()
        return logits[:B].clone()
