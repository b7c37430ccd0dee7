"""The one compiled part: capture/_fused.c, a preview's statistics in one pass.

Optional: where it cannot be built (no C compiler), or where no kernel of it runs
(not x86-64 with AVX2 or AVX-512), previews take the same statistics with numpy,
in four passes.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "autograd_magic.capture._fused",
            ["autograd_magic/capture/_fused.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
