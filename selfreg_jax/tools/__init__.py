"""Tools over trained runs: Grad-CAM analysis, sweeps, reports, collective
checks."""
