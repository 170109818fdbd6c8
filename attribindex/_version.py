"""The library's version, from the installed distribution's metadata: pyproject.toml is its one source.

It sits at the bottom of the package so that modules recording it (manifests) need not import the package root.
"""

from importlib import metadata

try:
    __version__ = metadata.version("attribindex")
except metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
