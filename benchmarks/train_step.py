"""Seconds per training step of DigitCNN (batch 64, SGD) on the CPU, measured in alternating rounds in
one process: contiguous (NCHW) against channels-last memory layout, the earlier layer order
(conv -> BatchNorm -> ReLU -> pool) against the recipe's (conv -> pool -> BatchNorm -> ReLU), and
the recipe with and without its hidden layer.

  python -m ferry.bench.train_step [--steps 40] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time


def step_times(*, steps: int, rounds: int, batch_size: int = 64) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from ferry.bench.harness import percentile
    from ferry.models.digit_cnn import DigitCNN

    torch.manual_seed(0)
    x = torch.randn(batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (batch_size,))
    setups = {}
    for layout, fmt, pool_first, hidden in (("contiguous", torch.contiguous_format, False, 256),
                                            ("channels_last", torch.channels_last, False, 256),
                                            ("channels_last_pool_first", torch.channels_last, True, 256),
                                            ("channels_last_pool_first_no_hidden", torch.channels_last, True, 0)):
        model = DigitCNN(pool_first=pool_first, hidden=hidden).to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        setups[layout] = (model, opt, x.contiguous(memory_format=fmt))
    times: dict[str, list[float]] = {k: [] for k in setups}

    def step(layout: str) -> None:
        model, opt, xb = setups[layout]
        loss = F.cross_entropy(model(xb), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for layout in setups:  # warm-up
        for _ in range(5):
            step(layout)
    for _ in range(rounds):
        for layout in setups:
            for _ in range(steps):
                t0 = time.perf_counter()
                step(layout)
                times[layout].append(time.perf_counter() - t0)
    return {layout: 1e3 * percentile(ts, 50) for layout, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import torch

    from ferry.models.digit_cnn import DigitCNN

    ms = step_times(steps=args.steps, rounds=args.rounds)
    print(f"{DigitCNN().architecture()} training step, batch 64, {torch.get_num_threads()} threads, median ms:")
    for layout, v in ms.items():
        print(f"  {layout:<34} {v:7.2f} ms")
    print(f"  channels-last speed-up: {ms['contiguous'] / ms['channels_last']:.2f}x (conv -> BatchNorm -> ReLU -> pool)")
    print(f"  pooling before BatchNorm and ReLU, channels-last: {ms['channels_last'] / ms['channels_last_pool_first']:.2f}x faster")
    print(f"  the hidden layer (256 units) costs {ms['channels_last_pool_first'] / ms['channels_last_pool_first_no_hidden']:.2f}x "
          "(the recipe against the same without it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
