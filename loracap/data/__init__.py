"""Datasets loracap makes itself: `synthetic` renders compositional scenes with exact captions; `splits`
names the split such a dataset carries, which `loracap train` (a layer above this package) reads back."""
