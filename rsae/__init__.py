"""Rational Sparse Autoencoders."""
