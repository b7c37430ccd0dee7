"""Plain data: what a traced run produced (Record, Preview, BackwardPass, Trace), and record identity across runs.

No torch, no views: a Trace can be pickled, compared and rendered without torch running.
"""
