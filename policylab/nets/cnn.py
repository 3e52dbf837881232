"""Encoders for image observations: Nature-CNN (Mnih et al. 2015) and IMPALA-CNN (Espeholt et al. 2018).

An observation space is an image when it is a uint8 Box of shape (H, W), (H, W, C) or (C, H, W) with C <= 4
(a grayscale frame stack from Gymnasium's FrameStackObservation is (k, H, W)). The encoder takes the frames as
they are stored, uint8, and converts them on the device: to float, divided by 255, channels first. So rollout
and replay storage stay uint8 (a quarter of float32's memory and copies), and a `Policy` takes the env's own
frames. Which encoder: `encoder=auto` (Nature-CNN for images, none for vectors), `nature`, `impala`, or `mlp`
(frames scaled and flattened into the MLP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from policylab.envs.encode import is_image_space
from policylab.errors import ConfigError, EnvError
from policylab.nets import matmul

ENCODERS = ("auto", "mlp", "nature", "impala")


class VectorObservationsOnly(ConfigError):
    """Image observations given to an algorithm whose networks read vectors only (`AlgoSpec.build` names the
    algorithm and those that take images)."""


@dataclass(frozen=True)
class ImageLayout:
    channels: int
    height: int
    width: int
    channels_last: bool

    def to_nchw(self, frames: Tensor) -> Tensor:
        """[B, *stored shape] uint8 (or float) frames -> [B, C, H, W] float in [0, 1], in the channels-last memory
        layout: oneDNN's convolutions run about 20% faster on it (a Nature-CNN step on 32 Atari frames, 1 thread,
        Xeon: 14.0 against 17.3 ms; `benchmarks/atari.py --layout`, benchmarks/README.md)."""
        x = frames.float().div_(255.0) if frames.dtype == torch.uint8 else frames.float() / 255.0
        if x.dim() == 3:  # (H, W) frames
            x = x.unsqueeze(1)
        elif self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return x.contiguous(memory_format=torch.channels_last)


def image_layout(space: gym.Space) -> ImageLayout | None:
    """The layout of an image observation space, None for any other space; an error for a uint8 space that is
    image-like but not one policylab's encoders read."""
    if not is_image_space(space):
        return None
    shape = tuple(int(d) for d in space.shape or ())
    if len(shape) == 2:
        return ImageLayout(1, shape[0], shape[1], False)
    if len(shape) == 3:
        if shape[-1] <= 4 < min(shape[0], shape[1]):
            return ImageLayout(shape[2], shape[0], shape[1], True)
        if shape[0] <= 4 < min(shape[1], shape[2]):
            return ImageLayout(shape[0], shape[1], shape[2], False)
    raise EnvError(
        f"uint8 observations of shape {shape} are not frames policylab's CNN encoders read: they take (H, W), "
        "(H, W, C) or (C, H, W) with at most 4 channels",
        "stack grayscale frames (gymnasium.wrappers.GrayscaleObservation before FrameStackObservation), or "
        "reshape the observations yourself",
    )


def check_not_float_image(space: gym.Space, env_id: str) -> None:
    """Float frames (H, W, C) or (C, H, W) would be flattened into a huge MLP input: an error naming the fix."""
    if not isinstance(space, gym.spaces.Box) or space.dtype == np.uint8 or len(space.shape) != 3:
        return
    h, w, c = space.shape
    c_first = space.shape[0]
    if (c <= 4 and min(h, w) >= 16) or (c_first <= 4 and min(space.shape[1:]) >= 16):
        raise EnvError(
            f"{env_id!r} observes {space.dtype} frames of shape {space.shape}: policylab's CNN encoders read uint8 "
            "frames (0-255)",
            "convert them with gymnasium.wrappers.TransformObservation to a uint8 Box (frames * 255), or pass "
            "--set encoder=mlp to flatten them into the MLP",
        )


class ImageEncoder(nn.Module):
    """Frames as stored ([B, *shape], uint8) -> features [B, features] (float32). With a run's `precision=bf16`
    the convolutions and the feature layer run under bfloat16 autocast (float32 weights, gradients and optimizer
    state; on AMX about twice as fast: `benchmarks/atari.py --layout`)."""

    features: int
    min_size: int = 1
    """The smallest height and width the encoder's convolutions take."""

    def forward(self, frames: Tensor) -> Tensor:
        if matmul.precision() != "bf16" or frames.device.type != "cpu" or _acting_on_few(frames):
            return self.encode(frames)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.encode(frames).float()

    def encode(self, frames: Tensor) -> Tensor:
        raise NotImplementedError


