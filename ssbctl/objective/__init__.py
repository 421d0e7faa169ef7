"""The training objective: contrastive (InfoNCE, max-margin) and captioning losses."""
