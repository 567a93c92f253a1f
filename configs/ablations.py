"""The paper's ablations (§3.2-§4.2) on the offline digits: one config per switched-off choice.

  python -m alexnet_jax.paper.ablations --seeds=3 --epochs=10 --output=ablations.json --markdown
  python main.py --config=configs/ablations.py:no_lrn --workdir=runs/ablations/no_lrn \
      --config.pca_file=runs/digits_pca.npz

The argument after the colon names the variant (default 'baseline'). The baseline is
configs/digits.py with §4.1's PCA lighting switched on: digits.py leaves it off because its images
are grey. Here the eigen-statistics are those of the digits training set itself, as §4.1 does for
ImageNet: the RGB covariance of grey pixels has a single non-zero eigenvalue, along (1, 1, 1), so
the lighting becomes what it can be on this data, a random change of brightness per image (a
colour cast from ImageNet's constants would be a change that never occurs in the data). The
ablation command computes them (`alexnet_jax.data.stats`) and sets config.pca_file; with main.py,
write them first with
  python -m alexnet_jax.data.stats --config=configs/digits.py --num_images=0 \
      --output=runs/digits_pca.npz
The paper's effects are ImageNet top-1 differences; PAPER_EFFECTS keeps them beside each switch.
"""

import ml_collections

from configs import digits

# name -> (what is switched off, config overrides).
ABLATIONS = {
    'baseline': ("all of the paper's choices", {}),
    'no_lrn': ('§3.3 local response normalisation', {'lrn': False}),
    'non_overlapping_pool': ('§3.4 overlapping pooling (2x2/2 instead of 3x3/2)',
                             {'overlapping_pool': False}),
    'no_pca_lighting': ('§4.1 PCA lighting', {'pca_lighting': False}),
    'no_dropout': ('§4.2 dropout', {'dropout_rate': 0.0}),
    # §3.2 compares the two-column net with a one-column net. 'small_one_column' keeps the
    # 'small' widths and connects every kernel to all of the previous layer's maps (381,642
    # parameters against 286,922), where the paper's one-column net had half the kernels.
    'one_column': ('§3.2 two columns (one column, same widths)', {'model': 'small_one_column'}),
}

# What the paper measured on ILSVRC when the choice was removed (top-1 error, ImageNet).
PAPER_EFFECTS = {
    'no_lrn': '+1.4% top-1, +1.2% top-5 (§3.3); 11% -> 13% on CIFAR-10',
    'non_overlapping_pool': '+0.4% top-1, +0.3% top-5 (§3.4)',
    'no_pca_lighting': '+over 1% top-1 (§4.1)',
    'no_dropout': 'substantial overfitting (§4.2); dropout doubles the iterations to converge',
    'one_column': '+1.7% top-1, +1.2% top-5 (§3.2; one column with half the kernels)',
}


def get_config(name: str = 'baseline') -> ml_collections.ConfigDict:
  """configs/digits.py with PCA lighting on, and the ablation `name` applied."""
  if name not in ABLATIONS:
    raise ValueError(f'Unknown ablation {name!r}; choose one of {sorted(ABLATIONS)}')
  c = digits.get_config()
  c.pca_lighting = True  # §4.1, with the digits' own eigen-statistics (see the docstring).
  c.pca_lighting_scale = 'paper'  # §4.1 as written: offset P (a * lambda), a ~ N(0, 0.1).
  c.update(ABLATIONS[name][1])
  return c
