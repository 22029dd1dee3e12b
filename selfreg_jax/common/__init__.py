"""Process plumbing: flags and one-line errors, atomic files, process
settings, joining a multi-process job."""
