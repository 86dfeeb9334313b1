"""kt.supervisor: the pod-side server.

Owns the call channel's server end, the process manager (actor processes, a warm pool
of workers), the worker main loop that runs user code, log capture, and the control
HTTP app. Never decides placement: it runs what it is told to run.
"""
