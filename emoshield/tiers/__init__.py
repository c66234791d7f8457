"""The three tiers as code: model bundles (signed, hashed, ONNX fp32 + int8), the cloud
model library, the edge node and the device runtime.

Nothing here imports torch at module level: a device installs onnxruntime, OpenCV and
numpy only, and `emoshield.tiers.device` must run there. Modules that need torch
(bundle export) import it inside their functions.
"""
