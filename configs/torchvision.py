"""torchvision's pretrained AlexNet (IMAGENET1K_V1: alexnet-owt-7be5be79.pth), imported.

  python -m alexnet_jax.weights.import_weights --format=torchvision \
      --file=alexnet-owt-7be5be79.pth --workdir=runs/torchvision
  python main.py --config=configs/torchvision.py --workdir=runs/torchvision --mode=eval \
      --config.data_dir=~/tensorflow_datasets

The import writes this config (with num_classes from the file) into the workdir; evaluate,
predict and figures then open the run as one trained here. The network is configs/owt.py's;
what changes is the preprocessing those weights were trained with: torchvision scales pixels to
0..1, subtracts the per-channel ImageNet mean (0.485, 0.456, 0.406) and divides by the std
(0.229, 0.224, 0.225), after resizing the short side to 256 and cropping the central 224x224.
Here pixels stay on the 0..255 scale, so both are multiplied by 255: the same network input.

Our centre crop is the central 224 of the central 256x256 square of the short-side-256 image,
which equals torchvision's Resize(256) + CenterCrop(224) up to the sub-pixel rounding of the
window and the resampler (TensorFlow's antialiased bilinear here, PIL's in torchvision).

What "working" means: torchvision documents 56.522% top-1 / 79.066% top-5 accuracy for these
weights on the ILSVRC-2012 validation set with the single centre crop, i.e. 43.478% top-1 /
20.934% top-5 error; the resampler may move these by a few tenths of a percent.
"""

import ml_collections

from configs import owt


def get_config() -> ml_collections.ConfigDict:
  c = owt.get_config()
  # torchvision's transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  # on 0..1 pixels, times 255 for our 0..255 scale.
  c.mean = 'channel'
  c.mean_rgb = (123.675, 116.28, 103.53)
  c.std_rgb = (58.395, 57.12, 57.375)
  c.resize_size = 256  # transforms.Resize(256): the short side.
  c.image_size = 224  # transforms.CenterCrop(224).
  # torchvision's documented accuracy is of the single centre crop.
  c.ten_crop_eval = False
  return c
