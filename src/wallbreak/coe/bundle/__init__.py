"""Expert bundles on disk: the manifest and its checks, importers, compact forms, module skeletons."""
