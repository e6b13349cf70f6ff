"""Opening a plain image (JPEG/PNG/plain TIFF) with PIL under fedst's own size bound.

PIL refuses images above ``Image.MAX_IMAGE_PIXELS`` (~179 Mpx) as decompression bombs, but a scanned section
is legitimately larger (her2st C2.jpg is 92 Mpx, a CytAssist hires image ~1 Gpx). Setting that process-wide
global from library code would change every other PIL user in the process, so `open_plain_image` lifts it
only for the duration of its ``with`` block, restores the caller's value afterwards, and applies an explicit
bound of its own instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from shared.errors import FedstError

if TYPE_CHECKING:
    from PIL import Image as PILImage

MAX_PLAIN_IMAGE_PIXELS = 2**32
"""Largest plain image fedst decodes (~4.3 Gpx, 12.9 GB as RGB): covers the 65535 x 65535 JPEG maximum;
anything larger should arrive as a pyramidal TIFF/SVS, which openslide reads tile by tile."""


@contextmanager
def open_plain_image(path: str | os.PathLike) -> Iterator[PILImage.Image]:
    """``Image.open(path)`` as a context manager, with PIL's pixel limit lifted only inside the block.

    Raises FedstError naming the file when PIL cannot identify it, it is corrupt (also for errors raised while
    the block decodes it), or it exceeds MAX_PLAIN_IMAGE_PIXELS.
    """
    from PIL import Image, UnidentifiedImageError

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own bound below replaces PIL's, only while the block runs
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > MAX_PLAIN_IMAGE_PIXELS:
                raise FedstError(
                    f"{path}: plain image of {image.width} x {image.height} px exceeds the {MAX_PLAIN_IMAGE_PIXELS} "
                    "px bound for images decoded whole (expected a pyramidal TIFF or SVS for a slide this large)"
                )
            yield image
    except UnidentifiedImageError:
        raise FedstError(f"{path}: not an image PIL or openslide can read (expected JPEG, PNG, TIFF or SVS)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise FedstError(f"{path}: unreadable or corrupt image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = before
