"""`ratchet audit serve`: a local web page for human auditors (needs the `.[web]` extra)."""
