"""Base models: finding, loading and adapting them, devices and precision, parameters, memory, the loss.

Imports only the foundation modules (config, errors, progress, atomic).
"""
