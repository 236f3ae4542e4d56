"""Index maps: how the indices of two coupled dimensions correspond.

A coupling edge joins dimension ``a`` (size ``n_a``) to dimension ``b`` (size ``n_b``). Its map
says which index of ``a`` travels with which index of ``b``: removing index ``i`` of ``a``
forces the removal of every index of ``b`` paired with it, and the other way round. Maps are
data; ``pairs`` expands them to two index arrays for the element-level union that turns a
channel group into its prunable *units* (one unit = the set of elements that go together).

- ``Identity``: ``a[i] <-> b[i]`` (elementwise ops, norms, depthwise channels).
- ``Offset(offset, step)``: ``a[offset + i*step] <-> b[i]``; ``a`` is the larger dimension
  (Concat output vs one input, Split input vs one output, Slice input vs output).
- ``Digit(stride)``: ``b[e] <-> a[(e // stride) % n_a]``; ``b`` is a merged axis that contains
  ``a`` as one factor (Flatten/Reshape into a linear layer: channel ``c`` owns ``stride``
  consecutive features when it is the outer factor, every ``n_a``-th feature when inner;
  a head owns ``head_dim`` consecutive columns).
- ``GroupTie(groups)``: ``a`` and ``b`` are the input and output channels of a grouped
  convolution; every channel of conv group ``j`` on either side goes together.
- ``Modulo(period)``: ``a[i] <-> b[i % period]``; the same position in every conv group.
- ``SharedDigit(size, stride_a, stride_b)``: ``a[i] <-> b[j]`` when both hold the same digit of
  one factor of ``size`` that each contains at its own place (``nn.MultiheadAttention``'s
  heads: the outer factor of the projection's width, the inner one of ``batch x heads``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class IndexMap:
    """Base class; subclasses are frozen dataclasses (hashable, printable, JSON-friendly)."""

    def pairs(self, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def check(self, n_a: int, n_b: int) -> str | None:
        """Return why the map cannot hold for these sizes, or ``None`` if it can."""
        return None

    @property
    def is_identity(self) -> bool:
        return False


@dataclass(frozen=True)
class Identity(IndexMap):
    def pairs(self, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(n_a, dtype=np.int64)
        return idx, idx

    def check(self, n_a: int, n_b: int) -> str | None:
        return None if n_a == n_b else f"identity map between sizes {n_a} and {n_b}"

    @property
    def is_identity(self) -> bool:
        return True


@dataclass(frozen=True)
class Offset(IndexMap):
    offset: int
    step: int = 1

    def pairs(self, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
        ib = np.arange(n_b, dtype=np.int64)
        return self.offset + ib * self.step, ib

    def check(self, n_a: int, n_b: int) -> str | None:
        if n_b == 0:
            return None
        last = self.offset + (n_b - 1) * self.step
        if self.offset < 0 or last >= n_a:
            return f"offset map [{self.offset}::{self.step}] x{n_b} outside size {n_a}"
        return None


@dataclass(frozen=True)
class Digit(IndexMap):
    stride: int

    def pairs(self, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
        ib = np.arange(n_b, dtype=np.int64)
        return (ib // self.stride) % n_a, ib

    def check(self, n_a: int, n_b: int) -> str | None:
        if self.stride <= 0 or n_b % (n_a * self.stride) != 0:
            return f"digit map (stride {self.stride}) between sizes {n_a} and {n_b}"
        return None


@dataclass(frozen=True)
class GroupTie(IndexMap):
    groups: int

    def pairs(self, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
        per_a, per_b = n_a // self.groups, n_b // self.groups
        ia = np.arange(n_a, dtype=np.int64)
        ib = np.arange(n_b, dtype=np.int64)
        # each a-index joins the first b-index of its group, each b-index the first a-index
        return (
            np.concatenate([ia, (ib // per_b) * per_a]),
            np.concatenate([(ia // per_a) * per_b, ib]),
        )

    def check(self, n_a: int, n_b: int) -> str | None:
        if self.groups <= 0 or n_a % self.groups or n_b % self.groups:
            return f"{self.groups} groups do not divide sizes {n_a} and {n_b}"
        return None


@dataclass(frozen=True)
class Modulo(IndexMap):
    """``a[i] <-> b[i % period]``: ties every ``period``-th index (the same position in each
    conv group) when pruning grouped convolutions position by position."""

    period: int

    def pairs(self, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
        ia = np.arange(n_a, dtype=np.int64)
        return ia, ia % self.period

    def check(self, n_a: int, n_b: int) -> str | None:
        if self.period <= 0 or n_a % self.period or n_b < self.period:
            return f"modulo map (period {self.period}) between sizes {n_a} and {n_b}"
        return None


IDENTITY = Identity()


@dataclass(frozen=True)
class SharedDigit(IndexMap):
    """``a[i] <-> b[j]`` when ``(i // stride_a) % size == (j // stride_b) % size``: a factor of
    ``size`` that both merged axes contain, at different places. ``[S, B, H*D] -> [S, B*H, D]``
    (``torch.nn.functional.multi_head_attention_forward``) moves the heads from the outer
    factor of the width (stride ``D``) to the inner factor of ``B*H`` (stride 1): a head owns
    ``D`` consecutive features on one side and every ``H``-th row on the other."""

    size: int
    stride_a: int
    stride_b: int

    def pairs(self, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
        ia = np.arange(n_a, dtype=np.int64)
        ib = np.arange(n_b, dtype=np.int64)
        da = (ia // self.stride_a) % self.size
        db = (ib // self.stride_b) % self.size
        # every index joins the first index of the other side that holds its digit
        return np.concatenate([ia, db * self.stride_a]), np.concatenate([da * self.stride_b, ib])

    def check(self, n_a: int, n_b: int) -> str | None:
        if min(self.size, self.stride_a, self.stride_b) <= 0 or n_a % (self.size * self.stride_a) \
                or n_b % (self.size * self.stride_b):
            return (f"shared digit of {self.size} (strides {self.stride_a}, {self.stride_b}) between sizes "
                    f"{n_a} and {n_b}")
        return None
