"""Recording a run: the TorchFunctionMode, the backward-pass recorder, previews, source sites, names.

The only layer (with run/ and variants/) that touches torch; every private torch call is in `torch_compat`.
"""
