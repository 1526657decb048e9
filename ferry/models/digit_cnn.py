"""DigitCNN: the seed's three-conv MNIST classifier, with batch norm, a hidden layer and dropout added."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class DigitCNN(nn.Module):
    """Three 3x3 conv layers (1 input channel), each followed by 2x2 max-pooling (28 -> 14 -> 7 -> 3),
    BatchNorm and ReLU, then a hidden fully connected layer (`hidden` units and ReLU; 0: none),
    dropout and a linear classifier to 10 logits.

    Compared with the seed, `batch_norm`, `hidden` and `dropout` are additions; `channels` is the
    width of each conv layer. Pooling comes before BatchNorm and ReLU: ReLU and max-pooling commute,
    so without BatchNorm this is exactly the seed's conv -> ReLU -> pool, and BatchNorm and ReLU (and
    their gradients) run on a quarter of the pixels, which makes a training step faster on a CPU
    (docs: "Training recipe"). `pool_first=False` builds the earlier order (conv -> BatchNorm ->
    ReLU -> pool), kept for that comparison (`ferry.bench.train_step`) and for export
    (`inference_order`).
    """

    # Fields of a saved training config that shape the network, and what a config written before a
    # field existed was trained with (checkpoints without `hidden` had no hidden layer).
    CONFIG_KEYS = ("channels", "dropout", "hidden")
    ABSENT_MEANS = {"hidden": 0}

    @classmethod
    def from_config(cls, config: dict) -> DigitCNN:
        """The network a saved training config describes (`channels`, `dropout`, `hidden`)."""
        cfg = {**cls.ABSENT_MEANS, **{k: v for k, v in config.items() if k in cls.CONFIG_KEYS}}
        if "channels" in cfg:
            cfg["channels"] = tuple(cfg["channels"])
        return cls(**cfg)

    def __init__(
        self,
        *,
        channels: Sequence[int] = (32, 64, 128),
        batch_norm: bool = True,
        dropout: float = 0.25,
        num_classes: int = 10,
        pool_first: bool = True,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        self.channels, self.batch_norm, self.dropout_p = tuple(channels), batch_norm, dropout
        self.num_classes, self.pool_first, self.hidden = num_classes, pool_first, hidden
        if len(channels) != 3:
            raise ValueError(f"DigitCNN has exactly 3 conv layers; got channels={list(channels)}")
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in channels:
            norm_relu = [nn.BatchNorm2d(c_out)] if batch_norm else []
            norm_relu.append(nn.ReLU(inplace=True))
            conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not batch_norm)
            layers += [conv, nn.MaxPool2d(2), *norm_relu] if pool_first else [conv, *norm_relu, nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        if hidden:
            head += [nn.Linear(c_in * 3 * 3, hidden), nn.ReLU(inplace=True)]
        head += [nn.Dropout(dropout), nn.Linear(hidden or c_in * 3 * 3, num_classes)]
        self.classifier = nn.Sequential(*head)

    def architecture(self) -> str:
        """A one-line name of this network's shape, e.g. "DigitCNN[32, 64, 128], hidden 256" (logs, metadata)."""
        return f"DigitCNN{list(self.channels)}" + (f", hidden {self.hidden}" if self.hidden else ", no hidden layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 1, 28, 28) normalized images -> (N, 10) logits."""
        return self.classifier(self.features(x))

    def inference_order(self) -> DigitCNN:
        """The same network with each BatchNorm and ReLU moved before its pooling (conv -> BatchNorm ->
        ReLU -> pool): the layout onnxruntime folds into one fused convolution in fp32 and int8 (the
        BatchNorm into the weights, the ReLU into the kernel), so the exported model runs as fast as
        before the training-speed reorder. Exact when every BatchNorm scale is positive (weight /
        sqrt(var + eps) > 0): a per-channel increasing affine map and ReLU commute with max-pooling.
        Returns `self` when a scale is not positive, or when there is nothing to move."""
        if not (self.pool_first and self.batch_norm):
            return self
        norms = [m for m in self.features if isinstance(m, nn.BatchNorm2d)]
        if any(bool((bn.weight <= 0).any()) for bn in norms):
            return self
        other = DigitCNN(channels=self.channels, dropout=self.dropout_p, num_classes=self.num_classes,
                         pool_first=False, hidden=self.hidden)
        weighted = (nn.Conv2d, nn.BatchNorm2d)
        for src, dst in zip([m for m in self.features if isinstance(m, weighted)],
                            [m for m in other.features if isinstance(m, weighted)], strict=True):
            dst.load_state_dict(src.state_dict())
        other.classifier.load_state_dict(self.classifier.state_dict())
        return other.train(self.training)
