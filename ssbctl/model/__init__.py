"""The SSB model: video encoder, text encoder, support-set bottleneck and caption decoder."""

from ssbctl.model.ssb import SSBModel

__all__ = ["SSBModel"]
