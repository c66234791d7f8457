"""emoshield: robust facial-expression recognition for the cloud, edge and IoT tiers.

Importing the package is cheap and never imports torch: the device tier must run
without it, so every module that needs torch imports it itself.
"""

__version__ = "0.1.0"
