"""The paper's run: AlexNet (two columns) on ILSVRC-2012, as in Krizhevsky et al. 2012.

  python main.py --config=configs/alexnet.py --workdir=runs/alexnet \
      --config.data_dir=~/tensorflow_datasets

Needs the ImageNet tar files downloaded by hand (TFDS manual download; the error message names
them and where they go), or `--config.dataset=folder --config.data_dir=ROOT` for a folder of
JPEGs laid out as ROOT/<split>/<class>/*.jpg.

What "working" means: the paper reports 40.7% top-1 / 18.2% top-5 error on the ILSVRC-2012
validation set for one CNN (§6, 10-crop test); about 90 epochs, five to six days on two GTX 580.
Every number below that the paper gives carries its section.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The paper's hyper-parameters; every field can be overridden with --config.FIELD=VALUE."""
  c = ml_collections.ConfigDict()

  # ---- Data (§2, §4.1) ----
  # 'imagenet2012' or any TFDS image-classification name, 'folder' (data_dir/<split>/<class>/*),
  # 'prepared' (data_dir written once by `python -m alexnet_jax.data.prepare`: §2's 256x256
  # images as JPEG shards, with their statistics; the fast way to feed an accelerator),
  # 'digits' (scikit-learn's handwritten digits, offline) or 'synthetic' (random, for speed).
  c.dataset = 'imagenet2012'
  c.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir, or the folder root.
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.num_classes = 1000  # §2: ILSVRC's 1000 classes.
  c.resize_size = 256  # §2: short side rescaled to 256, then the central 256x256 patch.
  c.image_size = 224  # §4.1: random 224x224 patches of the 256x256 images.
  # Antialiased (area-weighted) bilinear down-scaling to the 256 square, as image libraries do
  # when they shrink; False is faster (about half the resize cost) but aliases fine texture.
  c.resize_antialias = True
  # §2: "subtracting the mean activity over the training set from each pixel": 'image' is the
  # per-pixel mean image of the paper; 'channel' a per-channel RGB mean.
  c.mean = 'image'
  # Not in the paper (which subtracts its training set's mean and scales nothing): with
  # mean='channel', `mean_rgb` gives the RGB mean to subtract on the 0..255 scale instead of the
  # one computed from the data, and `std_rgb` divides each channel of the mean-subtracted image,
  # as the network's first operation. Weights trained elsewhere expect their own: torchvision's
  # are (0.485, 0.456, 0.406) * 255 and (0.229, 0.224, 0.225) * 255 (configs/torchvision.py).
  c.mean_rgb = ml_collections.config_dict.placeholder(tuple)
  c.std_rgb = ml_collections.config_dict.placeholder(tuple)
  # An .npz written by `python -m alexnet_jax.data.stats` (mean image, RGB mean, PCA of the RGB
  # covariance). None: the statistics are computed from `stats_num_images` training images on
  # the first run and saved in the workdir.
  c.stats_file = ml_collections.config_dict.placeholder(str)
  c.stats_num_images = 10_000
  c.random_crop = True  # §4.1: random 224 crops for training.
  c.random_flip = True  # §4.1: horizontal reflections with probability 1/2.
  c.pca_lighting = True  # §4.1: PCA colour augmentation.
  c.pca_lighting_std = 0.1  # §4.1: a_i ~ N(0, 0.1).
  # 'paper': offset = P (a * lambda) with lambda the eigenvalues on a 0..1 pixel scale (the
  # published 0.2175, 0.0188, 0.0045), times 255. 'cuda_convnet': offset = P (a * sqrt(lambda))
  # with lambda on a 0..255 scale, as Krizhevsky's cuda-convnet2 code did (about twice the shift
  # along the first component). See docs/paper.md, §4.1.
  c.pca_lighting_scale = 'paper'
  # PCA eigenvalues/vectors: None takes the published ImageNet values (0..1 pixel scale), or
  # for dataset='prepared' the PCA the preparation computed from the training set.
  c.pca_file = ml_collections.config_dict.placeholder(str)
  c.shuffle_buffer = 16_384
  c.cache = False  # tf.data cache of decoded examples (small datasets only).
  c.ten_crop_eval = True  # §4.1/§6: average softmax over 4 corners + centre and their mirrors.
  # Not in the paper: where the float work of the input runs. True: the host sends uint8 patches
  # (150 KB per 224 image instead of 600 KB) and the mean subtraction and PCA lighting run on the
  # device inside the jitted step (alexnet_jax/data/on_device.py), same values. False: the host
  # sends float32 images.
  c.device_preprocessing = True

  # ---- Model (§3) ----
  c.model = 'paper'  # 'paper' (two columns), 'one_column', 'owt' (torchvision), 'small'.
  c.lrn = True  # §3.3: LRN after ReLU of conv1 and conv2.
  c.lrn_k = 2.0  # §3.3
  c.lrn_n = 5  # §3.3
  c.lrn_alpha = 1e-4  # §3.3
  c.lrn_beta = 0.75  # §3.3
  # 'paper': alpha multiplies the sum as written in §3.3 (TensorFlow's convention);
  # 'divided': alpha / n (cuda-convnet, Caffe, PyTorch).
  c.lrn_alpha_convention = 'paper'
  # §3.2: the two columns (GPUs) exchange nothing before conv3, so each normalises only its own
  # channels: 48 of conv1, 128 of conv2 (cuda-convnet's layer file: `[rnorm1a] inputs=conv1a
  # channels=48 size=5`). False lets the 5-channel window cross the boundary, as Caffe's and
  # torchvision's one-GPU nets do.
  c.lrn_within_columns = True
  c.overlapping_pool = True  # §3.4: 3x3 windows, stride 2 (False: 2x2, stride 2).
  c.activation = 'relu'  # §3.1: 'relu' or 'tanh'.
  c.dropout_rate = 0.5  # §4.2: dropout 0.5 in FC6 and FC7.
  c.weight_init_std = 0.01  # §5: weights N(0, 0.01).
  # §5: biases 1 in conv2, conv4, conv5 and the hidden FC layers (Caffe found this gave a flat
  # loss and used 0.1).
  c.bias_init_one = 1.0
  c.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32).
  # How conv2/4/5's two columns run: 'auto' (fastest measured for the backend), 'split' (two
  # half-convolutions) or 'grouped' (feature_group_count=2). Same parameters either way.
  c.column_impl = 'auto'
  # Faster forms of other layers, same values (alexnet_jax/core/ops.py, BENCHMARKS.md): 'auto' picks
  # per backend. pool_impl: 'mask' | 'reduce_window'; lrn_impl: 'custom' | 'reduce_window';
  # conv_impl (conv1's strided convolution): 'im2col' | 'direct'.
  c.pool_impl = 'auto'
  c.lrn_impl = 'auto'
  c.conv_impl = 'auto'
  # Who computes the convolutions: 'auto' (oneDNN on the CPU backend in float32 when its calls
  # build, alexnet_jax/cpu/onednn.py; XLA elsewhere), 'xla' or 'onednn'.
  c.conv_backend = 'auto'

  # ---- Optimisation (§5) ----
  c.batch_size = 128  # §5: batch 128 (global, over all devices).
  c.eval_batch_size = 128
  c.num_epochs = 90.0  # §5: "roughly 90 cycles through the training set".
  c.learning_rate = 0.01  # §5
  c.momentum = 0.9  # §5
  c.weight_decay = 5e-4  # §5
  # §5's rule is written for the weights w; cuda-convnet decays weights only and Caffe's
  # reference AlexNet sets decay_mult 0 on every bias. True also decays the biases (an
  # ablation; §5's bias of 1 would then shrink towards 0 with a time constant of ~2 epochs).
  c.decay_biases = False
  # §5: "divide the learning rate by 10 when the validation error rate stopped improving",
  # three times. 'step' divides at `lr_decay_epochs` instead.
  # Large batches (not in the paper, which trained at 128): 'sgd' is §5's rule; 'lars' adds
  # You et al. 2017's layer-wise trust ratio (weights only; biases take the plain step).
  c.optimizer = 'sgd'
  c.lars_trust_coefficient = 0.001  # You et al. 2017
  # >0: Goyal et al. 2017's linear scaling rule, learning_rate * batch_size / lr_reference_batch
  # (128, the paper's batch, when learning_rate is the paper's 0.01). 0: learning_rate as given.
  c.lr_reference_batch = 0
  # Goyal et al. 2017's gradual warm-up: the learning rate rises linearly over warmup_epochs
  # from warmup_init_lr (None: the unscaled learning_rate, as Goyal et al.) to its scaled value.
  c.warmup_epochs = 0.0
  c.warmup_init_lr = ml_collections.config_dict.placeholder(float)
  c.lr_schedule = 'plateau'
  c.lr_decay_factor = 0.1  # §5
  c.lr_decay_epochs = (30, 60, 80)  # for 'step'.
  c.plateau_max_decays = 3  # §5: reduced three times prior to termination.
  c.plateau_patience = 2  # evaluations without improvement before dividing (our choice).
  c.seed = 0
  # ---- Fine-tuning (not in the paper) ----
  # The workdir of another run (trained here, or written by `python -m
  # alexnet_jax.weights.import_weights`): a new run starts from the parameters of its best
  # checkpoint. Layers whose shapes differ (fc8 when num_classes differs) start from §5's
  # initialisation; the log lists which layers were loaded. Ignored when the workdir has a
  # checkpoint to resume.
  c.init_from = ml_collections.config_dict.placeholder(str)
  # Freeze every layer up to and including this one ('conv5': train fc6-fc8 only; 'fc7': fc8
  # only): optax's masking gives them no update, no momentum and no weight decay.
  c.freeze_through = 'none'

  # ---- Loop, logging, checkpoints ----
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.eval_every_steps = 0  # >0 overrides eval_every_epochs.
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 3
  c.num_train_steps = -1  # >0 stops after this many steps (tests, benchmarks).
  c.num_eval_steps = -1  # >0 evaluates only this many batches (tests).

  # ---- Parallelism (alexnet_jax/core/parallel.py, docs/scaling.md) ----
  # 'data': pmap data parallelism, the whole network on every device. 'columns': §3.2's split,
  # each of two devices holding one column (times a data axis over the rest). 'hybrid':
  # Krizhevsky 2014's "one weird trick", convolutions data-parallel, FC layers split.
  c.parallelism = 'data'
  # Devices the FC layers are split over for 'hybrid' (0: all of them); 'columns' always 2.
  c.model_parallel = 0

  # ---- Feeding the devices, profiling (not in the paper) ----
  # Batches placed on the devices ahead of the step that uses them (parallel.device_batches):
  # their host-to-device copies overlap the running step. 0 copies each batch when it is due.
  c.device_prefetch = 2
  # >0 writes a JAX profiler trace of this many steps to workdir/profile, starting
  # profile_after_steps steps after the run starts or resumes (after compilation and warm-up).
  c.profile_steps = 0
  c.profile_after_steps = 5
  return c
