"""Re-running a cell differently without touching the user's state: snapshot, sandbox, interventions, gradient check.
"""
