"""Datasets loracap makes itself: `synthetic` renders compositional scenes with exact captions."""
