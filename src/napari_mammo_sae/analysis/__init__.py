"""Neuron rankings, interventions, localisation and metrics (numpy/torch, no Qt)."""
