"""Cryptographic boundaries: digests and commitments, Ed25519 identities, TenSEAL (CKKS)."""
