"""TEST-ONLY STAND-IN (see tests/sglang_stubs/README.md)."""
from torchvision import _unavailable

decode_jpeg = _unavailable("io.decode_jpeg")
decode_image = _unavailable("io.decode_image")
read_image = _unavailable("io.read_image")
read_video = _unavailable("io.read_video")


class ImageReadMode:  # enum-like placeholder
    UNCHANGED = 0
    GRAY = 1
    RGB = 3
