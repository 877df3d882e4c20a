"""What one forward pass of a generation gives: probabilities, logits, embedding, stage rows.

`Heads` is the computation every runtime shares: the torch runtime calls it
(`inference`), the ONNX export traces it (`onnx_export`), and the nearest-
neighbour score reads its pooled stage rows (`neighbours`). It lives below all
three so none of them imports another for it.
"""
from __future__ import annotations

import torch

STAGE = -2  # the stage whose pooled map the knn score uses: the one before the last


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (float32)."""
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def pooled(stage_map: torch.Tensor) -> torch.Tensor:
    """A (n, C, h, w) map as unit-length rows of its channel means and maxima."""
    return unit(torch.cat([stage_map.mean(dim=(2, 3)), stage_map.amax(dim=(2, 3))], dim=1))


def features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In one pass: the model's final feature map and the pooled rows of STAGE."""
    final, maps = model.forward_intermediates(x, indices=-STAGE)
    return final, pooled(maps[0])


class Heads(torch.nn.Module):
    """What one forward pass of a generation gives, the same for every runtime.

    The torch runtime calls it; the ONNX export is this module traced, its
    outputs named `onnx_export.OUTPUTS` in this order.

    Args:
        model: the timm model.
        stage: also return the pooled stage features of the knn score
            (`features`); without them the pass skips `forward_intermediates`.

    Returns (from forward):
        (probs, logits, embedding) and, with `stage`, the pooled stage rows:
        probabilities are the float32 softmax of the logits; embedding is the
        pre-logit features.
    """

    def __init__(self, model: torch.nn.Module, stage: bool = True):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.stage:
            final, near = features(self.model, x)
        else:
            final = self.model.forward_features(x)
        emb = self.model.forward_head(final, pre_logits=True)
        logits = self.model.get_classifier()(emb).float()
        probs = logits.softmax(dim=1)
        return (probs, logits, emb, near) if self.stage else (probs, logits, emb)
