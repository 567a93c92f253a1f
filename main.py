"""Trains or evaluates AlexNet.

  python main.py --config=configs/alexnet.py --workdir=runs/alexnet
  python main.py --config=configs/digits.py --workdir=runs/digits
  python main.py --config=configs/alexnet.py --workdir=runs/alexnet --mode=eval
  python main.py ... --coordinator_address=HOST0:1234 --num_processes=2 --process_id=I  # 2 hosts

Every config field can be overridden on the command line, e.g. --config.batch_size=256.
Rerunning a training command on the same workdir resumes from its latest checkpoint.
A run over several hosts runs the same command on each (docs/devices_and_hosts.md);
on Cloud TPU and SLURM the processes find each other by themselves.
A bad value or a missing path prints one line that says what to fix, and exits with status 2.
"""

from alexnet_jax import cli

cli.quiet_tensorflow_logs()  # Before anything loads TensorFlow.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags

from alexnet_jax import cpu
from alexnet_jax import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the config.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train (resumes if the workdir has a checkpoint) or eval (a checkpoint).')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint --mode=eval uses.')
flags.DEFINE_bool('keep_freed_memory', True, 'glibc keeps freed memory for reuse instead of '
                  'unmapping it (alexnet_jax/cpu/allocator.py): saves XLA:CPU ~2 s of page '
                  'faults per paper-network step; resident memory then stays at its peak.')
config_flags.DEFINE_config_file('config', None, 'A config file in configs/.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.keep_freed_memory:
    cpu.keep_freed_memory()
  # Before JAX lists its devices: a run over several processes sees all of theirs.
  distributed.initialize_from_flags()
  # Imported only now: the allocator setting must precede the threads JAX and TensorFlow start.
  from alexnet_jax.core import train  # pylint: disable=g-import-not-at-top
  cli.setup_tensorflow()
  if FLAGS.mode == 'train':
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    train.evaluate(FLAGS.config, FLAGS.workdir, which=FLAGS.checkpoint)


if __name__ == '__main__':
  cli.run(main)
