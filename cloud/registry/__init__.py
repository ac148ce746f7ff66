"""The model registry: models, their source files, release candidates, lineage, releases.

SQLAlchemy tables (``tables``) in the cloud database, files in a
content-addressed blob store under the data dir (``blobs``), and a service
with no HTTP (``service.Registry``) that the API router and the CLI share.
``jobs.BuildQueue`` runs candidate builds on a background thread for the API.
"""

from cloud.registry.errors import ConflictError, QueueFullError, UnknownEntryError
from cloud.registry.options import QuantizeOptions
from cloud.registry.schemas import (
    CandidatePublic,
    LineagePublic,
    ModelDetail,
    ModelSummary,
    ReleasePublic,
    SourcePublic,
)
from cloud.registry.service import Registry

__all__ = [
    "CandidatePublic",
    "ConflictError",
    "LineagePublic",
    "ModelDetail",
    "ModelSummary",
    "QuantizeOptions",
    "QueueFullError",
    "Registry",
    "ReleasePublic",
    "SourcePublic",
    "UnknownEntryError",
]
