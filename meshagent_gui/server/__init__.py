"""The reference Mesh Server (control plane)."""
