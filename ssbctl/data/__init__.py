"""Video decoding, frame backbones, the prepared-feature store and the datasets."""
