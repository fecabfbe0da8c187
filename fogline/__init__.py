"""Command line and the all-in-one demo; imports cloud/ and edge/ lazily."""

__version__ = "0.1.0"
