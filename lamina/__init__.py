"""Lamina: run transformer language models on whatever memory a machine has."""
