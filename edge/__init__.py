"""The edge agent.

NOTE: never imports torch or cloud/ (devices install only the ``edge`` extra).
"""
