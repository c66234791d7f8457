"""Where every bench script records its numbers: bench/results.json (headline keys, merged
across scripts) and one section of BENCHMARKS.md per script (replaced on each run)."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = """# Benchmarks

Every number here comes from a script in `bench/`, run on this project's 2-core CPU machines,
and is a ratio or a median of interleaved repeats measured side by side in one run (absolute
times drift on shared machines). Headline keys are in `bench/results.json`; each section below
is rewritten by the script it names.
"""


def cpu_bfloat16() -> str:
    """The CPU's native bfloat16 support (AMX / AVX512-BF16), which decides whether --amp pays off."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ", ".join(found) or "none"


def machine() -> dict:
    import numpy

    from emoshield.device.recognizer import cpu_isa

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "numpy": numpy.__version__, "cpu_isa": cpu_isa(), "cpu_bfloat16": cpu_bfloat16()}
    for name in ("torch", "onnxruntime", "cv2", "torchattacks"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def record(section: str, keys: dict, markdown: str) -> None:
    """Merge headline `keys` into bench/results.json and replace `section` in BENCHMARKS.md."""
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.update(keys)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
    text = BENCHMARKS.read_text() if BENCHMARKS.is_file() else HEADER
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


def interleaved_medians(runners: dict, repeats: int) -> dict:
    """Median seconds of each runner over `repeats` rounds that run every runner once in turn,
    so drift on a shared machine hits all of them alike (warm up before calling)."""
    import statistics
    import time

    times: dict = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}
