"""Wire formats and shared types for Fogline.

NOTE: this package imports only the stdlib, numpy and small libraries
(cryptography, paho-mqtt, aiohttp). Never torch, never cloud/ or edge/.
"""
