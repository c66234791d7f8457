"""The IoT device runtime: it never trains and never imports torch (onnxruntime, OpenCV, numpy
and python-tuf only); `tests/test_tiers.py` runs it with torch made unimportable.

    store.py       verified bundles on disk: current + previous, atomic swaps, rollback, GC
    recognizer.py  a bundle's ONNX model (int8 after its self-check on this CPU), faces -> emotions
    sync.py        updates from the edge through TUF metadata (freeze, rollback and key-rotation
                   safe), downloaded on a worker thread while frames go on
    run.py         the `emoshield device run` loop: frames in, JSON lines / video / heartbeats out

The wire formats it shares with the edge (bundle manifests, signatures, strict parsing of
remote values, the HTTP client, MQTT) live in `emoshield.tiers`, which is torch-free too.
"""
