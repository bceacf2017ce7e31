"""Composition of Experts serving: bundle -> router -> tiers -> engine -> server."""
