"""Scoring visual tokens inside the language model from the last prompt token (pure math, no model code).

Used by pruning at a decoder layer: FastV ranks visual tokens by the attention they receive from
the last prompt token; FlowCut's language-model stage (SPEC §3) scores them by the last token's
relation and semantic views times the value norm. Shapes: ``B`` rows, ``H`` query heads, ``L``
prompt positions, ``d`` head dim. Key and value heads are repeated to the query heads (GQA).
"""

from __future__ import annotations

import torch

from flowcut.core.scoring import row_logits, score_dtype

SCORES = ("attention", "flowcut")
"""``"attention"``: attention received from the last token (FastV); ``"flowcut"``: SPEC §3's score."""


def last_real_positions(visible: torch.Tensor) -> torch.Tensor:
    """Each row's last real position under a ``(B, L)`` mask of real tokens (left or right padding): ``(B,)``."""
    return visible.shape[1] - 1 - visible.flip(1).int().argmax(1)


def _per_query_head(states: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat ``(B, H_kv, L, d)`` key/value heads to ``heads`` query heads."""
    return states.repeat_interleave(heads // states.shape[1], dim=1)


def _head_mean_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax over the allowed positions: ``(B, H, L), (B, L) -> (B, L)``."""
    return logits.masked_fill(~allowed[:, None, :], float("-inf")).softmax(dim=-1).mean(dim=1)


def last_token_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    last_index: torch.Tensor,
    visible: torch.Tensor,
    visual: torch.Tensor,
    score: str = "attention",
) -> torch.Tensor:
    """Per position, the score of each visual token seen from the row's last prompt token; -inf elsewhere.

    ``query`` ``(B, H, L, d)`` and ``key``/``value`` ``(B, H_kv, L, d)`` are one decoder layer's own
    (post-rotary) projections; ``last_index`` ``(B,)`` the last real position of each row;
    ``visible`` ``(B, L)`` the real (non-padding) positions; ``visual`` ``(B, L)`` the visual tokens.
    """
    if score not in SCORES:
        raise ValueError(f"unknown language-model score {score!r}; available: {', '.join(SCORES)}")
    dtype = score_dtype(query.dtype)
    heads = query.shape[1]
    rows = torch.arange(query.shape[0], device=query.device)
    last_query = query[rows, :, last_index].to(dtype)  # (B, H, d)
    keys = _per_query_head(key, heads).to(dtype)
    values = _per_query_head(value, heads).to(dtype)
    relation_logits = row_logits(last_query, keys) * scaling
    if score == "attention":
        # The layer's real attention probabilities: softmax over every key the last token sees.
        received = _head_mean_softmax(relation_logits, visible)
        return received.masked_fill(~visual, float("-inf"))
    visual_keys = visual & visible
    relation = _head_mean_softmax(relation_logits, visual_keys)
    last_value = values[rows, :, last_index]
    semantic = _head_mean_softmax(row_logits(last_value, values) * scaling, visual_keys)
    density = values.mean(dim=1).abs().sum(dim=-1)
    combined = (relation / relation.sum(-1, keepdim=True) + semantic / semantic.sum(-1, keepdim=True)) * density
    return combined.masked_fill(~visual_keys, float("-inf"))


