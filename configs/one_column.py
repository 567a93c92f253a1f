"""The paper's widths on one column (no grouped convolutions): §3.2's comparison net.

  python main.py --config=configs/one_column.py --workdir=runs/one_column

62,378,344 parameters. The paper reports the two-column net beats a one-column net with half
the kernels per layer by 1.7% top-1 and 1.2% top-5 (§3.2).
"""

import ml_collections

from configs import alexnet


def get_config() -> ml_collections.ConfigDict:
  c = alexnet.get_config()
  c.model = 'one_column'
  c.lrn_within_columns = False  # one column: nothing to keep apart.
  return c
