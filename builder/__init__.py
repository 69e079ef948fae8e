"""Moral Ratchet: a versioned dataset compiler for alignment training data."""
