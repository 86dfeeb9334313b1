"""kt.core: the foundations every other kt package stands on.

Owns specs (`Compute`, `Image`), errors, serialization, the wire protocol and its
channels, `Ref`, the provider interface and registry, and the driver's event-loop
thread. Never imports another kt package: upper layers register themselves here.
"""
