"""Other codebases' training steps on the same shapes, timed like mmfusion's (one module per peer)."""
