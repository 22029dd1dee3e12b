"""Process plumbing: flags and one-line errors, atomic files, process settings, multi-process start."""
