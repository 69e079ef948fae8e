"""The stages of a build, one module each (see base.py for the contract, build.py for the order)."""
