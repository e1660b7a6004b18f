"""What the run shows in the Prefect UI besides its logs; tasks/config.py gathers it into the run's config."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_PRESIGN_HOURS = 168  # S3's longest presigned URL (SigV4): 7 days


class ArtifactSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown keys are typos: rejected
    progress: bool = Field(True, description="A progress artifact (steps done of the total) that training updates.")
    progress_every_s: float = Field(
        5.0, ge=0.5, le=600, description="Least time between two progress updates sent to the Prefect API "
        "(the last step is always sent).",
    )
    loss_curve: bool = Field(
        True, description="The loss curve as an image in the run's page (a markdown artifact with the PNG inside).",
    )
    links: bool = Field(
        True, description="Link artifacts to the published run's manifest and to its model card (S3: presigned "
        "URLs, valid link_expiry_hours; a local output: file:// links).",
    )
    link_expiry_hours: int = Field(
        MAX_PRESIGN_HOURS, ge=1, le=MAX_PRESIGN_HOURS, description="How long the presigned S3 links stay valid "
        "(at most 7 days; temporary credentials end them sooner, when the credentials expire).",
    )
