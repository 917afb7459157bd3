"""Headless batch work: feature stores, SAE and head training, probing, evaluation reports."""
