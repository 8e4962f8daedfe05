"""Lamina's native CPU kernels: C sources (built for AVX-512 VNNI or AVX2) compiled on first use, and `native.py`,
which builds, loads and wraps them (see ARCHITECTURE.md, "Native CPU kernels")."""
