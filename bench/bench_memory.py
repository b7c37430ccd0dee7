"""Peak memory: a traced cell with large tensors against the same cell plain.

Each side runs in its own fresh process (peak RSS is per process), so the
ratio compares like with like. Target: traced/plain <= 1.10.
"""

from __future__ import annotations

import subprocess
import sys

WORK = """
import resource, torch
torch.manual_seed(0)
x = torch.randn(4000, 4000, requires_grad=True)   # 64 MB
def body():
    y = x * 2
    z = torch.tanh(y) + y
    loss = (z * z).mean()
    loss.backward()
{run}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
PLAIN = "body()"
TRACED = "import autograd_magic as am\nwith am.trace():\n    body()"
BASELINE = "import autograd_magic as am\n"  # imports alike on both sides


def _peak_kb(run: str) -> int:
    code = WORK.replace("{run}", run)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> dict:
    plain = _peak_kb(BASELINE + PLAIN)
    traced = _peak_kb(TRACED)
    ratio = traced / plain
    print(f"peak_rss_64MB_tensors traced/plain {ratio:.2f}   (plain {plain / 1024:.0f} MB, traced {traced / 1024:.0f} MB)")
    return {"peak_rss": ratio}


if __name__ == "__main__":
    main()