class RoutedLinear(nn.Linear):
    """nn.Linear (same parameters and checkpoint keys) whose products take `matmul.linear`'s kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return matmul.linear(x, self.weight, self.bias)


BF16_MIN_ACTING_FRAMES = 2
"""Below this many stacks a forward without gradients (acting) stays float32 under precision=bf16: autocast casts
every weight to bfloat16 on each call, which costs more than it saves on one stack (a Nature-CNN forward, 1
thread, AMD EPYC Zen 4: 0.72 ms in float32 against 0.89 under autocast; even at 2, bf16 ahead from 4;
`benchmarks/atari.py --acting`)."""


def _acting_on_few(frames: Tensor) -> bool:
    return not torch.is_grad_enabled() and len(frames) < BF16_MIN_ACTING_FRAMES


def _conv_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class NatureCNN(ImageEncoder):
    """Mnih et al. 2015: 32 8x8 stride 4, 64 4x4 stride 2, 64 3x3 stride 1, ReLU, a 512-unit ReLU layer."""

    min_size = 36

    def __init__(self, layout: ImageLayout, features: int = 512) -> None:
        super().__init__()
        self.layout = layout
        self.convs = nn.Sequential(
            nn.Conv2d(layout.channels, 32, 8, 4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, 1), nn.ReLU(),
            nn.Flatten(),
        )  # fmt: skip
        h, w = layout.height, layout.width
        for kernel, stride in ((8, 4), (4, 2), (3, 1)):
            h, w = _conv_out(h, kernel, stride), _conv_out(w, kernel, stride)
        self.fc = nn.Sequential(RoutedLinear(64 * h * w, features), nn.ReLU())
        self.features = features

    def encode(self, frames: Tensor) -> Tensor:
        return self.fc(self.convs(self.layout.to_nchw(frames)))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(torch.relu(self.conv0(torch.relu(x))))


class ImpalaCNN(ImageEncoder):
    """Espeholt et al. 2018: three stacks of (3x3 conv, 3x3 max-pool stride 2, two residual blocks) with 16, 32 and
    32 channels, ReLU, a 256-unit ReLU layer."""

    def __init__(self, layout: ImageLayout, channels: tuple[int, ...] = (16, 32, 32), features: int = 256) -> None:
        super().__init__()
        self.layout = layout
        layers: list[nn.Module] = []
        c_in, h, w = layout.channels, layout.height, layout.width
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.MaxPool2d(3, 2, padding=1), _Residual(c), _Residual(c)]
            c_in, h, w = c, _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        self.convs = nn.Sequential(*layers, nn.ReLU(), nn.Flatten())
        self.fc = nn.Sequential(RoutedLinear(c_in * h * w, features), nn.ReLU())
        self.features = features

    def encode(self, frames: Tensor) -> Tensor:
        return self.fc(self.convs(self.layout.to_nchw(frames)))


class FlatFrames(ImageEncoder):
    """`encoder=mlp` on images: the frames scaled to [0, 1] and flattened."""

    def __init__(self, layout: ImageLayout) -> None:
        super().__init__()
        self.layout = layout
        self.features = layout.channels * layout.height * layout.width

    def encode(self, frames: Tensor) -> Tensor:
        return frames.reshape(len(frames), -1).float() / 255.0


def check_vector_observations(space: gym.Space) -> None:
    """For the algorithms whose networks read vectors only: an error for image observations."""
    if image_layout(space) is not None or getattr(space, "images", None):
        raise VectorObservationsOnly(
            "this algorithm does not take image observations yet; its networks read vectors",
            "use an algorithm that builds an image encoder on images (policylab.algos.image_algorithms() lists them)",
        )


class MultiInputEncoder(ImageEncoder):
    """A Dict (or Tuple) with frames among its parts, encoded as one float vector (envs/encode.py): each frame part
    through its own CNN, the vector parts as they are, the results concatenated (SB3's CombinedExtractor)."""

    def __init__(self, size: int, images: list[tuple[slice, tuple[int, ...]]], cnns: list[ImageEncoder]) -> None:
        super().__init__()
        self.images = [(part, shape) for part, shape in images]
        self.cnns = nn.ModuleList(cnns)
        inside = set().union(*(range(part.start, part.stop) for part, _ in images))
        self.vector_columns: Tensor
        self.register_buffer("vector_columns", torch.tensor([i for i in range(size) if i not in inside]))
        self.features = sum(cnn.features for cnn in cnns) + len(self.vector_columns)

    def encode(self, x: Tensor) -> Tensor:
        parts = [cnn(x[:, part].view(len(x), *shape)) for (part, shape), cnn in zip(self.images, self.cnns)]
        return torch.cat([*parts, x.index_select(1, self.vector_columns)], 1)


def make_encoder(kind: str, space: gym.Space, orthogonal: bool = False) -> ImageEncoder | None:
    """The encoder for `space` (None: the observations are vectors, flattened into the MLP)."""
    if kind not in ENCODERS:
        raise ConfigError(f"encoder={kind!r} is not one of {', '.join(ENCODERS)}", "use auto")
    images = getattr(space, "images", None)
    if images:  # frames inside a Dict or Tuple
        frames = [_frame_encoder(kind, gym.spaces.Box(0, 255, shape, np.uint8)) for _, shape in images]
        encoder: ImageEncoder = MultiInputEncoder(int(np.prod(space.shape or ())), images, frames)
    else:
        layout = image_layout(space)
        if layout is None:
            if kind in ("nature", "impala"):
                raise ConfigError(
                    f"encoder={kind} needs image observations (uint8 frames); this env observes {space}",
                    "use encoder=auto (or mlp) for vector observations",
                )
            return None
        encoder = _frame_encoder(kind, space)
    if orthogonal:  # as SB3's on-policy CNN policies: sqrt(2) gains
        for module in encoder.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(module.weight, math.sqrt(2))
                nn.init.zeros_(module.bias)  # type: ignore[arg-type]
    return encoder


def _frame_encoder(kind: str, space: gym.Space) -> ImageEncoder:
    layout = image_layout(space)
    assert layout is not None
    cls: type[ImageEncoder] = {"auto": NatureCNN, "nature": NatureCNN, "impala": ImpalaCNN, "mlp": FlatFrames}[kind]
    if min(layout.height, layout.width) < cls.min_size:
        raise EnvError(
            f"frames of {layout.height}x{layout.width} are smaller than Nature-CNN's {cls.min_size}x{cls.min_size}",
            "use --set encoder=impala (any size), or enlarge them with gymnasium.wrappers.ResizeObservation",
        )
    return cls(layout)  # type: ignore[call-arg]


def flat_features(encoder: nn.Module | None, obs: Tensor) -> Tensor:
    """The MLP's input: the encoder's features, or the observations flattened."""
    return obs.reshape(len(obs), -1) if encoder is None else encoder(obs)
