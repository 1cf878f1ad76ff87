"""The spatial floor: uniform average pooling of the feature layer's patch grid to ``keep`` cells.

Cells tile the grid row by row (:func:`pool_layout`): an even grid of cells where ``keep`` factors into
one as square as the patch grid (within 2× of its aspect), else as many cell rows as a square-ish
tiling needs, the first rows holding one cell more. On two-stage families each crop, frame or Qwen
temporal slice is pooled to its own share over the units it may keep (the eligible rectangle of a
LLaVA-NeXT crop); a cell stands at the place of its centre unit.
"""

from __future__ import annotations

import math

import torch

from flowcut.core.encoder_stage import EncoderStageOutput
from flowcut.methods import (
    EncoderCall,
    Method,
    MethodOutput,
    UnitCall,
    kept_units_output,
    register,
    run_to_feature_layer,
    run_units_to_feature_layer,
    unpruned_trace,
)


def pool_grid(keep: int, grid_size: tuple[int, int]) -> tuple[int, int]:
    """The cell grid (rows, columns) with exactly ``keep`` cells whose shape is closest to the patch grid's.

    For a 24×24 grid: 192 → 12×16, 128 → 8×16, 64 → 8×8, 32 → 4×8 (ties go to fewer rows).
    """
    rows, columns = grid_size
    shapes = _even_shapes(keep, grid_size)
    if not shapes:
        raise ValueError(f"keep={keep} cells do not fit a {rows}×{columns} patch grid")
    aspect = math.log(rows / columns)
    return min(shapes, key=lambda shape: (_aspect_gap(shape, aspect), shape[0]))


