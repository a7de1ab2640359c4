"""Data: the sample schema, image decoding, resumable WebDataset streams, mixtures, the DataModule."""
