"""The spatial floor: uniform average pooling of the feature layer's patch grid to ``keep`` cells."""

from __future__ import annotations

import math

import torch

from flowcut.methods import EncoderCall, Method, MethodOutput, register, run_to_feature_layer, unpruned_trace


def pool_grid(keep: int, grid_size: tuple[int, int]) -> tuple[int, int]:
    """The cell grid (rows, columns) with exactly ``keep`` cells whose shape is closest to the patch grid's.

    For a 24×24 grid: 192 → 12×16, 128 → 8×16, 64 → 8×8, 32 → 4×8 (ties go to fewer rows).
    """
    rows, columns = grid_size
    shapes = [(h, keep // h) for h in range(1, rows + 1) if keep % h == 0 and keep // h <= columns]
    if not shapes:
        raise ValueError(f"keep={keep} cells do not fit a {rows}×{columns} patch grid")
    aspect = math.log(rows / columns)
    return min(shapes, key=lambda shape: (round(abs(math.log(shape[0] / shape[1]) - aspect), 9), shape[0]))


def _cell_bounds(size: int, cells: int, cell: int) -> tuple[int, int]:
    """The patch range of one cell, as ``adaptive_avg_pool2d`` takes it (floor start, ceil end)."""
    return (cell * size) // cells, -((-(cell + 1) * size) // cells)


def cell_centres(grid_size: tuple[int, int], cells: tuple[int, int]) -> torch.Tensor:
    """Row-major index of the patch at the centre of each cell (the cell's place in traces)."""
    (rows, columns), (cell_rows, cell_columns) = grid_size, cells
    centres = []
    for row in range(cell_rows):
        top, bottom = _cell_bounds(rows, cell_rows, row)
        for column in range(cell_columns):
            left, right = _cell_bounds(columns, cell_columns, column)
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


@register
class Pool(Method):
    name = "pool"
    summary = "uniform spatial average pooling of the feature-layer patch grid to keep cells"

    def run(self, call: EncoderCall) -> MethodOutput:
        hidden_states, _ = run_to_feature_layer(call)
        cells = pool_grid(call.config.keep, call.grid_size)
        pooled = pool_patches(hidden_states[:, 1:], call.grid_size, cells)
        centres = cell_centres(call.grid_size, cells)
        return MethodOutput(call.project(pooled), pooled, [unpruned_trace(centres, call) for _ in pooled])
