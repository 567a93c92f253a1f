"""Preparation throughput: one process with N threads against the most N workers can give on
the machine at hand.

  python -m alexnet_jax.bench.preparation --num_images=8192 --workers=2 --rounds=3 [--dir=DIR]

Writes --num_images JPEGs of ImageNet-like sizes into --dir (bench/pipeline.py's generated
photographs, reused if --dir already holds them; a temporary folder by default), plans their
'folder' preparation once (`data.prepare`, --shard_size images per shard), then, each round, in
fresh processes started together:
- one process, 1 thread (`data.prepare --workers=1`), every shard;
- one process, N threads (`--workers=N`), every shard;
- N processes at once, 1 thread each, each preparing every N-th shard into its own folder: N
  workers that share nothing (no thread pool, no writer, no process), the most N workers can
  give on this machine, since they still share its cores, caches and memory.
For each: images/s (images over the seconds from the first process's start of work to the last
one's end, start-up excluded) and cores busy (their CPU seconds over those seconds). Prints the
rounds, the medians and two ratios: N threads against 1 thread, and N threads against N
processes. Run it on a quiet machine with at least N cores.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import statistics
import tempfile
import time

from absl import app
from absl import flags

from alexnet_jax import cli
from alexnet_jax import cpu
from alexnet_jax.bench import pipeline
from alexnet_jax.errors import UserError


def _prepare_part(settings, shards, threads: int, output: str, barrier, results) -> None:
  """In a fresh process: waits for the measurement's other processes, prepares `shards` on
  `threads` threads, puts (start, end, CPU seconds, images written) on `results`."""
  cli.quiet_tensorflow_logs()
  from alexnet_jax.data import prepare  # pylint: disable=g-import-not-at-top
  os.makedirs(output)
  barrier.wait()  # start-up (TensorFlow's import) is not the preparation's time
  written = []
  start, before = time.perf_counter(), os.times()
  prepare.prepare_shards(settings, shards, output, threads,
                         lambda shard, result: written.append(result['num_examples']))
  after = os.times()
  results.put((start, time.perf_counter(),
               after.user + after.system - before.user - before.system, sum(written)))


def measure(settings, shards, processes: int, threads: int, timeout: float = 3600) -> dict:
  """`processes` fresh processes at once, each preparing every processes-th shard of `shards`
  on `threads` threads: {'images' (written), 'seconds', 'images_per_sec', 'cores_busy'}."""
  context = multiprocessing.get_context('spawn')  # fresh interpreters, as a user's processes
  barrier, results = context.Barrier(processes), context.Queue()
  with tempfile.TemporaryDirectory() as scratch:
    procs = [context.Process(target=_prepare_part,
                             args=(settings, shards[i::processes], threads,
                                   os.path.join(scratch, str(i)), barrier, results))
             for i in range(processes)]
    for p in procs:
      p.start()
    spans, deadline = [], time.monotonic() + timeout
    try:
      while len(spans) < processes:
        try:
          spans.append(results.get(timeout=1))
        except queue.Empty:
          failed = [p.exitcode for p in procs if p.exitcode]
          if failed or time.monotonic() > deadline:
            raise RuntimeError(f'A preparation process failed (exit codes {failed}) or took '
                               f'over {timeout} s; its error is printed above.') from None
    finally:
      for p in procs:
        p.join(timeout=10)
        if p.is_alive():
          p.kill()
  seconds = max(end for _, end, _, _ in spans) - min(start for start, _, _, _ in spans)
  images = sum(n for _, _, _, n in spans)  # written, the unreadable left out
  return {'images': images, 'seconds': round(seconds, 3),
          'images_per_sec': round(images / seconds, 1),
          'cores_busy': round(sum(c for _, _, c, _ in spans) / seconds, 2)}


def compare(directory: str, workers: int, rounds: int, shard_size: int) -> dict:
  """The three measurements of the module's docstring, `rounds` times in rotation, and their
  medians and ratios."""
  from alexnet_jax.data import prepare  # pylint: disable=g-import-not-at-top
  prepared = pipeline.folder_settings(directory, shard_size)
  _, shards = prepare.plan(prepared)
  if len(shards) < workers:
    raise UserError(f'The images make {len(shards)} shard(s) of --shard_size={shard_size}, too '
                    f'few to split among --workers={workers} processes: lower --shard_size or '
                    'raise --num_images.')
  modes = {'1_thread': (1, 1), f'{workers}_threads': (1, workers),
           f'{workers}_processes': (workers, 1)}
  turns = {mode: [] for mode in modes}
  for r in range(rounds):
    for mode, (processes, threads) in modes.items():
      row = measure(prepared, shards, processes, threads)
      turns[mode].append(row)
      print(f'round {r + 1}: {mode:>12s} {row["images_per_sec"]:8.1f} images/s, '
            f'{row["cores_busy"]:.2f} cores busy', flush=True)
  median = {mode: statistics.median(t['images_per_sec'] for t in rows)
            for mode, rows in turns.items()}
  threads, alone = median[f'{workers}_threads'], median[f'{workers}_processes']
  return {'workers': workers, 'images': turns['1_thread'][0]['images'], 'shards': len(shards),
          'rounds': rounds, 'cpus': cpu.usable_cores(), 'median_images_per_sec': median,
          'threads_vs_1_thread': round(threads / median['1_thread'], 3),
          'threads_vs_processes': round(threads / alone, 3),
          'processes_vs_1_thread': round(alone / median['1_thread'], 3), 'turns': turns}


def _define_flags() -> None:
  flags.DEFINE_integer('num_images', 4096, 'JPEGs to generate (if --dir has fewer).')
  flags.DEFINE_string('dir', None, 'Folder for the JPEGs, reused if present (default: temp).')
  flags.DEFINE_integer('workers', 2, 'N: threads of the one process, and processes of the '
                       'share-nothing measurement.')
  flags.DEFINE_integer('rounds', 3, 'Turns of each measurement, taken in rotation; each '
                       "one's figure is its median turn.")
  flags.DEFINE_integer('shard_size', 256, 'Images per shard (the unit the N processes split).')


def main(argv) -> None:
  """Generates the JPEGs if needed, runs the comparison, prints it."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  for name, least in (('num_images', 1), ('workers', 2), ('rounds', 1), ('shard_size', 1)):
    if f[name].value < least:
      raise UserError(f'--{name}={f[name].value} must be >= {least}')
  if f.dir:
    cli.prepare_output(f.dir, flag='dir', folder=True)
  with tempfile.TemporaryDirectory() as scratch:
    directory = f.dir or scratch
    if pipeline.count_images(directory) < f.num_images:
      start = time.perf_counter()
      pipeline.write_jpegs(directory, f.num_images)
      print(f'Wrote {f.num_images} JPEGs to {directory} in {time.perf_counter() - start:.1f} s')
    if f.workers > cpu.usable_cores():
      print(f'Note: --workers={f.workers} on {cpu.usable_cores()} usable cores.')
    result = compare(directory, f.workers, f.rounds, f.shard_size)
  n, median = result['workers'], result['median_images_per_sec']
  print(f'medians over {result["rounds"]} rounds ({result["images"]} images, '
        f'{result["shards"]} shards, {result["cpus"]} usable cores): 1 thread '
        f'{median["1_thread"]:.1f}, {n} threads {median[f"{n}_threads"]:.1f}, {n} processes '
        f'{median[f"{n}_processes"]:.1f} images/s')
  print(f'{n} threads / 1 thread: {result["threads_vs_1_thread"]:.2f}x;  {n} threads / '
        f'{n} processes: {result["threads_vs_processes"]:.2f};  {n} processes / 1 thread: '
        f'{result["processes_vs_1_thread"]:.2f}x')
  print(json.dumps(result))


if __name__ == '__main__':
  cli.run(main, _define_flags)
