"""The pure core: every lifecycle decision, run IDs and job-type settings; no I/O."""
