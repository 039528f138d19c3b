"""The replica engine: continuous batching of dLLM requests on one model instance.

Knows nothing of Ray or HTTP. The serving layer talks to it only through ``AsyncEngine``
(add a request and stream its outputs, abort it, read load statistics, change policies).
"""
