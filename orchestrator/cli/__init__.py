"""The `orch` command line: the parser, one resolver of where a command's jobs live, and what the
commands print (status tables, progress, reports, shell completion)."""
