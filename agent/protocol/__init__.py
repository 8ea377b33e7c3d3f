"""The wire contract both sides speak: bundle format, manifests, signatures, keys, profiles.

Standard library and cryptography only: this package runs on devices and on the host alike.
"""
