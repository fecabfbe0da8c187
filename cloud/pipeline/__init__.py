"""Model pipeline: train, export, compress and package models for the fleet.

NOTE: the only part of Fogline that imports torch; the edge never runs it.
"""
