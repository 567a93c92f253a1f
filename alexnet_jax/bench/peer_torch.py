"""PyTorch peer for the speed benchmark: the same training step, in PyTorch, on the CPU.

What it measures: one SGD training step of the paper's network (forward, cross-entropy loss,
backward, and the update with momentum 0.9 and weight decay 0.0005, which torch.optim.SGD also
applies to the biases) on random images that stay in memory, so neither decoding nor copying is
timed. The network is the paper's: conv1-conv5 at 96/256/384/384/256 channels, conv2, conv4
and conv5 split into the two columns (`groups=2`), LRN after conv1 and conv2, overlapping 3x3/2
pooling, FC 4096-4096-1000 with dropout 0.5 (dropped at the inputs of fc6 and fc7, as
torchvision places it). Two steps are run untimed,
then --steps timed ones; the median is reported as milliseconds per step and images/second.

It is a separate process on purpose: torch is imported here only, and this package never needs
it. The benchmark runs it right after its own step and prints our ratio to it:

  python -m alexnet_jax.bench.benchmark --peer=alexnet_jax/bench/peer_torch.py

or by hand (pip install torch first; the CPU build is enough):

  python alexnet_jax/bench/peer_torch.py --batch=128                       # float32, NCHW
  python alexnet_jax/bench/peer_torch.py --batch=128 --channels-last --bf16  # bfloat16 autocast
  python alexnet_jax/bench/peer_torch.py --json     # also one JSON line, last, for scripts

The benchmark calls it with `--batch N --steps S --json`, then again with `--channels-last
--bf16` added, and reads the last line of its output (keys: peer, batch, bf16, channels_last,
lrn, step_ms, train_images_per_sec). Compare it with our step in the same command, as a ratio:
absolute figures move between runs on a shared machine.

PyTorch's LocalResponseNorm divides alpha by the window size n, so the paper's alpha = 1e-4
(§3.3, docs/paper.md) is given to it as 5 * 1e-4. Its one LRN spans all channels of a layer
(the peer's columns exist only in the grouped convolutions).
"""

import argparse
import json
import statistics
import time

# The paper's constants (docs/paper.md, §3.3 and §5).
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
NUM_CLASSES = 1000
UNTIMED_STEPS = 2


def build_network(torch, lrn: bool, columns: int = 2):
  """The paper's AlexNet as one torch.nn.Sequential (inputs [N, 3, 224, 224])."""
  nn = torch.nn

  def norm():
    # torch computes k + (alpha / n) * sum(a^2); passing alpha * n gives §3.3's formula.
    return [nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA,
                                 k=LRN_K)] if lrn else []

  def pool():
    return [nn.MaxPool2d(kernel_size=3, stride=2)]

  def conv(c_in, c_out, kernel, padding, stride=1, groups=1):
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups),
            nn.ReLU(inplace=True)]

  def fc(n_in, n_out, hidden=True):
    return ([nn.Dropout(p=0.5), nn.Linear(n_in, n_out), nn.ReLU(inplace=True)] if hidden
            else [nn.Linear(n_in, n_out)])

  # conv1: 11x11/4 with 2 pixels of padding on every side turns 224 into 55 (docs/paper.md, §3).
  layers = (conv(3, 96, 11, padding=2, stride=4) + norm() + pool() +
            conv(96, 256, 5, padding=2, groups=columns) + norm() + pool() +
            conv(256, 384, 3, padding=1) +
            conv(384, 384, 3, padding=1, groups=columns) +
            conv(384, 256, 3, padding=1, groups=columns) + pool() +
            [nn.Flatten()] +
            fc(256 * 6 * 6, 4096) + fc(4096, 4096) + fc(4096, NUM_CLASSES, hidden=False))
  return nn.Sequential(*layers)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--batch', type=int, default=128, help='Images per step.')
  parser.add_argument('--size', type=int, default=224, help='Image height and width.')
  parser.add_argument('--steps', type=int, default=5, help='Timed steps (median reported).')
  parser.add_argument('--bf16', action='store_true',
                      help='Compute forward and loss under bfloat16 autocast.')
  parser.add_argument('--channels-last', action='store_true',
                      help='Model and images in channels-last (NHWC) memory format.')
  parser.add_argument('--lrn', type=int, choices=(0, 1), default=1,
                      help='1: LRN after conv1 and conv2 (the paper); 0: none.')
  parser.add_argument('--json', action='store_true', help='Also print one JSON line, last.')
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1:
    parser.error('--batch and --steps must be at least 1')
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top  (only this process needs torch)

  torch.manual_seed(0)
  model = build_network(torch, lrn=bool(args.lrn))
  images = torch.randn(args.batch, 3, args.size, args.size)
  labels = torch.randint(0, NUM_CLASSES, (args.batch,))
  if args.channels_last:
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY)
  loss_fn = torch.nn.CrossEntropyLoss()

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.bf16):
      loss = loss_fn(model(images), labels)
    loss.backward()
    optimizer.step()

  for _ in range(UNTIMED_STEPS):
    train_step()
  seconds = []
  for _ in range(args.steps):
    start = time.perf_counter()
    train_step()
    seconds.append(time.perf_counter() - start)
  median = statistics.median_high(seconds)

  record = {'peer': 'torch', 'batch': args.batch, 'bf16': args.bf16,
            'channels_last': args.channels_last, 'lrn': args.lrn, 'step_ms': median * 1e3,
            'train_images_per_sec': args.batch / median}
  print(f'torch {torch.__version__} AlexNet train step: batch={args.batch} bf16={args.bf16} '
        f'channels_last={args.channels_last} lrn={args.lrn}: median of {args.steps} steps '
        f'{record["step_ms"]:.0f} ms, {record["train_images_per_sec"]:.1f} images/s',
        flush=True)
  if args.json:
    print(json.dumps(record), flush=True)


if __name__ == '__main__':
  main()
