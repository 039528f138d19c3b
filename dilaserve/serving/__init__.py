"""The cluster layer's request path on Ray Serve: config, OpenAI-compatible ingress,
admission and routing, replica deployments wrapping the engine, metrics.

The engine knows nothing of Ray; this package knows the engine only through ``AsyncEngine``.
"""
