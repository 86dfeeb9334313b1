"""kt.local: the local provider. A pod is a supervisor process group bound to its own
loopback address (127.0.x.y) and the one supervisor port, as pod IPs are on a cluster.
Never does anything a Kubernetes pod would not also do."""
