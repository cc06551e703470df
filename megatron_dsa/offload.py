"""Tensors parked in pinned host memory between a layer's forward and its backward.

The sparse training step keeps each layer's top-k selection for its backward: 0.5 GiB a layer at
128K x 2048 in 16 bits a key, which at a narrow model's shape is more than what its dense
attention keeps. ``HostOffload`` copies such tensors to pinned host memory on a side stream as
soon as they are made (the GPU memory is reused once the copy is done) and back before the
backward needs them: ``prefetch`` starts the copy back early, so the backward of one layer can
bring in the previous layer's tensors while it computes (``previous``: the offload made just
before this one in the forward, the one a plain backward needs next).

Off the GPU there is nothing to move: the tensors stay as they are.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

_SIDE_STREAMS: dict = {}  # one copy stream per device, made on first use
_LAST: dict = {}  # device -> weak reference to the newest offload made there


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


class HostOffload:
    """``tensors`` (one device) copied to pinned host memory now and back by ``tensors()``."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        if not tensors or len({t.device for t in tensors}) != 1:
            raise ValueError("HostOffload takes one or more tensors on one device")
        self.device = tensors[0].device
        self._previous = _LAST.get(self.device)
        _LAST[self.device] = weakref.ref(self)
        self._back: Optional[list[torch.Tensor]] = None
        if self.device.type != "cuda":
            self._host = list(tensors)
            return
        main, side = torch.cuda.current_stream(self.device), _side_stream(self.device)
        side.wait_stream(main)  # the tensors are complete
        with torch.cuda.stream(side):
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                          for t in tensors]
        for t in tensors:
            t.record_stream(side)  # their memory is reused only after the copies

    def previous(self) -> Optional["HostOffload"]:
        """The offload made on this device just before this one (None if gone)."""
        return self._previous() if self._previous is not None else None

    def prefetch(self) -> None:
        """Start the copy back to the device (once; nothing after ``tensors()``)."""
        if self.device.type != "cuda" or self._back is not None or self._host is None:
            return
        side = _side_stream(self.device)
        with torch.cuda.stream(side):
            self._back = [h.to(self.device, non_blocking=True) for h in self._host]
            self._ready = side.record_event()

    def tensors(self) -> list[torch.Tensor]:
        """The tensors on their device again, ready on the current stream; the host copies go."""
        if self._host is None:  # a second backward over one graph (retain_graph)
            raise RuntimeError("tensors offloaded to host memory were already taken back: a graph whose "
                               "tensors went to host memory runs one backward (leave the offload off to retain it)")
        if self.device.type != "cuda":
            out, self._host = self._host, None
            return out
        self.prefetch()
        main = torch.cuda.current_stream(self.device)
        main.wait_event(self._ready)
        for t in self._back:
            t.record_stream(main)  # made on the side stream, used on this one
        out, self._back, self._host = self._back, None, None
        return out
