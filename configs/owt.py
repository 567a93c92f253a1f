"""torchvision's single-column "one weird trick" AlexNet (Krizhevsky 2014) on ImageNet.

  python main.py --config=configs/owt.py --workdir=runs/owt

64/192/384/256/256 kernels, no LRN, dropout before FC6 and FC7; 61,100,840 parameters.
torchvision's reference training (different recipe: weight decay 1e-4, batch 256, step
schedule) reaches 43.5% top-1 / 20.9% top-5 error with the centre crop.
"""

import ml_collections

from configs import alexnet


def get_config() -> ml_collections.ConfigDict:
  c = alexnet.get_config()
  c.model = 'owt'
  c.lrn = False
  c.lrn_within_columns = False  # no LRN, one column (torchvision).
  return c
