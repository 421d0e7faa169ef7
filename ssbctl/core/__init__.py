"""The bottom layer: errors, file I/O, validation of read files, paths, device choice and the
collectives. It imports nothing else of ssbctl, so every other layer may use it."""
