"""Model families, the generic splitter, KV caches, stage bundles and loaders."""
