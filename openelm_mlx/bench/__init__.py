"""Speed and memory measurements, and the BLAS loader (imported first by the package)."""
