"""Peak memory of a real model through the magic, as a notebook runs it, against the same cells plain.

The sequence (issue 14): a model of 12 x Linear(2048, 2048) (192 MB of weights) and an input
randn(64, 2048); the cell `loss = m(inp).pow(2).mean(); loss.backward()` run 4 times under
`%%autograd` (the default widget view); then a plain forward cell `loss2 = m(inp).pow(2).mean()`
and `loss2.backward()` alone under `%%autograd`. The plain baseline runs the same cells without
the `%%autograd` lines (the extension loaded alike, so imports match).

Each side runs in a fresh process (peak RSS is per process) with an IPython InteractiveShell that
has `%load_ext autograd_magic` and runs every cell through `run_cell`, widgets displayed.
Printed: peak RSS traced and plain, traced/plain, the goal (peak <= 1.1 x plain + 64 MB), the
resident memory added per re-run of the traced cell (gc collected; a least-squares slope), the same
with freed memory handed back to the OS first (`malloc_trim`, in separate processes, so what the
magic keeps shows apart from what glibc holds on to), and the bytes the notebook's snapshots hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

LAYERS, WIDTH, BATCH, RERUNS = 12, 2048, 64, 4

CHILD = r"""
import gc, json, resource, sys
from IPython.core.interactiveshell import InteractiveShell

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")

magic = sys.argv[1].startswith("traced")
trim = sys.argv[1].endswith("_trim")  # return freed memory to the OS before each reading (growth only)
def trimmed():
    if trim:
        import ctypes
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except Exception:
            pass
shell = InteractiveShell.instance()
def cell(text, traced=False):
    result = shell.run_cell(("%%autograd\n" + text) if (traced and magic) else text, store_history=True)
    if not result.success:
        raise SystemExit(f"cell failed: {result.error_before_exec or result.error_in_exec!r}")

cell("%load_ext autograd_magic")
cell("import torch\ntorch.manual_seed(0)\n"
     "m = torch.nn.Sequential(*[torch.nn.Linear({width}, {width}) for _ in range({layers})])\n"
     "inp = torch.randn({batch}, {width})")
after, held = [], []
def snapshot_mb():
    if not magic:
        return 0.0
    try:
        from autograd_magic.notebook.session import snapshot_budget
    except ImportError:  # a version of the package before the notebook's budget
        return float("nan")
    return snapshot_budget(shell).used / 2**20
for _ in range({reruns}):
    cell("loss = m(inp).pow(2).mean(); loss.backward()", traced=True)
    gc.collect()
    trimmed()
    after.append(rss_mb())
    held.append(snapshot_mb())
cell("loss2 = m(inp).pow(2).mean()")
cell("loss2.backward()", traced=True)
gc.collect()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
sys.__stdout__.write("\n" + json.dumps({"peak": peak, "after": after, "held": held + [snapshot_mb()], "end": rss_mb()}) + "\n")
"""


def _run(side: str) -> dict:
    code = CHILD.replace("{width}", str(WIDTH)).replace("{layers}", str(LAYERS)).replace("{batch}", str(BATCH))
    code = code.replace("{reruns}", str(RERUNS))
    env = dict(os.environ, MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, "-c", code, side], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the {side} run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slope(values: list) -> float:
    """Least-squares MB per run: RSS is noisy run to run."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((i - mean_x) * (a - mean_y) for i, a in enumerate(values)) / max(sum((i - mean_x) ** 2 for i in range(n)), 1)


def main(repeats: int = 1) -> dict:
    plain = min((_run("plain") for _ in range(repeats)), key=lambda r: r["peak"])
    traced = min((_run("traced") for _ in range(repeats)), key=lambda r: r["peak"])
    # growth kept, not what the allocator holds on to: freed memory returned to the OS before each reading
    plain_trim, traced_trim = _run("plain_trim"), _run("traced_trim")
    bound = 1.1 * plain["peak"] + 64
    after = traced["after"]
    growth = _slope(after)
    kept = _slope(traced_trim["after"])
    ratio = traced["peak"] / plain["peak"]
    model_mb = LAYERS * (WIDTH * WIDTH + WIDTH) * 4 / 2**20
    print(
        f"memory_magic_{LAYERS}x{WIDTH} peak traced/plain {ratio:.2f}   (traced {traced['peak']:.0f} MB, "
        f"plain {plain['peak']:.0f} MB, model {model_mb:.0f} MB)"
    )
    print(
        f"memory_magic goal peak <= 1.1 x plain + 64 MB = {bound:.0f} MB: "
        f"{'met' if traced['peak'] <= bound else 'NOT met'} ({traced['peak'] - bound:+.0f} MB)"
    )
    print(
        f"memory_magic growth per re-run of the traced cell {growth:+.0f} MB   (RSS after each run: "
        + ", ".join(f"{a:.0f}" for a in after) + f" MB; plain {', '.join(f'{a:.0f}' for a in plain['after'])} MB)"
    )
    print(
        f"memory_magic kept per re-run (after malloc_trim) {kept:+.1f} MB   (traced "
        + ", ".join(f"{a:.0f}" for a in traced_trim["after"]) + " MB; plain "
        + ", ".join(f"{a:.0f}" for a in plain_trim["after"]) + f" MB, {_slope(plain_trim['after']):+.1f} MB per run)"
    )
    held = traced.get("held")
    if held is not None:
        print("memory_magic snapshot bytes held by the notebook after each traced cell: "
              + ", ".join(f"{h:.1f}" for h in held) + " MB")
    return {"memory_magic_ratio": ratio, "memory_magic_growth_mb": growth, "memory_magic_kept_mb": kept}


if __name__ == "__main__":
    main()
