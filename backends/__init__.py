"""Executor backends shipped with pypline, installed as ``pypline.backends``.

Each module implements ``pypline.executor.Backend`` using only pypline's public API.
Import them through ``pypline.backends.<name>``, never as a top-level ``backends``.
"""
