"""Spatio-temporal video features: frame encoders, pooling, and the HDF5 feature store."""
