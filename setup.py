"""The compiled parts, both optional (no C compiler: the same results in Python):

- capture/_fused.c: a preview's statistics in one pass, a dense CPU float
  tensor's whole preview read in place, and a backward pass's preview cache
  (`PreviewCache.get`, run for every gradient the hooks see; preview.py's
  `_cached_preview` answers the rest). Where it is not built, or where no kernel
  of it runs (not x86-64 with AVX2 or AVX-512), previews take the same values and
  statistics with numpy, the statistics in four passes.
- capture/_walk.c: the site walk (where each op came from) and the tracer's mode
  handler, both run for every op. Where it is not built, sites.py walks the stack
  in Python and tracer.py's `_PyMode` handles each call.
- capture/_graph.c: a backward pass's plan (the graph walk, and what each node
  is hooked for), run before every recorded pass. Where it is not built,
  backward.py's `_plan_py` makes the same plan.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "autograd_magic.capture._fused",
            ["autograd_magic/capture/_fused.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "autograd_magic.capture._walk",
            ["autograd_magic/capture/_walk.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "autograd_magic.capture._graph",
            ["autograd_magic/capture/_graph.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ]
)
