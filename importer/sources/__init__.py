"""Where image bytes come from: one tiny interface (base.Source), one module per kind of endpoint."""

from importer.sources.base import Source, SourceInfo
from importer.sources.blank import BlankSource
from importer.sources.file import FileSource
from importer.sources.http import HttpOptions, HttpSource
from importer.sources.registry import RegistrySource

__all__ = ["BlankSource", "FileSource", "HttpOptions", "HttpSource", "RegistrySource", "Source", "SourceInfo"]
