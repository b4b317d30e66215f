"""The package version, in a leaf module: any module reads it without importing `merge`'s surface."""

__version__ = "0.1.0"
