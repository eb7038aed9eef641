"""Running one pipeline across several processes (one per GPU, or CPU processes on gloo)."""
