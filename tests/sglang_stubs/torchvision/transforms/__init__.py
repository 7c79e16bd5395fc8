"""TEST-ONLY STAND-IN (see tests/sglang_stubs/README.md)."""
import enum

from torchvision import _unavailable


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name):  # Compose, Resize, ToTensor, Normalize, ...: usable as names, fail when called
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(f"transforms.{name}")


from torchvision.transforms import functional, v2  # noqa: E402,F401
