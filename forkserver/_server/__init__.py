"""Code that runs inside template processes (the command loop, child setup).

Nothing here runs in the user's process, except through ``forkserver.early()``.
"""
