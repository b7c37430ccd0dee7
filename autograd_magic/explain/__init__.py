"""Pure readings of a Trace: the backward stepper, why-explanations, folding, value formatting, and the one wording layer.

Imports no torch: every sentence and number comes from the Trace.
"""
