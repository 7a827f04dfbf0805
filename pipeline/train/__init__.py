"""Training subsystem: the one loop (`loop`), its engines (`engines`), the Ray Train runner
(`ray_runner`), the streaming Ray Data input (`stream`), the in-process runner (`inprocess`) with
its core-reader rows (`rows`), the starting model of a stage (`start_model`) and the run folder
(`run_folder`)."""
