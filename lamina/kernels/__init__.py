"""Lamina's native CPU kernels: C sources (AVX-512 VNNI) compiled on first use, and `native.py`,
which builds, loads and wraps them (see ARCHITECTURE.md, "Native CPU kernels")."""
