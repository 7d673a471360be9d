"""Weights: load time and resident memory of a 124M-shaped checkpoint, ours beside transformers'.

Each measurement runs in a fresh interpreter (imports done before the clock starts), so memory
is what the load itself adds: RSS after the load minus RSS before it. Our float32 tensors are
memory-mapped, so their pages become resident when first read; we report RSS right after the
load and after reading every weight once (what the first forward pass does); transformers also
maps the file, so it is measured the same way. safetensors' own `safe_open(framework="numpy")`
is shown too: it copies every tensor, which is why weights.py parses the header itself.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from bench.common import print_table, verdict

REPEAT = 3

_PRELUDE = """
import json, sys, time
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
folder = sys.argv[1]
"""

LOADERS = {
    "gpt2cli weights.load": """
        import numpy as np
        from gpt2cli import weights
        before = rss_mb(); start = time.perf_counter()
        config, params = weights.load(folder)
        seconds = time.perf_counter() - start; after = rss_mb()
        arrays = [params["wte"], params["wpe"], params["ln_f"]["g"], params["ln_f"]["b"]]
        arrays += [t for b in params["blocks"] for layer in b.values()
                   for t in (layer.values() if "g" in layer else
                             [x for sub in layer.values() for x in sub.values()])]
        checksum = sum(float(a.sum(dtype=np.float32)) for a in arrays)  # read every page
        touched = rss_mb()
    """,
    "gpt2cli GPT2.from_pretrained": """
        import numpy as np
        from gpt2cli.model import GPT2
        from gpt2cli.quant import Packed
        before = rss_mb(); start = time.perf_counter()
        model = GPT2.from_pretrained(folder)  # the cached layout's copies (panels with numba)
        seconds = time.perf_counter() - start; after = rss_mb()
        params = model.params
        arrays = [params["wte"], params["wpe"], params["ln_f"]["g"], params["ln_f"]["b"]]
        arrays += [t for b in params["blocks"] for layer in b.values()
                   for t in (layer.values() if "g" in layer else
                             [x for sub in layer.values() for x in sub.values()])]
        arrays = [a.data if isinstance(a, Packed) else a for a in arrays]  # its panels
        checksum = sum(float(a.sum(dtype=np.float32)) for a in arrays)  # what a forward reads
        touched = rss_mb()
    """,
    "safetensors safe_open numpy": """
        from safetensors import safe_open
        before = rss_mb(); start = time.perf_counter()
        with safe_open(folder + "/model.safetensors", framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        seconds = time.perf_counter() - start; after = touched = rss_mb()
    """,
    "transformers from_pretrained": """
        import torch, transformers
        transformers.logging.set_verbosity_error()
        torch.set_num_threads(2)
        before = rss_mb(); start = time.perf_counter()
        model = transformers.GPT2LMHeadModel.from_pretrained(folder)
        seconds = time.perf_counter() - start; after = rss_mb()
        with torch.no_grad():
            checksum = sum(float(p.sum()) for p in model.parameters())  # read every page
        touched = rss_mb()
    """,
}
_REPORT = 'print(json.dumps({"s": seconds, "after": after - before, "touched": touched - before}))'


def measure(code: str, folder: Path) -> dict[str, float]:
    """Run one loader in a fresh interpreter; its load seconds and RSS deltas in MB."""
    script = _PRELUDE + textwrap.dedent(code) + _REPORT
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        capture_output=True,
        text=True,
        check=True,
        env={
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "PATH": "",
            # the run's own cache, where the checkpoint's transposed layout already is
            "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", ""),
        },
    )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    """Write a random 124M checkpoint, then time and measure each loader REPEAT times."""
    from bench.common import random_124m

    with tempfile.TemporaryDirectory() as tmp:
        folder = random_124m(Path(tmp) / "gpt2-124M", tokenizer=False)
        file_mb = (folder / "model.safetensors").stat().st_size / 2**20
        (folder / "model.safetensors").read_bytes()  # warm the page cache for everyone
        runs = {
            name: [measure(code, folder) for _ in range(REPEAT)] for name, code in LOADERS.items()
        }
    median = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    ours = median["gpt2cli GPT2.from_pretrained"]
    rows = [
        [
            name,
            m["s"] * 1000,
            m["s"] / ours["s"],
            m["after"],
            m["touched"],
            m["touched"] / file_mb,
        ]
        for name, m in median.items()
    ]
    print_table(
        f"weights: load a 124M checkpoint ({file_mb:.0f} MiB float32 file), "
        f"median of {REPEAT} fresh processes (shared 2-core machine: timings are noisy)",
        ["loader", "load ms", "x ours", "RSS after load MiB", "RSS all read MiB", "/ file"],
        rows,
    )
    speedup = median["transformers from_pretrained"]["s"] / ours["s"]
    print(
        f"\ntargets: load >= 10x faster than transformers: {speedup:.0f}x "
        f"({verdict(speedup >= 10)}); RSS <= file + 10%: "
        f"{ours['touched'] / file_mb:.2f} x file "
        f"({verdict(ours['touched'] <= 1.1 * file_mb)})"
    )
