"""Models and data sets: manifests, the store and its sources, the byte-bounded cache, the torch runtime."""
