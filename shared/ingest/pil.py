"""Opening a plain image (JPEG/PNG/plain TIFF) with PIL under fedst's own size bound.

PIL refuses images above ``Image.MAX_IMAGE_PIXELS`` (~179 Mpx) as decompression bombs, but a scanned section
is legitimately larger (her2st C2.jpg is 92 Mpx, a CytAssist hires image ~1 Gpx). Setting that process-wide
global from library code would change every other PIL user in the process, so `open_plain_image` lifts it
only for the duration of its ``with`` block, restores the caller's value afterwards, and applies an explicit
bound of its own instead: the pixel count in the file's header is checked before anything is decoded, so a
file claiming 60000 x 60000 px is refused in milliseconds instead of allocating 10.8 GB.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from shared.errors import FedstError

if TYPE_CHECKING:
    from PIL import Image as PILImage

MAX_PLAIN_IMAGE_PIXELS = 2**31
"""Default bound on a plain image decoded whole (~2.1 Gpx, e.g. 46340 x 46340; 6.4 GB as RGB, ~8.6 GB with its
pyramid): twice the largest plain section images seen in practice (~1 Gpx). Larger slides should arrive as a
pyramidal TIFF/SVS, which openslide reads tile by tile; the bound is raised with MAX_PIXELS_ENV."""
MAX_PIXELS_ENV = "FEDST_MAX_IMAGE_PIXELS"


def max_plain_image_pixels() -> int:
    """The bound in force: ``$FEDST_MAX_IMAGE_PIXELS`` when set (a positive integer), else the default."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return MAX_PLAIN_IMAGE_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise FedstError(
            f"${MAX_PIXELS_ENV} is {raw!r} (expected a positive pixel count, e.g. {MAX_PLAIN_IMAGE_PIXELS})"
        )
    return value


def check_plain_image_size(path: str | os.PathLike, width: int, height: int) -> None:
    """FedstError naming the file when ``width x height`` (from its header) exceeds the bound in force."""
    bound = max_plain_image_pixels()
    if width * height > bound:
        raise FedstError(
            f"{path}: plain image of {width} x {height} px exceeds the {bound} px bound for images decoded whole "
            f"(expected a pyramidal TIFF or SVS for a slide this large, or raise ${MAX_PIXELS_ENV})"
        )


@contextmanager
def open_plain_image(path: str | os.PathLike) -> Iterator[PILImage.Image]:
    """``Image.open(path)`` as a context manager, with PIL's pixel limit lifted only inside the block.

    Raises FedstError naming the file when PIL cannot identify it, it is corrupt (also for errors raised while
    the block decodes it), or its header claims more pixels than `max_plain_image_pixels` (checked before the
    block runs, so before any decoding).
    """
    from PIL import Image, UnidentifiedImageError

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own bound below replaces PIL's, only while the block runs
    try:
        with Image.open(path) as image:
            check_plain_image_size(path, image.width, image.height)
            yield image
    except UnidentifiedImageError:
        raise FedstError(f"{path}: not an image PIL or openslide can read (expected JPEG, PNG, TIFF or SVS)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise FedstError(f"{path}: unreadable or corrupt image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = before
