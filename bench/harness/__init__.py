"""What both benchmarks share: progress output, statistics, CPU accounting from /proc, child processes and
ports, wrk runs, the broker and the database server, and the facts a results file records about its run."""
