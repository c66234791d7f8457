"""emoshield: robust facial-expression recognition for the cloud, edge and IoT tiers.

Importing the package is cheap and never imports torch: the device tier must run
without it, so every module that needs torch imports it itself.
"""

__version__ = "0.1.0"

import os as _os

# OpenCV decodes an image of up to 2**30 pixels by default (3 GB for one frame) and reads this
# limit once, when cv2 is first imported: set it lower before any emoshield module imports cv2.
# PNG, JPEG and BMP headers are also checked before decoding (emoshield.data.images.image_size);
# this covers the other formats (TIFF) the device and the datasets read.
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64 * 2**20))
