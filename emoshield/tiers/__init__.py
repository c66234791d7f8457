"""What the tiers share and serve: model bundles (signed, hashed, ONNX fp32 + int8) and their
export, the edge's TUF update repository (`trust`), the cloud and edge services, the HTTP
client, MQTT, strict parsing of remote values (`wire`) and the edge's metadata store.

The device runtime lives in `emoshield.device`. Nothing here imports torch at module level:
`bundle`, `signing`, `wire`, `client` and `mqtt` run on devices (onnxruntime, OpenCV and numpy
only). Modules that need torch (bundle export) import it inside their functions.
"""
