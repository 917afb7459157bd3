"""Synthetic screening mammograms with known truth (lesions, planted confounder)."""
