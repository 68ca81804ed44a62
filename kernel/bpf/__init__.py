"""BPF C sources of the ACK gate and the quarantine, and their map layouts as seen from Python."""
