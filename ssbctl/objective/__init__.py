"""The training objective: contrastive (InfoNCE, max-margin) and captioning losses over the
model's outputs, gathered across ranks (``SSBObjective``)."""