def uniform_budgets(visual: torch.Tensor, tokens_per_image: int, keep: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per row, the image lengths and budgets when every image has ``tokens_per_image`` visual tokens."""
    lengths, keeps = [], []
    for row_visual in visual:
        count = int(row_visual.sum())
        if count % tokens_per_image:
            raise ValueError(f"a row holds {count} visual tokens, not a multiple of {tokens_per_image} per image")
        lengths.append([tokens_per_image] * (count // tokens_per_image))
        keeps.append([keep] * (count // tokens_per_image))
    return lengths, keeps


def media_budgets(
    input_ids: torch.Tensor, visual: torch.Tensor, media: dict[int, tuple[list[int], list[int]]]
) -> tuple[list[list[int]], list[list[int]], list[tuple[int, int]]]:
    """Per row, its media items' lengths and budgets, for prompts that may hold images and videos.

    ``media`` maps each kind's placeholder token id to its items' lengths and budgets, items of a kind
    in batch order. Items may differ in length (dynamic resolution, anyres crops) and rows may hold
    any number of them, none included; each row's visual tokens must be exactly its items' tokens.
    Each row's visual tokens are walked in order; a run of a kind's token is that kind's next item.
    Returns the rows' lengths and budgets in order of appearance, and the order itself as
    ``(token id, item index)`` pairs.
    """
    taken = dict.fromkeys(media, 0)
    row_lengths, row_keeps, order = [], [], []
    for row_ids, row_visual in zip(input_ids.tolist(), visual.tolist(), strict=True):
        tokens = [token for token, is_visual in zip(row_ids, row_visual, strict=True) if is_visual]
        lengths, keeps, position = [], [], 0
        while position < len(tokens):
            token = tokens[position]
            if token not in media or taken[token] >= len(media[token][0]):
                raise ValueError(f"the prompts hold more placeholders of token {token} than their media have")
            length, keep = media[token][0][taken[token]], media[token][1][taken[token]]
            if tokens[position : position + length] != [token] * length:
                raise ValueError(f"a run of token {token} does not hold its item's {length} placeholders")
            lengths.append(length)
            keeps.append(keep)
            order.append((token, taken[token]))
            taken[token] += 1
            position += length
        row_lengths.append(lengths)
        row_keeps.append(keeps)
    for token, (lengths, _) in media.items():
        if taken[token] != len(lengths):
            raise ValueError(
                f"the prompts hold placeholders of token {token} for {taken[token]} items, not {len(lengths)}"
            )
    return row_lengths, row_keeps, order


def kept_per_image(
    positions: torch.Tensor, visual: torch.Tensor, filler: torch.Tensor | None, image_lengths: list[list[int]]
) -> list[torch.Tensor]:
    """Per image (batch order), a mask over its visual tokens of those that continue past the pruning layer.

    ``positions``/``filler`` are :func:`kept_positions`' output (fillers do not continue);
    ``image_lengths`` the rows' image lengths, as for :func:`kept_positions`.
    """
    masks = []
    for b, (row_positions, row_visual) in enumerate(zip(positions, visual, strict=True)):
        kept = torch.zeros_like(row_visual)
        kept[row_positions if filler is None else row_positions[~filler[b]]] = True
        masks.extend(kept[span] for span in row_visual.nonzero().squeeze(1).split(image_lengths[b]))
    return masks


def kept_positions(
    scores: torch.Tensor, visual: torch.Tensor, image_lengths: list[list[int]], keeps: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions that continue past the pruning layer: every non-visual one and each image's top ``keep``.

    Row ``b``'s visual tokens are its images' tokens in order, ``image_lengths[b]`` of them per image;
    ``keeps[b]`` are the images' budgets. Returns ``(B, L')`` ascending positions and, when rows keep
    different numbers of tokens, a ``(B, L')`` mask of *filler* positions: pruned visual tokens that
    pad a shorter row to the batch's length and that no later token may attend to (None otherwise).
    """
    rows, dropped = [], []
    for row_scores, row_visual, lengths, row_keeps in zip(scores, visual, image_lengths, keeps, strict=True):
        positions = row_visual.nonzero().squeeze(1)
        if sum(lengths) != len(positions):
            raise ValueError(f"a row holds {len(positions)} visual tokens, but its images have {sum(lengths)}")
        keep_mask = ~row_visual
        for image, keep in zip(positions.split(lengths), row_keeps, strict=True):
            chosen = row_scores[image].topk(min(keep, len(image))).indices
            keep_mask[image[chosen]] = True
        rows.append(keep_mask.nonzero().squeeze(1))
        dropped.append((row_visual & ~keep_mask).nonzero().squeeze(1))
    width = max(len(row) for row in rows)
    if all(len(row) == width for row in rows):
        return torch.stack(rows), None
    # A row that dropped more tokens than others always has enough dropped tokens to pad with.
    padded, fillers = [], []
    for row, row_dropped in zip(rows, dropped, strict=True):
        extra = row_dropped[: width - len(row)]
        order = torch.cat([row, extra]).sort()
        padded.append(order.values)
        is_filler = torch.cat([torch.zeros_like(row, dtype=torch.bool), torch.ones_like(extra, dtype=torch.bool)])
        fillers.append(is_filler[order.indices])
    return torch.stack(padded), torch.stack(fillers)


def kept_visual_rows(
    visual: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values given per visual token, for the tokens that continue past the pruning layer.

    ``rows`` holds one row per visual token of the ``(B, L)`` mask ``visual``, in row-major order
    (Qwen3-VL's DeepStack features); ``positions`` (``(B, L')``, from :func:`kept_positions`) are the
    positions later layers hold. Returns their ``(B, L')`` visual mask and the rows of their visual
    tokens, in the same row-major order.
    """
    rank = visual.flatten().long().cumsum(0).view_as(visual) - 1
    kept_visual = visual.gather(1, positions)
    return kept_visual, rows[rank.gather(1, positions)[kept_visual]]
