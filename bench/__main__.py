"""`make bench`: every benchmark, each printing ratios against a baseline measured in the same run."""

from __future__ import annotations

import importlib

MODULES = [
    "bench.bench_engine", "bench.bench_memory", "bench.bench_memory_magic", "bench.bench_layout",
    "bench.bench_widget", "bench.bench_latency", "bench.bench_size", "bench.bench_explore",
]


def main() -> None:
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            print(f"# {name}: not available ({exc})")
            continue
        print(f"# {name}")
        mod.main()


if __name__ == "__main__":
    main()
