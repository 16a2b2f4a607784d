"""A pydicom decoding plugin for JPEG Lossless and 12-bit JPEG Extended.

JPEG Lossless (Process 14, selection value 1 above all) is the most common lossless syntax in PACS
archives, yet pydicom's permissively licensed plugins do not read it, nor JPEG Extended with 12-bit
samples: Pillow reads 8-bit JPEG only, pylibjpeg-libjpeg is GPL-3.0, and GDCM aborts the whole
process on some malformed streams (a C++ exception nothing catches). imagecodecs (BSD-3-Clause)
wraps libjpeg-turbo 3, which decodes both and reports a bad stream as a Python exception.
"""

from __future__ import annotations

from pydicom import uid
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeRunner

try:
    import imagecodecs
except ImportError:  # pydicom then lists the plugin's dependency as missing (no_decoder)
    imagecodecs = None

LABEL = "imagecodecs"
SYNTAXES = (uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGExtended12Bit)
DECODER_DEPENDENCIES = {syntax: ("imagecodecs>=2024.1.1",) for syntax in SYNTAXES}


def is_available(tsyntax: str) -> bool:
    return imagecodecs is not None and imagecodecs.JPEG8.available and tsyntax in SYNTAXES


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    if runner.transfer_syntax == uid.JPEGExtended12Bit and runner.bits_stored <= 8:
        # pydicom tries its plugins in name order; 8-bit JPEG stays with Pillow, as before.
        raise NotImplementedError("8-bit JPEG Extended is left to Pillow")
    # The stream's samples as stored, without libjpeg's colour conversion: pydicom converts them by
    # the file's PhotometricInterpretation, as it does what Pillow decodes.
    same = imagecodecs.JPEG8.CS.YCbCr if runner.samples_per_pixel > 1 else None
    return imagecodecs.jpeg8_decode(src, colorspace=same, outcolorspace=same).tobytes()


def register() -> None:
    """Offer this plugin to pydicom for its syntaxes, after the plugins pydicom ships with."""
    for syntax in SYNTAXES:
        decoder = get_decoder(syntax)
        if LABEL not in decoder.available_plugins:  # a pydicom that ships one of its own keeps it
            decoder.add_plugin(LABEL, (__name__, "_decode_frame"))