def _even_shapes(keep: int, grid_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Every (rows, columns) cell grid of exactly ``keep`` cells that fits the patch grid."""
    rows, columns = grid_size
    return [(h, keep // h) for h in range(1, rows + 1) if keep % h == 0 and keep // h <= columns]


def _aspect_gap(shape: tuple[int, int], aspect: float) -> float:
    return round(abs(math.log(shape[0] / shape[1]) - aspect), 9)


def pool_layout(keep: int, grid_size: tuple[int, int]) -> tuple[int, ...]:
    """Cells per cell row, top to bottom: exactly ``keep`` cells tiling a ``grid_size`` patch grid.

    :func:`pool_grid`'s even grid where its aspect is within 2× of the patch grid's (24×24: 192 → 16
    cells in each of 12 rows); otherwise ``round(sqrt(keep · rows / columns))`` cell rows, the first
    ``keep mod rows`` holding one cell more (24×24: 23 → 5, 5, 5, 4, 4 instead of a 1×23 strip).
    """
    rows, columns = grid_size
    if not 0 < keep <= rows * columns:
        raise ValueError(f"keep={keep} cells do not fit a {rows}×{columns} patch grid")
    if _even_shapes(keep, grid_size):
        shape = pool_grid(keep, grid_size)
        if _aspect_gap(shape, math.log(rows / columns)) <= round(math.log(2), 9):
            return (shape[1],) * shape[0]
    cell_rows = min(rows, keep, max(-(-keep // columns), round(math.sqrt(keep * rows / columns))))
    cells, extra = divmod(keep, cell_rows)
    return tuple(cells + (row < extra) for row in range(cell_rows))


def _cell_bounds(size: int, cells: int, cell: int) -> tuple[int, int]:
    """The patch range of one cell, as ``adaptive_avg_pool2d`` takes it (floor start, ceil end)."""
    return (cell * size) // cells, -((-(cell + 1) * size) // cells)


def cell_centres(grid_size: tuple[int, int], cells: tuple[int, int]) -> torch.Tensor:
    """Row-major index of the patch at the centre of each cell (the cell's place in traces)."""
    return layout_centres(grid_size, (cells[1],) * cells[0])


def layout_centres(grid_size: tuple[int, int], layout: tuple[int, ...]) -> torch.Tensor:
    """:func:`cell_centres` of the cells of :func:`pool_layout` (cells per cell row)."""
    rows, columns = grid_size
    centres = []
    for row, count in enumerate(layout):
        top, bottom = _cell_bounds(rows, len(layout), row)
        for column in range(count):
            left, right = _cell_bounds(columns, count, column)
            centres.append(((top + bottom - 1) // 2) * columns + (left + right - 1) // 2)
    return torch.tensor(centres)


def pool_patches(patches: torch.Tensor, grid_size: tuple[int, int], cells: tuple[int, int]) -> torch.Tensor:
    """``(B, N, D)`` row-major patches averaged over cells: ``(B, cells, D)``, row-major.

    Cells are ``adaptive_avg_pool2d``'s windows: uniform where the grid divides evenly, otherwise
    neighbouring cells share a row or column of patches (e.g. 8×16 cells on a 24×24 grid).
    """
    batch, _, dim = patches.shape
    as_grid = patches.transpose(1, 2).reshape(batch, dim, *grid_size)
    return torch.nn.functional.adaptive_avg_pool2d(as_grid, cells).flatten(2).transpose(1, 2)


def pool_by_layout(patches: torch.Tensor, grid_size: tuple[int, int], layout: tuple[int, ...]) -> torch.Tensor:
    """``(B, N, D)`` row-major patches averaged over the cells of :func:`pool_layout`: ``(B, sum(layout), D)``."""
    if len(set(layout)) == 1:
        return pool_patches(patches, grid_size, (len(layout), layout[0]))
    rows, columns = grid_size
    as_grid = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], rows, columns)
    pooled = []
    for row, count in enumerate(layout):
        top, bottom = _cell_bounds(rows, len(layout), row)
        band = torch.nn.functional.adaptive_avg_pool2d(as_grid[:, :, top:bottom], (1, count))
        pooled.append(band.flatten(2).transpose(1, 2))
    return torch.cat(pooled, dim=1)


def _eligible_rectangle(mask: torch.Tensor | None, grid_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, rows, columns) of a row's units that may survive; they form one rectangle (unpadding crops)."""
    rows, columns = grid_size
    if mask is None:
        return 0, 0, rows, columns
    grid = mask.cpu()[: rows * columns].view(rows, columns)
    kept_rows, kept_columns = grid.any(1).nonzero().flatten(), grid.any(0).nonzero().flatten()
    top, left = int(kept_rows[0]), int(kept_columns[0])
    height, width = int(kept_rows[-1]) - top + 1, int(kept_columns[-1]) - left + 1
    if int(grid.sum()) != height * width:
        raise ValueError("pool needs each row's eligible units to form one rectangle")
    return top, left, height, width


@register
class Pool(Method):
    name = "pool"
    summary = "uniform spatial average pooling of the feature-layer patch grid to keep cells"

    def run(self, call: EncoderCall) -> MethodOutput:
        hidden_states, _ = run_to_feature_layer(call)
        layout = pool_layout(call.config.keep, call.grid_size)
        pooled = pool_by_layout(hidden_states[:, 1:], call.grid_size, layout)
        centres = layout_centres(call.grid_size, layout)
        return MethodOutput(call.project(pooled), pooled, [unpruned_trace(centres, call) for _ in pooled])

    def select_units(self, call: UnitCall) -> EncoderStageOutput:
        hidden_states, _, _ = run_units_to_feature_layer(call)
        lead = call.encoder.query_slots
        kept, tokens = [], []
        for row, keep in enumerate(call.keeps):
            rows, columns = call.unit_grid(row)
            mask = None if call.eligible is None else call.eligible[row]
            top, left, height, width = _eligible_rectangle(mask, (rows, columns))
            if keep == 0:
                kept.append(torch.zeros(0, dtype=torch.long))
                tokens.append(hidden_states.new_zeros(0, hidden_states.shape[-1]))
                continue
            units = hidden_states[row, lead : lead + rows * columns].view(rows, columns, -1)
            region = units[top : top + height, left : left + width].reshape(1, height * width, -1)
            layout = pool_layout(keep, (height, width))
            tokens.append(pool_by_layout(region, (height, width), layout)[0])
            centres = layout_centres((height, width), layout)
            kept.append((top + centres // width) * columns + left + centres % width)
        return kept_units_output(call, hidden_states, kept, tokens)
