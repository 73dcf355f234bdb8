"""What every table of the seed's API shares (tables/): BlockTableConfig,
and TableBase, the life cycle: a table owns an embedded segment (or uses
one it was given) and one client, claims its rows, closes in close() or at
the end of a with-block, and looks rows up by index the same way.

Thread safety: a table is one client of its segment: one thread at a time.
Errors: BtError subclasses; a call that raised changed nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .._core import Segment, SlotParams
from .._errors import make_error
from .. import _lib
from .._lib import count

if TYPE_CHECKING:
    from .._core import Client
    from .._types import SegmentConfig

_T = TypeVar("_T", bound="TableBase")

__all__ = ["BlockTableConfig", "TableBase"]


@dataclass(frozen=True)
class BlockTableConfig:
    """Configuration of a BlockTable (the seed's fields and defaults).

    Validated at construction (ConfigError, a ValueError): sizes positive,
    kernel_block_size divides block_size, cp_kv_cache_interleave_size >= 1.
    pin_memory and device are kept for the GPU mirror; the table itself
    always lives in host (shared) memory.
    """
    block_size: int = 16
    kernel_block_size: int = 16
    max_num_reqs: int = 256
    max_num_blocks_per_req: int = 128
    max_num_batched_tokens: int = 8192
    pin_memory: bool = True
    device: str = "cuda"
    cp_kv_cache_interleave_size: int = 1

    def __post_init__(self) -> None:
        for f in ("block_size", "kernel_block_size", "max_num_reqs",
                  "max_num_blocks_per_req", "max_num_batched_tokens",
                  "cp_kv_cache_interleave_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise make_error(_lib.BT_ECONFIG, f"{f} must be a positive int, got {v!r}")
        if self.block_size % self.kernel_block_size:
            raise make_error(_lib.BT_ECONFIG, f"kernel_block_size {self.kernel_block_size} "
                                             f"does not divide block_size {self.block_size}")

    @property
    def blocks_per_kv_block(self) -> int:
        """Kernel blocks per KV block (B / K)."""
        return self.block_size // self.kernel_block_size

    @property
    def row_width(self) -> int:
        """Entries per row: max_num_blocks_per_req kernel-expanded."""
        return self.max_num_blocks_per_req * self.blocks_per_kv_block


class TableBase:
    """The life cycle every table shares. A subclass calls ``_open(cfg,
    ...)`` (an embedded segment of SegmentConfig cfg, one client, rows 0..R-1
    claimed with key = row) or sets ``segment`` / ``_client`` itself and
    ``_own_segment`` False for a segment it was given; ``max_num_reqs`` bounds
    ``_row``. ``close()`` closes the client, and the segment if the table
    opened it; idempotent."""

    segment: Segment = None  # type: ignore[assignment]  # set by _open or the subclass
    _client: Client = None  # type: ignore[assignment]
    _own_segment = False
    max_num_reqs: int

    def _open(self, cfg: SegmentConfig, *, raw: bool = False, paged: bool = False,
              slot_block_size: int | None = None) -> None:
        """An embedded segment with SegmentConfig cfg, this table's client,
        and every row claimed (key = row index); views num_blocks /
        num_tokens; slot parameters for slot_block_size (default cfg's)."""
        self.segment = Segment.create(None, cfg)
        self._own_segment = True
        try:
            self._client = self.segment.client()
            for row in range(cfg.num_rows):
                self._client.claim_row(key=row, row=row, raw=raw, paged=paged)
        except BaseException:
            self.segment.close()
            raise
        self.num_blocks, self.num_tokens = self.segment.num_blocks, self.segment.num_tokens
        self._params = SlotParams(block_size=slot_block_size or cfg.block_size)

    def close(self) -> None:
        """Close the client (its rows and blocks go back) and the segment if
        this table opened it (views made from it stay valid). Idempotent."""
        if self._client is not None:
            self._client.close()
        if self._own_segment and self.segment is not None:
            self.segment.close()

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _row(self, row_idx: int) -> int:
        """row_idx as an int in [0, max_num_reqs): InvalidArgument for a
        non-integer, OutOfRange outside."""
        r = count(row_idx, "row_idx")
        if r >= self.max_num_reqs:
            raise make_error(_lib.BT_ERANGE, f"row_idx {r} not in [0, {self.max_num_reqs})")
        return r
