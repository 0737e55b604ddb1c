"""The one tuning value of the Triton backend.

Every launch setting lives in a frozen :class:`Tuning`; the launcher takes it as an
argument (``tuning=``), it is part of every plan and graph cache key, and nothing in the
backend reads module globals or environment variables to decide how to run. Tests force a
path by passing a tuning (``Tuning(path="data")``), never by patching module state.

Every setting changes how the work is split, never the result: all paths give the same
bits (the reference in :mod:`dgp_kernels.ops.reference` is the oracle).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

PATHS = ("auto", "sampled", "candidates", "data")


@dataclass(frozen=True)
class Tuning:
    """How a call is split into launches (the defaults are :data:`DEFAULT`).

    * ``path``: ``"auto"`` (the sampled path for float32/float16/bfloat16 calls of at
      least ``sampled_min_total`` elements, else the exact path, candidates or data by the
      size of the boundary buckets), or one path forced: ``"sampled"`` (any dtype),
      ``"candidates"`` (exact first-digit histogram, refinement over a candidate buffer),
      ``"data"`` (exact histogram, refinement over the data).
    * ``block``: entries per program of the two full passes (gather, write); at most 2048
      (per-block counts are packed in 12-bit fields).
    * ``num_warps``: warps per program of the data passes and histograms.
    * ``tile`` / ``chunk_tiles``: entries per step / steps per program of the histogram
      passes (one atomic per non-empty bin per program, not per entry).
    * ``cand_chunk_tiles``: steps per program over the candidate buffers (small, so that a
      few million candidates spread over enough programs to fill the GPU).
    * ``sample``: sampled entries per layer (whole layers up to that size);
      ``sample_split``: programs per layer that share the sample; ``sample_sigmas`` /
      ``sample_slack``: margin of the boundary key ranges around the sample's estimate, in
      binomial standard deviations plus ranks; ``fine_bits``: the ranges' resolution below
      a first digit (2^-fine_bits of it; 0: whole first digits).
    * ``sampled_min_total``: elements per call from which ``"auto"`` samples.
    * ``cand_min`` / ``cand_fraction``: the exact path uses a candidate buffer while the
      boundary buckets hold at most ``max(cand_min, n / cand_fraction)`` entries; the
      sampled path's candidate slot of a layer is ``max(sample, n / cand_fraction)``.
    * ``tail_min``: keys of a layer that the last refinement step handles in one program
      (at least this many, or n / 1024 for larger layers); a layer whose boundary buckets
      hold more (many ties) is rerun on the exact path.
    * ``lookback``: predecessor blocks the write pass reads per step of its prefix scan.
    """

    # (typed field declarations: the duplicate report pairs their shape)
    path: str = "auto"
    block: int = 2048
    num_warps: int = 8
    tile: int = 2048
    chunk_tiles: int = 32
    cand_chunk_tiles: int = 4
    sample: int = 1 << 14
    sample_split: int = 8
    sample_sigmas: float = 5.0
    sample_slack: int = 8
    fine_bits: int = 3
    sampled_min_total: int = 0
    cand_min: int = 1 << 16
    cand_fraction: int = 4
    tail_min: int = 1 << 14
    lookback: int = 32

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"Tuning.path must be one of {PATHS}, got {self.path!r}")
        pow2 = {"block": self.block, "tile": self.tile, "lookback": self.lookback}
        for name, value in pow2.items():
            if value < 16 or value & (value - 1):
                raise ValueError(f"Tuning.{name} must be a power of two >= 16, got {value}")
        if self.block > 2048:
            raise ValueError(f"Tuning.block must be at most 2048 (12-bit block counts), "
                             f"got {self.block}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"Tuning.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        for name in ("chunk_tiles", "cand_chunk_tiles", "sample", "sample_split",
                     "cand_fraction", "tail_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"Tuning.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.fine_bits <= 4:
            raise ValueError(f"Tuning.fine_bits must be in [0, 4], got {self.fine_bits}")
        if self.sample_sigmas < 0 or self.sample_slack < 0:
            raise ValueError("Tuning.sample_sigmas and sample_slack must be >= 0")

    @property
    def chunk(self) -> int:
        return self.tile * self.chunk_tiles

    @property
    def cand_chunk(self) -> int:
        return self.tile * self.cand_chunk_tiles

    def replace(self, **changes) -> "Tuning":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return replace(self, **changes)


DEFAULT = Tuning()
