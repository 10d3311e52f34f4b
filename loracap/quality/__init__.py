"""Dataset checks before training: captions against images, trainers' limits and each other.

Each module does one job and returns plain dataclasses; `loracap report` puts them together.
"""
