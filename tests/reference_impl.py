"""An independent, deliberately plain re-implementation of SPEC §2 for one image.

It follows the reference code's structure: every layer computes its full attention matrix
(eager, N×N), all encoder layers run, and the features are read from the feature layer's output.
Used only to check the library's kept indices and features.
"""

from __future__ import annotations

import math

import torch


def _attention_inputs(layer, hidden):
    attention = layer.self_attn
    heads, head_dim = attention.num_heads, attention.head_dim
    normed = layer.layer_norm1(hidden)

    def split(x):
        return x.view(1, -1, heads, head_dim).transpose(1, 2)

    return split(attention.q_proj(normed)), split(attention.k_proj(normed)), split(attention.v_proj(normed))


def reference_flowcut(vision_tower, pixel_values: torch.Tensor, keep: int, feature_entry: int = -2):
    """Return (kept patch indices, feature-layer patch features, per-layer patch counts) for one image."""
    assert pixel_values.shape[0] == 1
    layers = vision_tower.encoder.layers
    num_layers = len(layers)
    feature_layer = (feature_entry % (num_layers + 1)) - 1
    last_prune = feature_layer - 1
    hidden = vision_tower.pre_layrnorm(vision_tower.embeddings(pixel_values))
    indices = torch.arange(hidden.shape[1] - 1)
    cumulative = None
    counts = []
    outputs = []
    for i, layer in enumerate(layers):
        counts.append(hidden.shape[1] - 1)
        q, k, v = _attention_inputs(layer, hidden)
        scale = layer.self_attn.scale
        attention = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # full (1, H, K, K) matrix
        mixed = (attention @ v).transpose(1, 2).reshape(hidden.shape)
        hidden = hidden + layer.self_attn.out_proj(mixed)
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        outputs.append(hidden)
        remaining = last_prune - i
        if hidden.shape[1] - 1 > keep and remaining >= 0:
            relation = attention[0, :, 0, 1:].mean(0)
            semantic = torch.softmax(v[0, :, :1] @ v[0].transpose(-1, -2), dim=-1)[:, 0, 1:].mean(0)
            density = v[0].mean(0)[1:].abs().sum(-1)
            score = (relation / relation.sum() + semantic / semantic.sum()) * density
            cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
            if remaining % 2 == 0:
                n = relation.shape[0]
                if remaining == 0:
                    pruned = n
                else:
                    p = relation / relation.sum()
                    ratio = -(p * torch.log(p)).sum() / math.log(n)
                    pruned = int(torch.round((n - keep) / math.sqrt(remaining) * (1 - ratio**2)))
                new_count = max(n - pruned, keep)
                chosen = torch.topk(cumulative, new_count).indices.sort().values
                hidden = torch.cat([hidden[:, :1], hidden[:, 1:][:, chosen]], dim=1)
                cumulative = cumulative[chosen]
                indices = indices[chosen]
    return indices, outputs[feature_layer][0, 1:], counts[: feature_layer + 1]
