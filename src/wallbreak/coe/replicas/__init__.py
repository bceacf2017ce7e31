"""Serving one bundle from several engine replicas (Ray Serve)."""
