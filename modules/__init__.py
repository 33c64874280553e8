"""Plain PyTorch building blocks of mtdetr: no Lightning, no Hydra.

Anyone can lift this package into another training loop.
"""
